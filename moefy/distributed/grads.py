"""Gradients of an expert-parallel model: the replicated parts summed over the ranks.

    per-rank grads → replicated ones all-reduced over the row (and, on a mesh, everything over
    the column) in flat buckets → every rank takes the step of one process on all the tokens
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from moefy.distributed.agree import collective_device
from moefy.distributed.shard import expert_ids
from moefy.errors import ExpertParallelError
from moefy.layers.shard import sharded_layers


def reduce_gradients(model: nn.Module, average: bool = False) -> None:
    """After ``backward`` on every rank: sum (or average) the gradients of every parameter
    that is not a sharded expert over the ranks, so that the replicated parts see the whole
    batch, as the sharded experts already do (their gradients come from every rank's
    tokens of the expert-parallel group). With each rank's loss divided by the number of
    ranks, ``average=False`` gives the gradients of one process that runs each rank's tokens
    in turn (routing, capacity and auxiliary losses per rank's forward); ``average=True``
    gives the same from undivided losses (every gradient, the experts' too, is divided by
    the number of ranks).

    With a ``data_parallel_group`` (``expert_parallel``'s mesh), the experts' gradients are
    also summed over it, and the replicated ones over both groups: every rank takes the
    step of one process on all the mesh's tokens."""
    shards = {(m.shard.group, m.shard.data_group) for m in sharded_layers(model)}
    if len(shards) != 1:
        raise ExpertParallelError("reduce_gradients needs a model sharded by expert_parallel "
                                  "(over one process group)")
    group, data_group = shards.pop()
    sharded = expert_ids(sharded_layers(model))
    world = dist.get_world_size(group) * (
        1 if data_group is None else dist.get_world_size(data_group))
    params = [p for p in model.parameters() if p.requires_grad]  # the same order everywhere
    sparse = [p for p in params if p.grad is not None and p.grad.is_sparse]
    if sparse:
        raise ExpertParallelError("reduce_gradients: sparse gradients (nn.Embedding(sparse="
                                  "True)) are not supported; use dense embeddings")
    # a parameter no rank's tokens reached keeps grad None, as in one process (an optimizer
    # skips it); one that some rank's reached is zero-filled elsewhere, to be summed
    device = collective_device(group)
    has = torch.tensor([p.grad is not None for p in params], dtype=torch.int64, device=device)
    dist.all_reduce(has, op=dist.ReduceOp.MAX, group=group)
    if data_group is not None:
        dist.all_reduce(has, op=dist.ReduceOp.MAX, group=data_group)
    grads = []
    for p, reached in zip(params, has.tolist(), strict=True):
        if reached:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p)
    replicated = [p.grad for p in grads if id(p) not in sharded]
    all_reduce_flat(replicated, group)
    if data_group is not None:
        all_reduce_flat(replicated + [p.grad for p in grads if id(p) in sharded], data_group)
    if average:  # the experts' gradients too are sums over every rank's tokens
        for p in grads:
            p.grad /= world


def all_reduce_flat(tensors: list[torch.Tensor], group, bucket: int = 1 << 24) -> None:
    """Sum ``tensors`` over ``group`` in place, a few large messages instead of one per
    tensor: consecutive tensors of one dtype and device are flattened together, up to
    ``bucket`` elements a message."""
    i = 0
    while i < len(tensors):
        j, size = i + 1, tensors[i].numel()
        while (j < len(tensors) and tensors[j].dtype == tensors[i].dtype
               and tensors[j].device == tensors[i].device
               and size + tensors[j].numel() <= bucket):
            size += tensors[j].numel()
            j += 1
        flat = torch.cat([t.reshape(-1) for t in tensors[i:j]])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in tensors[i:j]:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
        i = j
