"""Agreement between ranks: every rank gets the same answer, so all of them stop or go on
together (a rank left waiting in a collective would hang until the group's timeout).

    per-rank flag or float64 checksums → all_reduce / all_gather → one verdict on every rank
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def any_rank(flag: bool, group, data_group) -> bool:
    """Whether ``flag`` holds on any rank of the row or (on a mesh) of the column: the same
    answer on every rank, so that all of them stop or go on together."""
    t = torch.tensor([int(flag)], dtype=torch.int64, device=collective_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if data_group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=data_group)
    return bool(t.item())


def collective_device(group) -> torch.device:
    """Where this group's collectives take tensors: NCCL only CUDA ones."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agree(parts: list[tuple[str, list[torch.Tensor]]], group, data_group) -> str:
    """The parts that differ between the ranks of ``group`` (and of ``data_group``), named,
    or ""; every rank gets a non-empty answer when any rank sees a difference."""
    differ = differing(parts, group, dist.get_world_size(group))
    if data_group is not None:
        differ += [n for n in differing(parts, data_group, dist.get_world_size(data_group))
                   if n not in differ]
    if not any_rank(bool(differ), group, data_group):
        return ""
    return ", ".join(differ[:4]) if differ else "another rank's weights"


def differing(parts: list[tuple[str, list[torch.Tensor]]], group, world: int) -> list[str]:
    """The names of the parts whose float64 checksum is not the same on every rank."""
    def checksum(tensors) -> torch.Tensor:
        # sum, sum of squares, a position-weighted sum (experts in another order change it)
        # and the count of non-finite values (a NaN weight on every rank is equal, not
        # different), in float64 over chunks of 4M values (little extra memory)
        out = torch.zeros(4, dtype=torch.float64)
        for t in tensors:
            if not t.is_floating_point():
                continue
            offset = 0
            for chunk in t.detach().reshape(-1).split(1 << 22):
                c = chunk.to(torch.float64)
                bad = ~c.isfinite()
                c = c.masked_fill(bad, 0.0)
                where = torch.arange(offset, offset + c.numel(), dtype=torch.float64,
                                     device=c.device).remainder_(1009).add_(1)
                out += torch.stack([c.sum(), c.square().sum(), (c * where).sum(),
                                    bad.sum().to(torch.float64)]).cpu()
                offset += c.numel()
        return out

    sums = torch.stack([checksum(tensors) for _, tensors in parts]).to(
        collective_device(group))
    gathered = [torch.empty_like(sums) for _ in range(world)]
    dist.all_gather(gathered, sums, group=group)
    return [parts[i][0] for i in range(len(parts))
            if any(not torch.allclose(g[i], sums[i], rtol=1e-9, atol=1e-9) for g in gathered)]
