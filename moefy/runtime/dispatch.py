"""Sparse dispatch: tokens ⇒ sort by expert ⇒ per-expert GEMMs ⇒ weighted combine.

    x (T, H), weights (T, k), indices (T, k)
      → stable sort of the T·k (token, slot) pairs by expert   [plan_dispatch]
      → gather rows per expert → GEMM → activation (gate fused) → GEMM
      → scale by routing weight → scatter-add back to (T, O)  (O: the output width, H or not)

Implementations that share that shape, chosen per call by ``ExpertRunner``:
- ``grouped_ffn``: plain PyTorch ops, differentiable, any device and dtype (the CUDA path
  uses ``torch.nn.functional.grouped_mm`` where it applies);
- ``masked_dense_ffn``: training with small experts, every expert on every token in two large
  GEMMs with the unselected ones masked out;
- ``PackedExperts``: CPU float32 inference with expert weights prepacked for oneDNN, fused
  activations, row counts bucketed so oneDNN's primitive cache hits, a per-thread workspace,
  and for decode-sized batches a sort-free loop over the touched experts;
- ``decode_ffn``: the C++ kernel for a few tokens.

A slot whose routing weight is exactly 0 (top-p and expert-choice padding, dropped
assignments) contributes nothing: it is not computed, or masked with ``where`` — never
multiplied by 0, which would turn an expert's inf into a NaN.
"""

from __future__ import annotations

import threading
from typing import NamedTuple

import torch
import torch.nn.functional as F

from moefy.activations import ACTIVATIONS, get_activation
from moefy.runtime.experts import ExpertWeights, expert_forward
from moefy.runtime.kernels import decode_kernels_available

# Up to this many tokens a GEMM costs about as much as reading its weights, whatever its row
# count, so the CPU path runs every touched expert on all tokens (zero weight where it was not
# chosen) and skips the sort, gather and scatter (benchmarks/bench_layer.py, decode rows).
SMALL_BATCH_TOKENS = 16
KERNEL_MAX_TOKENS = 64  # kMaxTokens in csrc/decode.cpp
KERNEL_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "squared_relu", "quick_gelu",
                      "hardswish")  # parse_activation in csrc/decode.cpp
# Training with small experts: every expert for every token in two large GEMMs, unselected
# entries masked to zero, beats a per-expert loop of small GEMMs forward and backward when
# the (tokens, E·I) hidden tensor stays this small.
MASKED_MAX_ELEMENTS = 1 << 26


class DispatchPlan(NamedTuple):
    """Where every (token, slot) pair goes, sorted by expert."""

    tokens: torch.Tensor  # (T·k,) token of each sorted pair
    slots: torch.Tensor  # (T·k,) flat index t·k + j of each sorted pair
    experts: torch.Tensor  # (T·k,) expert of each sorted pair (non-decreasing)
    counts: torch.Tensor  # (E,) pairs per expert; offsets are its exclusive cumsum


