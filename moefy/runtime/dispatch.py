"""Sparse dispatch: tokens ⇒ sort by expert ⇒ per-expert GEMMs ⇒ weighted combine.

    x (T, H), weights (T, k), indices (T, k)
      → stable sort of the T·k (token, slot) pairs by expert   [plan_dispatch]
      → gather rows per expert → GEMM → activation (gate fused) → GEMM
      → scale by routing weight → scatter-add back to (T, H)

Three implementations share that shape:
- ``grouped_ffn``: plain PyTorch ops, differentiable, any device and dtype (the CUDA path
  uses ``torch.nn.functional.grouped_mm`` where it applies);
- ``PackedExperts``: CPU float32 inference with expert weights prepacked for oneDNN, fused
  activations, row counts bucketed so oneDNN's primitive cache hits, a reused workspace, and
  for decode-sized batches a sort-free loop over the touched experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moefy.activations import get_activation
from moefy.runtime.experts import ExpertWeights, expert_forward

# Up to this many tokens a GEMM costs about as much as reading its weights, whatever its row
# count, so the CPU path runs every touched expert on all tokens (zero weight where it was not
# chosen) and skips the sort, gather and scatter (benchmarks/bench_layer.py, decode rows).
SMALL_BATCH_TOKENS = 16
KERNEL_MAX_TOKENS = 64  # kMaxTokens in csrc/decode.cpp


class DispatchPlan(NamedTuple):
    """Where every (token, slot) pair goes, sorted by expert."""

    tokens: torch.Tensor  # (T·k,) token of each sorted pair
    slots: torch.Tensor  # (T·k,) flat index t·k + j of each sorted pair
    experts: torch.Tensor  # (T·k,) expert of each sorted pair (non-decreasing)
    counts: torch.Tensor  # (E,) pairs per expert; offsets are its exclusive cumsum


def plan_dispatch(indices: torch.Tensor, num_experts: int) -> DispatchPlan:
    """Sort the (token, slot) pairs of ``indices`` (T, k) by expert, stably."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    experts, slots = torch.sort(flat, stable=True)
    tokens = torch.div(slots, k, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts)
    return DispatchPlan(tokens, slots, experts, counts)


# --------------------------------------------------------------------------- generic path


def grouped_ffn(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                ew: ExpertWeights) -> torch.Tensor:
    """Differentiable dispatch with PyTorch ops; x (T, H) -> (T, H)."""
    if x.shape[0] == 0:
        return x.new_zeros(x.shape)
    if x.is_cuda and _grouped_mm_applies(x, ew):
        return _grouped_mm_ffn(x, weights, indices, ew)
    plan = plan_dispatch(indices, ew.num_experts)
    xs = x.index_select(0, plan.tokens)  # (T·k, H)
    outs = []
    start = 0
    for e, c in enumerate(plan.counts.tolist()):
        if c:
            outs.append(expert_forward(xs[start : start + c], ew, e))
            start += c
    w = weights.reshape(-1).index_select(0, plan.slots).to(x.dtype)
    out = torch.cat(outs) * w[:, None]  # (T·k, H)
    return x.new_zeros(x.shape).index_add(0, plan.tokens, out)


def grouped_ffn_backward(grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                         indices: torch.Tensor, ew: ExpertWeights) -> list[torch.Tensor | None]:
    """Hand-written gradients of ``grouped_ffn`` w.r.t. (x, weights, w_in, w_out, w_gate, b_in,
    b_gate, b_out); ``None`` for an absent weight. Recomputes the hidden activations."""
    act = get_activation(ew.activation)
    plan = plan_dispatch(indices, ew.num_experts)
    xs = x.index_select(0, plan.tokens)  # (T·k, H)
    gs = grad.index_select(0, plan.tokens)  # (T·k, H)
    w = weights.reshape(-1).index_select(0, plan.slots).to(x.dtype)
    d_xs = torch.zeros_like(xs)
    d_w = torch.zeros_like(w)
    d = [None if t is None else torch.zeros_like(t) for t in ew[:6]]
    d_in, d_out, d_gate, d_bin, d_bgate, d_bout = d
    start = 0
    for e, c in enumerate(plan.counts.tolist()):
        if c == 0:
            continue
        rows = slice(start, start + c)
        xe, ge = xs[rows], gs[rows]
        a = F.linear(xe, ew.w_in[e], None if ew.b_in is None else ew.b_in[e])  # (c, I)
        if ew.w_gate is None:
            h = act.fn(a)
        else:
            z = F.linear(xe, ew.w_gate[e], None if ew.b_gate is None else ew.b_gate[e])
            gz = act.fn(z)
            h = gz * a
        out = F.linear(h, ew.w_out[e], None if ew.b_out is None else ew.b_out[e])  # (c, H)
        d_w[rows] = (ge * out).sum(1)
        d_o = ge * w[rows, None]  # (c, H)
        d_out[e] = d_o.t() @ h
        if d_bout is not None:
            d_bout[e] = d_o.sum(0)
        d_h = d_o @ ew.w_out[e]  # (c, I)
        if ew.w_gate is None:
            d_a = act.grad(d_h, a)
        else:
            d_a = d_h * gz
            d_z = act.grad(d_h * a, z)
            d_gate[e] = d_z.t() @ xe
            if d_bgate is not None:
                d_bgate[e] = d_z.sum(0)
            d_xs[rows] += d_z @ ew.w_gate[e]
        d_in[e] = d_a.t() @ xe
        if d_bin is not None:
            d_bin[e] = d_a.sum(0)
        d_xs[rows] += d_a @ ew.w_in[e]
        start += c
    d_x = torch.zeros_like(x).index_add_(0, plan.tokens, d_xs)
    d_weights = torch.zeros(weights.numel(), dtype=x.dtype, device=x.device)
    d_weights = d_weights.index_copy_(0, plan.slots, d_w).view_as(weights).to(weights.dtype)
    return [d_x, d_weights, *d]


