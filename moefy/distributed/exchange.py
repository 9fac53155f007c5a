"""The token exchange of an expert-parallel MoE layer.

    each rank: its own tokens → each token once to every rank that owns one of its experts,
      with its (expert, weight) pairs there: counts first, then rows, pair metadata and
      weights (all_to_all_single, uneven splits)
      → the owner runs its experts on what arrived (``MoE.run_experts``: the single-process
      kernels) → one weighted row per token returns by the reverse exchange → added up

The exchange is differentiable (its backward is the reverse exchange).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from moefy.errors import ExpertParallelError

if TYPE_CHECKING:
    from moefy.distributed.shard import Shard
    from moefy.layers.moe import MoE


@torch.compiler.disable  # data-dependent exchanges: run eagerly inside a compiled model
def routed(moe: MoE, shard: Shard, x: torch.Tensor, weights: torch.Tensor,
           indices: torch.Tensor) -> torch.Tensor:
    """``MoE.routed`` of a sharded layer: Σ_j weights[t, j] · expert_{indices[t, j]}(x[t])
    for this rank's tokens x (T, H), as (T, O), the experts running on the ranks that own
    them.

    A token travels once to each rank that owns one of its experts (not once per slot), with
    the (expert, weight) pairs it has there; the owner returns one row per token, the
    weighted sum of its experts' outputs, and the origin adds the rows of each token."""
    T, k = indices.shape
    # only slots that carry weight travel (a weight-0 slot contributes nothing, and is never
    # multiplied by 0 here either: an inf output must not become NaN)
    w_flat = weights.reshape(-1)
    pos = (w_flat != 0).nonzero().squeeze(1)
    flat = indices.reshape(-1)[pos]
    bounds = torch.tensor(shard.bounds[1:-1], dtype=flat.dtype, device=flat.device)
    owner = torch.bucketize(flat, bounds, right=True)  # rank that holds each pair's expert
    token = pos // k
    order = torch.argsort(owner * T + token, stable=True)  # by owner, then token
    owner, token, flat, pos = owner[order], token[order], flat[order], pos[order]
    # the rows to send: one per (owner, token); ``row`` numbers them within each owner's block
    keys, row = torch.unique_consecutive(owner * T + token, return_inverse=True)
    row_token, row_owner = keys % max(T, 1), keys // max(T, 1)
    send_rows = torch.bincount(row_owner, minlength=shard.world)
    send_pairs = torch.bincount(owner, minlength=shard.world)
    row = row - (torch.cumsum(send_rows, 0) - send_rows)[owner]
    differentiable = torch.is_grad_enabled() and (
        x.requires_grad or weights.requires_grad
        or any(p.requires_grad for p in moe.parameters()))
    # counts and each rank's modes in one exchange: a rank that needs gradients while another
    # does not would wait forever in its backward exchange, one in train mode in the sigmoid
    # router's all-reduce, so all of them stop here
    mode = int(differentiable) + 2 * int(moe.training)
    header = torch.stack([send_rows, send_pairs, torch.full_like(send_rows, mode)], dim=1)
    received = torch.empty_like(header)
    dist.all_to_all_single(received, header, group=shard.group)
    if bool((received[:, 2] != mode).any()):
        raise ExpertParallelError(
            "the ranks run this MoE layer in different modes (gradients on some, off on "
            "others, or train() on some, eval() on others): every rank must run each forward "
            "and backward together, in the same modes (torch.no_grad / inference_mode and "
            "model.train() / eval() on all ranks alike)")
    rows_out, pairs_out = send_rows.tolist(), send_pairs.tolist()
    rows_in, pairs_in = received[:, 0].tolist(), received[:, 1].tolist()
    starts = torch.tensor(shard.bounds[:-1], dtype=flat.dtype, device=flat.device)
    meta = torch.stack([flat - starts[owner], row], dim=1)  # (local expert, row) per pair
    recv_meta = meta.new_empty(sum(pairs_in), 2)
    dist.all_to_all_single(recv_meta, meta, pairs_in, pairs_out, group=shard.group)
    exchange = _exchange_with_grad if differentiable else _exchange
    send_x, send_w = x[row_token], w_flat[pos]
    if differentiable:
        # every rank must run each backward exchange in step, also one whose rows or weights
        # need no gradient (or that received none): a leaf that asks for one keeps them in
        # the graph
        if not send_x.requires_grad:
            send_x = send_x.detach().requires_grad_()
        if not send_w.requires_grad:
            send_w = send_w.detach().requires_grad_()
    recv_x = exchange(send_x, rows_in, rows_out, shard.group)
    recv_w = exchange(send_w[:, None], pairs_in, pairs_out, shard.group)
    # each pair's row in recv_x: its row within its sender's block, plus where that block is
    received_from = torch.repeat_interleave(
        torch.arange(shard.world, device=flat.device), received[:, 1])
    block_start = torch.cumsum(received[:, 0], 0) - received[:, 0]
    at = recv_meta[:, 1] + block_start[received_from]  # nondecreasing: a row's pairs adjoin
    if recv_meta.shape[0]:
        # the rows as tokens of the single-process kernels: (rows, slots) with each row's
        # pairs in its first slots; the rest weigh 0, which the kernels skip
        R = recv_x.shape[0]
        per_row = torch.bincount(at, minlength=R)
        slot = torch.arange(at.shape[0], device=at.device) - (per_row.cumsum(0) - per_row)[at]
        width = int(per_row.max())
        row_w = recv_w.new_zeros(R, width).index_put((at, slot), recv_w[:, 0])
        row_ids = recv_meta.new_zeros(R, width).index_put((at, slot), recv_meta[:, 0])
        out = moe.run_experts(recv_x, row_w, row_ids)
    else:  # nothing arrived: still part of the graph, so the backward exchanges happen
        out = recv_x.new_zeros(0, moe.output_size) + recv_x.sum() * 0 + recv_w.sum() * 0
    back = exchange(out, rows_out, rows_in, shard.group)  # one row per (owner, token)
    return back.new_zeros(T, moe.output_size).index_add(0, row_token, back)  # (T, O)


def _exchange(rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int],
              group) -> torch.Tensor:
    out = rows.new_empty(sum(out_sizes), *rows.shape[1:])
    dist.all_to_all_single(out, rows.contiguous(), out_sizes, in_sizes, group=group)
    return out


def _exchange_with_grad(rows: torch.Tensor, out_sizes: list[int], in_sizes: list[int],
                        group) -> torch.Tensor:
    return _Exchange.apply(rows, out_sizes, in_sizes, group)


class _Exchange(torch.autograd.Function):
    """all_to_all_single whose backward is the reverse exchange of the gradients."""

    @staticmethod
    def forward(ctx, rows, out_sizes, in_sizes, group):
        ctx.sizes, ctx.group = (out_sizes, in_sizes), group
        return _exchange(rows, out_sizes, in_sizes, group)

    @staticmethod
    def backward(ctx, grad):
        out_sizes, in_sizes = ctx.sizes
        return _exchange(grad, in_sizes, out_sizes, ctx.group), None, None, None
