"""Checkpoints of an expert-parallel model: ``save`` gathers every layer's experts to rank 0,
which writes what one process writes; ``load_sharded`` reads back only this rank's block.

    save:          every rank → checksums agreed → experts gathered (bytes) → rank 0 writes
                   (``moefy.io.checkpoint``) → the outcome broadcast → the model as it was
    load_sharded:  every rank → the plan and replicated weights, its own expert rows by byte
                   range → the same save on every rank checked
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from moefy.distributed.agree import agree, any_rank, collective_device, differing
from moefy.distributed.shard import EXPERT_TENSORS, Shard, bounds_of, expert_ids, group_of
from moefy.errors import ExpertParallelError, LoadError, SaveError
from moefy.io import checkpoint
from moefy.layers.moe import MoE
from moefy.layers.shard import sharded_layers


def save(model: nn.Module, directory: str | os.PathLike, *, tokenizer=None,
         info: dict | None = None) -> Path:
    """Write ``model`` (a model converted by ``moefy.convert``, or a ``moefy.MoE`` /
    ``moefy.PEER`` itself) to ``directory`` (created if needed; a previous save there is
    replaced). Returns the directory.

    Args:
        tokenizer: also write its files (``save_pretrained``), so that ``directory`` is a
            complete Hugging Face folder.
        info: a JSON-serialisable dict kept as ``plan["info"]`` (e.g. where the model came
            from).

    Raises ``moefy.errors.SaveError`` before writing anything when a layer cannot be
    described without pickling code: graph-mode conversions (an FFN inline in a larger
    forward became a traced graph) and layers with a custom activation module.

    A model sharded by ``moefy.distributed.expert_parallel`` is saved by every rank of its group
    together (not ``if rank == 0``): the experts are gathered, and rank 0 writes the same
    checkpoint one process would write for the whole model (the replicated weights must be
    equal on every rank, or ``SaveError``). ``moefy.distributed.load_sharded`` reads
    it back, each rank its own experts.

    >>> import tempfile
    >>> from moefy.io.checkpoint import load
    >>> moe = MoE(8, 16, num_experts=4, top_k=2)
    >>> with tempfile.TemporaryDirectory() as d:
    ...     back = load(save(moe, d), MoE(8, 16, num_experts=4, top_k=2))
    >>> bool(torch.equal(back.w_in, moe.w_in))
    True
    """
    model, directory = checkpoint.check_save_arguments(model, directory, tokenizer, info)
    # a model sharded by expert_parallel: rank 0 writes it with every layer's experts gathered
    gathered_on_rank0(model, lambda whole: checkpoint.write(whole, directory, tokenizer, info),
                      "save", SaveError)
    return directory


def load_sharded(directory, model: nn.Module | None = None, process_group=None, *,
                 data_parallel_group=None) -> nn.Module:
    """``moefy.load`` and ``expert_parallel`` in one, reading from the file only the experts
    this rank keeps (host memory: the replicated part and this rank's block, not the whole
    model on every rank). Every rank of the group calls it with the same folder (a shared
    filesystem across machines), with any number of ranks; the result is what
    ``expert_parallel(moefy.load(directory, model), process_group, ...)`` gives.

    Raises ``LoadError`` as ``moefy.load`` does, and ``ExpertParallelError`` on every rank
    when the ranks read different checkpoints."""

    group, rank, world = group_of(process_group, data_parallel_group)

    def shard(layers: dict) -> dict:
        rows = {}
        for path, layer in layers.items():
            for name, m in layer.named_modules():  # wrappers too: their names are in the file
                if not isinstance(m, MoE):
                    continue
                bounds = bounds_of(m.num_experts, world)
                m.shard = Shard(group, rank, world, bounds, data_parallel_group)
                prefix = ".".join(x for x in (path, name) if x)
                for tensor in EXPERT_TENSORS:
                    p = getattr(m, tensor)
                    if p is not None:  # meta: only the shape changes
                        p.data = p.data[bounds[rank]:bounds[rank + 1]]
                        rows[f"{prefix}.{tensor}" if prefix else tensor] = (
                            bounds[rank], bounds[rank + 1])
        return rows

    failure = None
    try:
        model = checkpoint.load_with(directory, model, shard)
        if not sharded_layers(model):
            raise ExpertParallelError(f"{directory} holds no moefy.MoE layer: nothing to shard "
                                      "(use moefy.load)")
        save_id = int(str(checkpoint.read_plan(directory)["id"])[:12], 16)
    except Exception as exc:  # noqa: BLE001 - the other ranks must not wait for this one
        failure = exc
    # a rank that could not load tells the others, which would otherwise wait for it in the
    # next collective until the group's timeout
    failed = any_rank(failure is not None, group, data_parallel_group)
    if failure is not None:
        raise failure
    if failed:
        raise LoadError(f"another rank could not load {directory} (its error says why); "
                        "nothing was loaded here either")
    # every rank must have read the same save: its id, and the replicated weights
    parts = [("the checkpoint's save id", [torch.tensor(float(save_id), dtype=torch.float64)])]
    experts = expert_ids(sharded_layers(model))
    parts.append(("the replicated weights", [t for t in [*model.parameters(), *model.buffers()]
                                              if id(t) not in experts]))
    differ = agree(parts, group, data_parallel_group)
    if differ:
        raise ExpertParallelError(
            f"the ranks read different checkpoints ({differ}): give every rank the same "
            "folder (on a filesystem all machines share)")
    return model


def gathered_on_rank0(model: nn.Module, write, what: str, error: type[Exception]):
    """Run ``write(model)`` on rank 0 of the model's expert-parallel group, with every sharded
    layer's experts gathered there (the layer as one process holds it), and return its
    result there (None on the other ranks, which take part in the gathers). A model that is
    not sharded is simply passed to ``write``. Every rank must call this together; on an
    expert × data mesh the row that holds global rank 0 gathers and writes, and the other
    rows wait for the outcome. The model is unchanged afterwards, on every rank.

    Raises ``error`` on every rank, with nothing written, when the replicated weights differ
    between the ranks, or the experts between data-parallel replicas (rank 0's would
    silently stand for all of them), and on every rank when ``write`` fails on rank 0."""
    layers = sharded_layers(model)
    if not layers:
        return write(model)
    groups = {(m.shard.group, m.shard.data_group) for m in layers}
    if len(groups) != 1:
        raise error(f"{what}: the model is sharded over more than one process group")
    group, data_group = groups.pop()
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    device = collective_device(group)
    experts = expert_ids(layers)
    parts = [(name or "the MoE layer",
              [t for t in [*m.parameters(), *m.buffers()] if id(t) not in experts])
             for name, m in model.named_modules()
             if getattr(m, "shard", None) is not None]
    inside = {id(t) for m in layers for t in [*m.parameters(), *m.buffers()]}
    parts.append(("the layers outside the MoEs",
                  [t for t in [*model.parameters(), *model.buffers()] if id(t) not in inside]))
    try:  # the first collective: where a rank that did not call this leaves the others
        differ = differing(parts, group, world)
    except RuntimeError as exc:
        raise error(f"{what} of an expert-parallel model failed in its first exchange ({exc}):"
                    f" every rank must call {what} together (it gathers the experts), not "
                    "only rank 0") from exc
    writes, source = True, None
    if data_group is not None:  # a mesh (checked by expert_parallel): the row of global
        # rank 0 writes for all rows; its member in this column tells the others the outcome
        writes = 0 in dist.get_process_group_ranks(group)
        differ += [f"{n} (between the data-parallel replicas)" for n in differing(
            [("the model", [*model.parameters(), *model.buffers()])], data_group,
            dist.get_world_size(data_group))]
        column = [torch.zeros(1, dtype=torch.int64, device=device)
                  for _ in range(dist.get_world_size(data_group))]
        dist.all_gather(column, torch.tensor([int(writes)], device=device), group=data_group)
        source = dist.get_global_rank(data_group, next(i for i, c in enumerate(column)
                                                       if c.item()))
    if any_rank(bool(differ), group, data_group):
        raise error(
            f"{what}: the ranks hold different weights in "
            f"{', '.join(differ[:4]) or 'another rank of the mesh'} (rank 0's would stand for "
            "all of them): call parallel.reduce_gradients after every backward so that every "
            "rank takes the same step; nothing was written")
    if not writes:  # another row writes: wait for its outcome
        flag = torch.zeros(1, dtype=torch.int64, device=device)
        dist.broadcast(flag, src=source, group=data_group)
        if bool(flag.item()):
            raise error(f"{what} failed on global rank 0 (its error says why)")
        return None
    swapped, result, failure = [], None, None
    try:
        for moe in layers:
            shard = moe.shard
            for name in EXPERT_TENSORS:
                p = getattr(moe, name)
                if p is None:
                    continue
                full = _gather_rows(p.detach(), shard, device)
                if rank == 0:
                    swapped.append((moe, name, p))
                    setattr(moe, name, nn.Parameter(full, requires_grad=p.requires_grad))
            if rank == 0:
                swapped.append((moe, "shard", shard))
                moe.shard = None
        if rank == 0:
            try:
                result = write(model)
            except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
                failure = exc
    finally:
        for moe, name, value in reversed(swapped):  # the same objects: optimizers still hold
            setattr(moe, name, value)
    flag = torch.tensor([failure is not None], dtype=torch.int64, device=device)
    dist.broadcast(flag, src=dist.get_global_rank(group, 0), group=group)
    if data_group is not None:  # tell this column's other rows
        dist.broadcast(flag, src=source, group=data_group)
    if failure is not None:
        raise failure
    if bool(flag.item()):
        raise error(f"{what} failed on rank 0 of the expert-parallel group (its error says "
                    "why)")
    return result


def _gather_rows(t: torch.Tensor, shard: Shard, device: torch.device) -> torch.Tensor | None:
    """The whole (E, ...) tensor from every rank's block of rows, on the CPU of rank 0; None
    on the others. Sent as bytes (padded to the largest block), whatever the dtype."""
    sizes = [b - a for a, b in zip(shard.bounds[:-1], shard.bounds[1:], strict=True)]
    block = t.new_zeros(max(sizes), *t.shape[1:])
    block[: t.shape[0]] = t
    send = block.view(torch.uint8).to(device)  # bytes: any dtype, on any backend
    out = [torch.empty_like(send) for _ in range(shard.world)]
    dist.all_gather(out, send, group=shard.group)
    if shard.rank != 0:
        return None
    return torch.cat([o.cpu().view(t.dtype)[:n] for o, n in zip(out, sizes, strict=True)])