def _grouped_mm_applies(x: torch.Tensor, ew: ExpertWeights) -> bool:
    # torch's grouped GEMM kernels take bf16 on sm80+ and need 16-byte aligned rows.
    if not hasattr(F, "grouped_mm") or x.dtype != torch.bfloat16:
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    return ew.hidden_size % 8 == 0 and ew.expert_size % 8 == 0


def _grouped_mm_ffn(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                    ew: ExpertWeights) -> torch.Tensor:
    """CUDA: one grouped GEMM per projection, no host synchronisation."""
    plan = plan_dispatch(indices, ew.num_experts)
    offs = torch.cumsum(plan.counts, 0, dtype=torch.int32)
    xs = x.index_select(0, plan.tokens)  # (T·k, H)

    def project(inp: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        out = F.grouped_mm(inp, w.transpose(-2, -1), offs=offs)  # w (E, N, K) -> (T·k, N)
        return out if b is None else out + b.index_select(0, plan.experts)

    act = get_activation(ew.activation).fn
    h = project(xs, ew.w_in, ew.b_in)
    h = act(h) if ew.w_gate is None else act(project(xs, ew.w_gate, ew.b_gate)) * h
    out = project(h, ew.w_out, ew.b_out)
    w = weights.reshape(-1).index_select(0, plan.slots).to(torch.float32)
    out = out.float() * w[:, None]
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    return y.index_add_(0, plan.tokens, out).to(x.dtype)


# --------------------------------------------------------------------------- CPU fast path


def _padded_rows(count: int) -> int:
    """Round a row count up so few distinct GEMM shapes occur (oneDNN JITs one per shape).

    Below 16 rows: exact. Then granularity 16 rows, or 1/16 of the count's power of two when
    larger: at most ~6% padding and about 16 shapes per doubling of the count.
    """
    if count < 16:
        return count  # at most 15 shapes; padding would multiply a decode batch's work
    step = max(16, (1 << (count.bit_length() - 1)) >> 4)
    return (count + step - 1) // step * step


def decode_ffn(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
               ew: ExpertWeights) -> torch.Tensor:
    """The C++ decode kernel (needs ``decode_kernels_available()``; float32, ≤ 64 tokens):
    every touched expert on every token, its weights read once from the stacked tensors."""
    w_in, w_out, w_gate, b_in, b_gate, b_out = (
        None if t is None else t.contiguous() for t in ew[:6])
    return torch.ops.moefy_cpu.decode_ffn(
        x.contiguous(), weights.to(x.dtype).contiguous(), indices.long().contiguous(),
        w_in, w_gate, b_in, b_gate, w_out, b_out, ew.activation)


def weights_key(ew: ExpertWeights) -> tuple:
    """Identity and version of every weight: a prepacked copy is stale when this changes."""
    return tuple(
        None if t is None else (t.data_ptr(), t._version, tuple(t.shape))
        for t in ew[:6]
    ) + (ew.activation,)


def packed_path_applies(x: torch.Tensor) -> bool:
    """True when ``PackedExperts`` can run ``x``: eager CPU float32 with oneDNN present."""
    if torch.compiler.is_compiling():
        return False
    return (
        type(x) is torch.Tensor  # not a FakeTensor, proxy or other subclass (tracing)
        and x.device.type == "cpu"
        and x.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
    )


class PackedExperts:
    """Expert weights prepacked for oneDNN, plus a reusable gather workspace.

    For CPU float32 inference. Holds a second copy of the expert weights in oneDNN's blocked
    layout; build it again when ``weights_key`` changes. Not safe to call from two threads at
    once (the workspace is shared).
    """

    def __init__(self, ew: ExpertWeights):
        reorder = torch.ops.mkldnn._reorder_linear_weight
        detached = ExpertWeights(
            *(t.detach().contiguous() if isinstance(t, torch.Tensor) else t for t in ew))
        self.ew = detached
        self.key = weights_key(ew)
        E = ew.num_experts
        self._in = [reorder(detached.w_in[e], None) for e in range(E)]
        self._out = [reorder(detached.w_out[e], None) for e in range(E)]
        self._gate = (
            None if ew.w_gate is None
            else [reorder(detached.w_gate[e], None) for e in range(E)]
        )
        act = get_activation(ew.activation)
        self._act = act
        self._post = act.onednn or ("none", "")
        self._xs = torch.empty(0)
        self.small_batch_tokens = SMALL_BATCH_TOKENS

    def _workspace(self, rows: int, cols: int) -> torch.Tensor:
        # Grow-only: a fresh multi-MB buffer per call costs page faults on every forward.
        if self._xs.numel() < rows * cols:
            self._xs = torch.empty(rows * cols)
        return self._xs[: rows * cols].view(rows, cols)

    def _hidden(self, xe: torch.Tensor, e: int) -> torch.Tensor:
        linear = torch.ops.mkldnn._linear_pointwise
        attr, algo = self._post
        b_in = None if self.ew.b_in is None else self.ew.b_in[e]
        if self._gate is None:
            h = linear(xe, self._in[e], b_in, attr, [], algo)
            return h if self._act.onednn else self._act.fn(h)
        b_gate = None if self.ew.b_gate is None else self.ew.b_gate[e]
        g = linear(xe, self._gate[e], b_gate, attr, [], algo)
        if not self._act.onednn:
            g = self._act.fn(g)
        return linear.binary(xe, g, self._in[e], b_in, "mul")  # (xe W_in^T + b_in) * g

    def _all_tokens(self, x: torch.Tensor, weights: torch.Tensor,
                    indices: torch.Tensor) -> torch.Tensor:
        """Decode batches without the C++ kernel (``decode_ffn``, which ``MoE`` prefers): each
        touched expert on every token, weighted 0 where not chosen."""
        T, E = x.shape[0], self.ew.num_experts
        combine = x.new_zeros(T, E).scatter_add_(1, indices.long(), weights.to(x.dtype))
        y = x.new_zeros(T, self.ew.hidden_size)
        linear = torch.ops.mkldnn._linear_pointwise
        for e in sorted(set(indices.reshape(-1).tolist())):
            h = self._hidden(x, e).mul_(combine[:, e : e + 1])  # (T, I)
            y = linear.binary(h, y, self._out[e], None, "add")  # h W_out^T + y
        if self.ew.b_out is not None:
            y.addmm_(combine, self.ew.b_out)  # sum_j w_j b_out[e_j]
        return y

    def __call__(self, x: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
        T, k = indices.shape
        if T == 0:
            return x.new_zeros(x.shape)
        x = x.contiguous()
        if T <= self.small_batch_tokens:
            return self._all_tokens(x, weights, indices)
        E, H = self.ew.num_experts, self.ew.hidden_size
        plan = plan_dispatch(indices, E)
        counts = plan.counts.tolist()
        rows = [_padded_rows(c) for c in counts]
        # Each expert's rows start at a padded offset; padding rows gather token 0 and are
        # computed but never read back.
        pad_start = torch.tensor(rows).cumsum(0) - torch.tensor(rows)
        shift = pad_start - (plan.counts.cumsum(0) - plan.counts)  # (E,)
        pos = torch.arange(T * k) + shift.index_select(0, plan.experts)  # (T·k,)
        gather = torch.zeros(sum(rows), dtype=torch.long).index_copy_(0, pos, plan.tokens)
        xs = self._workspace(sum(rows), H)
        torch.index_select(x, 0, gather, out=xs)  # (rows, H)
        w = weights.reshape(-1).index_select(0, plan.slots).to(x.dtype)  # (T·k,)

        linear = torch.ops.mkldnn._linear_pointwise
        y = x.new_zeros(T, H)
        start = pad = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            h = self._hidden(xs[pad : pad + rows[e]], e)  # (rows_e, I)
            # Scaling the hidden rows (I wide) is cheaper than scaling outputs (H wide).
            h[:c].mul_(w[start : start + c, None])
            out = linear(h, self._out[e], None, "none", [], "")  # (rows_e, H)
            y.index_add_(0, plan.tokens[start : start + c], out[:c])
            start += c
            pad += rows[e]
        if self.ew.b_out is not None:
            # sum_j w_j b_out[e_j] as one small GEMM: (T, E) @ (E, H)
            combine = x.new_zeros(T, E).scatter_add_(1, indices.long(), weights.to(x.dtype))
            y.addmm_(combine, self.ew.b_out)
        return y
