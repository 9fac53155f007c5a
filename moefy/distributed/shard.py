"""Sharding: each rank keeps a contiguous block of every MoE layer's routed experts.

    model (every rank the same weights, checked) → each MoE's w_in / w_gate / w_out / biases
      cut to this rank's rows [start, stop) → ``moe.shard`` = this rank's ``Shard``

The layer declares the field (``moefy.layers.shard.ExpertShard``); a ``Shard`` runs the layer's
routed experts across the ranks (``moefy.distributed.exchange``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn

from moefy.distributed.agree import agree, collective_device
from moefy.distributed.exchange import routed
from moefy.errors import ExpertParallelError
from moefy.layers.moe import MoE

EXPERT_TENSORS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")


@dataclass(frozen=True)
class Shard:
    """Which routed experts this rank holds: [bounds[rank], bounds[rank + 1]) of E."""

    group: object
    rank: int
    world: int
    bounds: tuple[int, ...]  # world + 1 expert offsets
    data_group: object = None  # the replicas of this block (expert x data parallelism)

    @property
    def start(self) -> int:
        return self.bounds[self.rank]

    @property
    def stop(self) -> int:
        return self.bounds[self.rank + 1]

    def __deepcopy__(self, memo):
        return self  # frozen, no tensors: a deep copy of the model runs on the same group

    def __reduce__(self):
        raise ExpertParallelError(
            "a model sharded by expert_parallel cannot be pickled (its process group lives "
            "in this process): save it with moefy.save, every rank together")

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor,
               indices: torch.Tensor) -> torch.Tensor:
        """``moe.routed`` across the ranks: tokens travel to the ranks that own their
        experts and back."""
        return routed(moe, self, x, weights, indices)

    def reduce_load(self, load: torch.Tensor) -> None:
        """Sum a per-expert load over the ranks (and the mesh's replicas), in place: the
        replicated sigmoid-router bias follows every rank's load alike."""
        dist.all_reduce(load, group=self.group)
        if self.data_group is not None:
            dist.all_reduce(load, group=self.data_group)


def expert_parallel(model: nn.Module, process_group=None, *,
                    data_parallel_group=None) -> nn.Module:
    """Shard the routed experts of every ``moefy.MoE`` in ``model`` across the ranks of
    ``process_group`` (default: the whole world), in place, and return ``model``.

    Rank r keeps experts [r·E/W, (r+1)·E/W) (contiguous blocks; with E not a multiple of the
    world size W the first E mod W ranks hold one more). Every rank must hold the same
    weights before the call (load the same checkpoint everywhere): this is checked.

    Expert × data parallelism (a 2-D mesh): ``process_group`` is this rank's row (the ranks
    that split the experts among them) and ``data_parallel_group`` its column (the ranks
    that hold the same block: one from each row). ``reduce_gradients`` then sums over both,
    the sigmoid router's balancing bias follows the load of every rank, and ``moefy.save``
    writes from the row that holds global rank 0.

    >>> # under torchrun: dist.init_process_group("gloo"); model = expert_parallel(model)
    """
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    if not moes:
        raise ExpertParallelError(f"{type(model).__name__} holds no moefy.MoE layer: convert "
                                  "it first (moefy.convert)")
    sharded = [name for name, m in moes if getattr(m, "shard", None) is not None]
    if sharded:
        raise ExpertParallelError(f"{', '.join(sharded[:4])} already sharded: call "
                                  "expert_parallel once, on the unsharded model")
    group, rank, world = group_of(process_group, data_parallel_group)
    inside = {id(t) for _, m in moes for t in [*m.parameters(), *m.buffers()]}
    parts = [(name or "the MoE layer", [*m.parameters(), *m.buffers()]) for name, m in moes]
    parts.append(("the layers outside the MoEs",
                  [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside]))
    differ = agree(parts, group, data_parallel_group)
    if differ:
        raise ExpertParallelError(
            f"the ranks hold different weights in {differ}: load the same model on every "
            "rank (same checkpoint, same seed) before expert_parallel")
    done = set()  # an expert tensor two layers share is cut once
    for _, moe in moes:
        shard = Shard(group, rank, world, bounds_of(moe.num_experts, world), data_parallel_group)
        for name in EXPERT_TENSORS:
            p = getattr(moe, name)
            if p is not None and id(p) not in done:  # the same Parameter, now this rank's
                # block: an optimizer made before still holds it (one with state fails on the
                # shape, not silently); gradients kept so far are cut alike
                done.add(id(p))
                # the block keeps the weight's kind: called under inference_mode, a normal
                # weight must not become an inference tensor that can never train
                with torch.inference_mode(p.is_inference()):
                    p.data = p.detach()[shard.start:shard.stop].clone()
                if p.grad is not None:
                    p.grad = p.grad[shard.start:shard.stop].clone()
        moe.shard = shard
        moe.invalidate()
    return model


def group_of(process_group, data_parallel_group) -> tuple[object, int, int]:
    """(group, this rank in it, its size), after checking that torch.distributed is set up,
    that this process belongs to both groups, and that the data-parallel group is a column
    of a mesh whose rows are expert-parallel groups (the verdict agreed on every rank)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ExpertParallelError(
            "expert parallelism needs an initialised torch.distributed process group: run "
            "under torchrun and call torch.distributed.init_process_group('gloo' or 'nccl') "
            "first")
    group = process_group if process_group is not None else dist.group.WORLD
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    if rank < 0:
        raise ExpertParallelError("this process is not a member of process_group: call "
                                  "expert_parallel on the ranks of the group only")
    if data_parallel_group is None:
        return group, rank, world
    if dist.get_rank(data_parallel_group) < 0:
        raise ExpertParallelError("this process is not a member of data_parallel_group: pass "
                                  "the group of the ranks that hold the same experts as it")
    device = collective_device(group)
    mine = torch.tensor([rank, world, min(dist.get_process_group_ranks(group))],
                        dtype=torch.int64, device=device)
    column = [torch.empty_like(mine) for _ in range(dist.get_world_size(data_parallel_group))]
    dist.all_gather(column, mine, group=data_parallel_group)
    ok = (all(int(c[0]) == rank and int(c[1]) == world for c in column)
          and len({int(c[2]) for c in column}) == len(column))
    verdict = torch.tensor([int(ok)], dtype=torch.int64, device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=data_parallel_group)
    if not int(verdict):
        raise ExpertParallelError(
            "data_parallel_group must be a column of a mesh whose rows are the expert-parallel "
            "groups: one rank from each row, all at the same place in their rows (so that they "
            "hold the same experts); e.g. rows [0, 1], [2, 3] and columns [0, 2], [1, 3]")
    return group, rank, world


def bounds_of(num_experts: int, world: int) -> tuple[int, ...]:
    """Expert offsets of the ranks' contiguous blocks; the first E mod W ranks hold one more."""
    E = num_experts
    return tuple(r * (E // world) + min(r, E % world) for r in range(world + 1))


def expert_ids(layers) -> set[int]:
    """ids of the sharded expert tensors of ``layers``."""
    return {id(getattr(m, n)) for m in layers for n in EXPERT_TENSORS
            if getattr(m, n) is not None}