def plan_dispatch(indices: torch.Tensor, num_experts: int,
                  weights: torch.Tensor | None = None) -> DispatchPlan:
    """Sort the (token, slot) pairs of ``indices`` (T, k) by expert, stably. With ``weights``,
    pairs of weight exactly 0 sort last (as expert E) and ``counts`` leaves them out: the
    first ``counts.sum()`` sorted pairs are the live ones."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    if weights is not None:
        flat = torch.where(weights.reshape(-1) != 0, flat, num_experts)
    experts, slots = torch.sort(flat, stable=True)
    tokens = torch.div(slots, k, rounding_mode="floor")
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    return DispatchPlan(tokens, slots, experts, counts)


# --------------------------------------------------------------------------- generic path


def grouped_ffn(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                ew: ExpertWeights) -> torch.Tensor:
    """Differentiable dispatch with PyTorch ops; x (T, H) -> (T, O)."""
    if x.shape[0] == 0:
        return x.new_zeros(0, ew.output_size)
    if x.is_cuda and _grouped_mm_applies(x, ew):
        return _grouped_mm_ffn(x, weights, indices, ew)
    plan = plan_dispatch(indices, ew.num_experts, weights)
    live = int(plan.counts.sum())
    tokens = plan.tokens[:live]
    xs = x.index_select(0, tokens)  # (n, H)
    outs = []
    start = 0
    for e, c in enumerate(plan.counts.tolist()):
        if c:
            outs.append(expert_forward(xs[start : start + c], ew, e))
            start += c
    if not outs:
        return x.new_zeros(x.shape[0], ew.output_size)
    w = weights.reshape(-1).index_select(0, plan.slots[:live]).to(x.dtype)
    out = torch.cat(outs) * w[:, None]  # (n, O)
    return x.new_zeros(x.shape[0], ew.output_size).index_add(0, tokens, out)


def masked_dense_ffn(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                     ew: ExpertWeights) -> torch.Tensor:
    """Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]) computed as one masked dense FFN
    (differentiable by autograd, no data-dependent shapes, so it also traces; the same
    values as the sparse dispatch)."""
    E, I, H = ew.w_in.shape
    O = ew.output_size
    t = x.shape[0]
    gate = x.new_zeros(t, E).index_put_(  # (T, E) routing weight of every expert
        (torch.arange(t, device=x.device).unsqueeze(1).expand_as(indices), indices),
        weights.to(x.dtype), accumulate=True)
    act = get_activation(ew.activation).fn
    flat = lambda w: w.reshape(E * I, H)  # noqa: E731
    bias = lambda b: None if b is None else b.reshape(E * I)  # noqa: E731
    h = F.linear(x, flat(ew.w_in), bias(ew.b_in))  # (T, E·I)
    if ew.w_gate is not None:
        h = act(F.linear(x, flat(ew.w_gate), bias(ew.b_gate))) * h
    else:
        h = act(h)
    g = gate.unsqueeze(-1)  # (T, E, 1)
    # where, not a product: an unselected expert's inf must not become 0·inf = NaN
    h = torch.where(g != 0, h.view(t, E, I) * g, 0).view(t, E * I)
    y = h @ ew.w_out.permute(1, 0, 2).reshape(O, E * I).t()  # (T, O)
    if ew.b_out is not None:
        y = y + gate @ ew.b_out
    return y


def grouped_ffn_backward(grad: torch.Tensor, x: torch.Tensor, weights: torch.Tensor,
                         indices: torch.Tensor, ew: ExpertWeights) -> list[torch.Tensor | None]:
    """Hand-written gradients of ``grouped_ffn`` w.r.t. (x, weights, w_in, w_out, w_gate, b_in,
    b_gate, b_out); ``None`` for an absent weight. Recomputes the hidden activations."""
    act = get_activation(ew.activation)
    plan = plan_dispatch(indices, ew.num_experts)
    xs = x.index_select(0, plan.tokens)  # (T·k, H)
    gs = grad.index_select(0, plan.tokens)  # (T·k, O)
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
        out = F.linear(h, ew.w_out[e], None if ew.b_out is None else ew.b_out[e])  # (c, O)
        d_w[rows] = (ge * out).sum(1)
        d_o = ge * w[rows, None]  # (c, O)
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
    return ew.hidden_size % 8 == 0 and ew.expert_size % 8 == 0 and ew.output_size % 8 == 0


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
    w = weights.reshape(-1).index_select(0, plan.slots).to(torch.float32)[:, None]
    out = torch.where(w != 0, out.float() * w, 0)  # weight 0: not chosen, even if inf
    y = torch.zeros(x.shape[0], ew.output_size, dtype=torch.float32, device=x.device)
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
        w_in, w_gate, b_in, b_gate, w_out, b_out, get_activation(ew.activation).name)


def _row_sample(t: torch.Tensor) -> torch.Tensor:
    """One element of every row of a stacked weight (E, R, C), at a column that moves with
    the row: a cheap content fingerprint that any edit of a whole row, expert or tensor
    changes."""
    rows, cols = t.shape[0] * t.shape[1], t.shape[-1]
    r = torch.arange(rows, device=t.device)
    return t.detach().reshape(rows, cols)[r, (r * 40503) % cols].clone()


def weights_key(ew: ExpertWeights) -> tuple:
    """Identity, version and layout of every weight: a prepacked copy is stale when this
    changes. Inference tensors have no version counter, and edits through ``.data`` bypass
    it: ``PackedExperts.matches`` also compares a sampled fingerprint of the contents."""
    return tuple(
        None if t is None else (t.data_ptr(), tuple(t.shape), t.dtype, t.is_contiguous(),
                                None if t.is_inference() else t._version)
        for t in ew[:6]
    ) + (get_activation(ew.activation).name,)


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


_WORKSPACE = threading.local()  # PackedExperts' gather buffer: one per thread, for all layers


class PackedExperts:
    """Expert weights prepacked for oneDNN, plus a reusable gather workspace per thread.

    For CPU float32 inference. Holds a second copy of the expert weights in oneDNN's blocked
    layout; build it again when ``matches`` turns false. Safe to call from several threads
    at once (each thread has its own workspace; the packed weights are only read).
    """

    def __init__(self, ew: ExpertWeights):
        reorder = torch.ops.mkldnn._reorder_linear_weight
        detached = ExpertWeights(
            *(t.detach().contiguous() if isinstance(t, torch.Tensor) else t for t in ew))
        self.ew = detached
        self.key = weights_key(ew)
        self._samples = [None if t is None else _row_sample(t) for t in ew[:3]]
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
        self.small_batch_tokens = SMALL_BATCH_TOKENS

    def matches(self, ew: ExpertWeights) -> bool:
        """Whether the packed copy still holds ``ew``'s values: same tensors, versions and
        sampled contents (the biases are read in place, never copied)."""
        if weights_key(ew) != self.key:
            return False
        return all(s is None or torch.equal(s, _row_sample(t))
                   for s, t in zip(self._samples, ew[:3], strict=True))

    @staticmethod
    def _workspace(rows: int, cols: int) -> torch.Tensor:
        # Grow-only, one per thread and shared by every layer (a thread runs one layer at a
        # time): a fresh multi-MB buffer per call costs page faults on every forward, a shared
        # one across threads would mix their tokens, and one per layer held a buffer of the
        # largest batch in each of a model's layers (15-20 GB for SmolLM2 at E64 top-32).
        buf = getattr(_WORKSPACE, "xs", None)
        if buf is None or buf.numel() < rows * cols:
            with torch.inference_mode(False):  # a normal tensor: writable in every mode
                _WORKSPACE.xs = None  # let the old one go before the larger one is made
                buf = _WORKSPACE.xs = torch.empty(rows * cols)
        return buf[: rows * cols].view(rows, cols)

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
        touched expert on every token, masked out where not chosen."""
        T, E = x.shape[0], self.ew.num_experts
        combine = x.new_zeros(T, E).scatter_add_(1, indices.long(), weights.to(x.dtype))
        y = x.new_zeros(T, self.ew.output_size)
        linear = torch.ops.mkldnn._linear_pointwise
        touched = torch.unique(indices.reshape(-1)[weights.reshape(-1) != 0]).tolist()
        for e in touched:
            w = combine[:, e : e + 1]
            h = torch.where(w != 0, self._hidden(x, e) * w, 0)  # (T, I); not 0·inf
            y = linear.binary(h, y, self._out[e], None, "add")  # h W_out^T + y
        if self.ew.b_out is not None:
            y.addmm_(combine, self.ew.b_out)  # sum_j w_j b_out[e_j]
        return y

    def __call__(self, x: torch.Tensor, weights: torch.Tensor,
                 indices: torch.Tensor) -> torch.Tensor:
        T, k = indices.shape
        if T == 0:
            return x.new_zeros(0, self.ew.output_size)
        x = x.contiguous()
        if T <= self.small_batch_tokens:
            return self._all_tokens(x, weights, indices)
        E, H = self.ew.num_experts, self.ew.hidden_size
        plan = plan_dispatch(indices, E, weights)
        counts = plan.counts.tolist()
        live = sum(counts)
        rows = [_padded_rows(c) for c in counts]
        # Each expert's rows start at a padded offset; padding rows gather token 0 and are
        # computed but never read back.
        pad_start = torch.tensor(rows).cumsum(0) - torch.tensor(rows)
        shift = pad_start - (plan.counts.cumsum(0) - plan.counts)  # (E,)
        experts, tokens = plan.experts[:live], plan.tokens[:live]
        pos = torch.arange(live) + shift.index_select(0, experts)  # (n,)
        gather = torch.zeros(sum(rows), dtype=torch.long).index_copy_(0, pos, tokens)
        xs = self._workspace(sum(rows), H)
        torch.index_select(x, 0, gather, out=xs)  # (rows, H)
        w = weights.reshape(-1).index_select(0, plan.slots[:live]).to(x.dtype)  # (n,)

        linear = torch.ops.mkldnn._linear_pointwise
        y = x.new_zeros(T, self.ew.output_size)
        start = pad = 0
        for e, c in enumerate(counts):
            if c == 0:
                continue
            h = self._hidden(xs[pad : pad + rows[e]], e)  # (rows_e, I)
            # Scaling the hidden rows (I wide) is cheaper than scaling outputs (H wide).
            h[:c].mul_(w[start : start + c, None])
            out = linear(h, self._out[e], None, "none", [], "")  # (rows_e, O)
            y.index_add_(0, tokens[start : start + c], out[:c])
            start += c
            pad += rows[e]
        if self.ew.b_out is not None:
            # sum_j w_j b_out[e_j] as one small GEMM: (T, E) @ (E, O)
            combine = x.new_zeros(T, E).scatter_add_(1, indices.long(), weights.to(x.dtype))
            y.addmm_(combine, self.ew.b_out)
        return y


# --------------------------------------------------------------------------- kernel choice


def _tracing(x: torch.Tensor) -> bool:
    """Under torch.compile / torch.export (fake or proxy tensors): no eager-only paths."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


class ExpertRunner:
    """Runs an MoE layer's routed experts, choosing the implementation per call, and keeps
    the layer's oneDNN-prepacked weights (rebuilt when they go stale; ``invalidate`` drops
    them). Thread-safe: calls may run concurrently.

    - training with gradients, small enough: ``masked_dense_ffn`` (two large GEMMs);
    - a custom element-wise activation: ``grouped_ffn`` eagerly (autograd through plain ops),
      ``masked_dense_ffn`` under tracing (no data-dependent shapes);
    - CPU float32 without gradients: ``decode_ffn`` (C++) up to 16 tokens, else
      ``PackedExperts`` (when ``prepack``);
    - everything else: the ``moefy::expert_ffn`` operator (one node for export/compile).
    """

    def __init__(self):
        self._packed: PackedExperts | None = None
        self._lock = threading.Lock()

    def invalidate(self) -> None:
        """Forget the prepacked weights; the next call packs them again."""
        self._packed = None

    def packed(self, ew: ExpertWeights) -> PackedExperts:
        packed = self._packed
        if packed is None or not packed.matches(ew):
            with self._lock:  # one thread packs; the others wait for it
                packed = self._packed
                if packed is None or not packed.matches(ew):
                    packed = self._packed = PackedExperts(ew)
        return packed

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                 ew: ExpertWeights, *, training: bool = False, prepack: bool = True,
                 capacity_factor: float | None = None) -> torch.Tensor:
        act = get_activation(ew.activation)
        custom = act.name not in ACTIVATIONS
        needs_grad = _needs_grad(x, weights, ew)
        tracing = _tracing(x)
        small = x.shape[0] * ew.num_experts * ew.expert_size <= MASKED_MAX_ELEMENTS
        if needs_grad and training and small and not torch.compiler.is_compiling():
            return masked_dense_ffn(x, weights, indices, ew)
        if custom:
            if tracing:
                return masked_dense_ffn(x, weights, indices, ew)
            return grouped_ffn(x, weights, indices, ew)
        if packed_path_applies(x) and not needs_grad:
            if (x.shape[0] <= SMALL_BATCH_TOKENS and act.name in KERNEL_ACTIVATIONS
                    and decode_kernels_available()):
                return decode_ffn(x, weights, indices, ew)  # reads the weights as they are
            if prepack:
                return self.packed(ew)(x, weights, indices)
        return torch.ops.moefy.expert_ffn(x, weights, indices, *ew[:6], act.name,
                                          float(capacity_factor or 0.0))

    def __getstate__(self):
        return {}  # oneDNN-layout tensors and locks neither pickle nor deepcopy

    def __setstate__(self, state):
        self.__init__()


def _needs_grad(x: torch.Tensor, weights: torch.Tensor, ew: ExpertWeights) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or weights.requires_grad or any(
        p.requires_grad for p in ew[:6] if p is not None)
