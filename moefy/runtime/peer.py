"""PEER's kernels. The fused single-neuron experts: retrieved rows ⇒ dot → activation →
weighted sum,

    x (T, H), ids (T, S), weights (T, S), down / up / gate (N, H), down_bias (N,)  ⇒  y (T, H)
    pre = down[i]·x_t + down_bias[i];  h = act(pre), or gated act(gate[i]·x_t) * pre
    y_t = sum_s weights[t, s] * h * up[i]                        (i = ids[t, s])

and the retrieval's GEMMs and search:

    q (T, heads, d), keys_a (n₁, d/2), keys_b (n₂, d/2)
      ⇒  s_a (T, heads, n₁), s_b (T, heads, n₂)
      ⇒  product-key top-k  ⇒  scores, ids a·n₂ + b (T, heads, k)

The experts have three implementations, chosen per call by ``peer_experts``:
- the C++ kernel (``torch.ops.moefy_cpu.peer_forward`` / ``peer_backward``, CPU float32,
  eager): reads each retrieved row once, never holds (T, S, H); its backward sorts the
  (token, slot) pairs by expert instead of using atomics;
- ``_peer_chunked``: plain PyTorch ops, any device and dtype, chunks of tokens whose gathered
  rows stay under ``CHUNK_BYTES``, the output side fused by ``F.embedding_bag``;
- ``_peer_gather``: one gather-based expression with no data-dependent shapes, for
  torch.compile / torch.export / FX tracing (what ONNX gets).

``peer_experts_reference`` is the per-token loop they are all tested against. A slot whose
weight is exactly 0 is never computed (its rows may hold inf; 0 * inf would be NaN) and
passes no gradient, in every implementation.

The retrieval's GEMMs and product-key search, chosen per call likewise, are
``moefy.runtime.peer_search``.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moefy.activations import ACTIVATIONS, Activation, get_activation
from moefy.errors import InputError, TrainingInputError
from moefy.runtime.kernels import peer_kernels_available

# Gathered rows one chunk of the PyTorch path may hold at once (per table it gathers).
CHUNK_BYTES = 64 << 20
# The activations csrc/peer.cpp implements (forward and derivative).
KERNEL_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "squared_relu", "quick_gelu",
                      "hardswish")

Tensor = torch.Tensor


def peer_experts(x: Tensor, ids: Tensor, weights: Tensor, down: Tensor, up: Tensor, *,
                 down_bias: Tensor | None = None, gate: Tensor | None = None,
                 activation="gelu", sparse: bool = False) -> Tensor:
    """The weighted sum of the single-neuron experts each token retrieved.

    ``y[t] = sum_s weights[t, s] * e_{ids[t, s]}(x[t])`` with ``e_i(x) = act(down[i]·x +
    down_bias[i]) * up[i]``, or gated ``act(gate[i]·x) * (down[i]·x + down_bias[i]) * up[i]``.
    Differentiable in ``x``, ``weights`` and the tables; with ``sparse=True`` the gradients of
    ``down``, ``up``, ``gate`` and ``down_bias`` are coalesced sparse COO tensors (for
    ``torch.optim.SparseAdam``), else dense. ``ids`` must lie in ``[0, N)``.

    >>> x, down, up = torch.randn(3, 8), torch.randn(100, 8), torch.randn(100, 8)
    >>> ids, weights = torch.randint(0, 100, (3, 4)), torch.rand(3, 4)
    >>> peer_experts(x, ids, weights, down, up, activation="relu").shape
    torch.Size([3, 8])
    """
    act = _activation(activation)
    tracing = _tracing(x)
    if not isinstance(x, torch.fx.Proxy):
        _check_inputs(x, ids, weights, down, up, down_bias, gate, sparse, tracing)
    if tracing:
        return _peer_gather(x, ids, weights, down, up, down_bias, gate, act)
    if _kernel_applies(x, weights, down, up, down_bias, gate, act):
        x, ids, weights = x.contiguous(), ids.contiguous(), weights.contiguous()
        if _needs_grad(x, weights, down, up, down_bias, gate):
            return _PeerKernel.apply(x, ids, weights, down, up, down_bias, gate, act.name,
                                     sparse)
        return torch.ops.moefy_cpu.peer_forward(x, ids, weights, down, up, down_bias, gate,
                                                act.name)[0]
    return _peer_chunked(x, ids, weights, down, up, down_bias, gate, act, sparse)


def peer_experts_reference(x: Tensor, ids: Tensor, weights: Tensor, down: Tensor, up: Tensor,
                           *, down_bias: Tensor | None = None, gate: Tensor | None = None,
                           activation="gelu") -> Tensor:
    """The naive oracle: one token and one slot at a time, accumulated in float32 (float64
    for float64 inputs); slots of weight exactly 0 skipped. Differentiable (dense grads)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    act = get_activation(activation).fn
    rows = []
    for t in range(x.shape[0]):
        xt = x[t].to(acc)
        out = xt.new_zeros(xt.shape)
        for s in range(ids.shape[1]):
            if weights[t, s] == 0:
                continue
            i = int(ids[t, s])
            pre = down[i].to(acc) @ xt
            if down_bias is not None:
                pre = pre + down_bias[i].to(acc)
            h = act(pre) if gate is None else act(gate[i].to(acc) @ xt) * pre
            out = out + weights[t, s].to(acc) * h * up[i].to(acc)
        rows.append(out)
    if not rows:
        return x.clone()  # (0, H): empty, but attached to x for autograd
    return torch.stack(rows).to(x.dtype)


def advise_huge_pages(table: Tensor) -> bool:
    """Ask the OS to back a large CPU tensor with transparent huge pages; True when the hint
    was taken (needs the C++ kernels, Linux, a tensor of at least 4 MiB).

    A forward reads random 1 KiB rows of GiB tables, and with 4 KiB pages almost every row
    misses the TLB. Call it on a freshly allocated table before it is first written (pages
    already written are merged only later, in the background):

    >>> down = torch.empty(1024, 1024)
    >>> advised = advise_huge_pages(down)  # False where unavailable: only a hint
    >>> _ = torch.nn.init.normal_(down)
    """
    if table.device.type != "cpu" or not peer_kernels_available():
        return False
    return bool(torch.ops.moefy_cpu.advise_huge_pages(table))


# --------------------------------------------------------------------------- checks, choice


def _activation(activation) -> Activation:
    try:
        return get_activation(activation)
    except ValueError as exc:
        raise InputError(f"peer_experts: {exc}") from None


def _tracing(x) -> bool:
    """Under torch.compile / torch.export / FX or JIT tracing: no eager-only paths (no
    data-dependent shapes, no Python loop over the token count, no C++ kernel)."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing()
            or type(x) not in (torch.Tensor, torch.nn.Parameter))


def _check_inputs(x, ids, weights, down, up, down_bias, gate, sparse, tracing) -> None:
    def fail(msg: str):
        raise InputError(f"peer_experts: {msg}")

    for name, t in (("x", x), ("ids", ids), ("weights", weights), ("down", down), ("up", up),
                    ("down_bias", down_bias), ("gate", gate)):
        if t is not None and not isinstance(t, torch.Tensor):
            fail(f"{name} must be a tensor, got {type(t).__name__}")
    if not isinstance(sparse, bool):
        fail(f"sparse must be True or False, got {sparse!r}")
    if x.dim() != 2 or not x.dtype.is_floating_point:
        fail(f"x must be a floating-point (T, H) tensor, got {x.dtype} of shape "
             f"{tuple(x.shape)}; flatten leading dimensions first")
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.shape[0] != x.shape[0]:
        fail(f"ids must be int64 of shape (T, S) with T = {x.shape[0]}, got {ids.dtype} of "
             f"shape {tuple(ids.shape)}")
    if weights.shape != ids.shape or weights.dtype != x.dtype:
        fail(f"weights must be {x.dtype} of shape {tuple(ids.shape)} (like ids, in x's "
             f"dtype), got {weights.dtype} of shape {tuple(weights.shape)}")
    if down.dim() != 2 or down.shape[1] != x.shape[1]:
        fail(f"down must be (N, H) with H = {x.shape[1]}, got shape {tuple(down.shape)}")
    tables = (("up", up), ("gate", gate))
    for name, t in tables:
        if t is not None and t.shape != down.shape:
            fail(f"{name} must have down's shape {tuple(down.shape)}, got {tuple(t.shape)}")
    if down_bias is not None and tuple(down_bias.shape) != (down.shape[0],):
        fail(f"down_bias must be (N,) = ({down.shape[0]},), got {tuple(down_bias.shape)}")
    for name, t in (("weights", weights), ("down", down)) + tables + (("down_bias",
                                                                         down_bias),):
        if t is not None and (t.dtype != x.dtype or t.device != x.device):
            fail(f"{name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; cast "
                 "them to one dtype and device")
    if ids.device != x.device:
        fail(f"ids is on {ids.device} but x is on {x.device}")
    if not tracing and ids.numel() > 0:
        lo, hi = torch.aminmax(ids)  # one cheap pass; an index out of range would crash
        if lo < 0 or hi >= down.shape[0]:
            fail(f"ids must lie in [0, {down.shape[0]}), got values in [{int(lo)}, {int(hi)}]")


def _kernel_applies(x, weights, down, up, down_bias, gate, act: Activation) -> bool:
    """The C++ kernel runs eager CPU float32 with tables it can read in place."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or act.name not in KERNEL_ACTIVATIONS:
        return False
    if ACTIVATIONS.get(act.name) is not act:  # a custom function that borrowed a name
        return False
    tables = [t for t in (down, up, down_bias, gate) if t is not None]
    # a non-contiguous table would be copied whole (GiBs): the chunked path reads it as it is
    return all(t.is_contiguous() for t in tables) and peer_kernels_available()


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors)


# --------------------------------------------------------------------------- C++ kernel


def _table_grad(uniq: Tensor, values: Tensor, size: torch.Size, sparse: bool) -> Tensor:
    """Rows for the unique ids (ascending) as the gradient of a whole (N, ...) table."""
    if sparse:
        return torch.sparse_coo_tensor(uniq[None], values, size, is_coalesced=True,
                                       check_invariants=False)
    return values.new_zeros(size).index_copy_(0, uniq, values)


def first_order(backward):
    """For a hand-written backward with no derivative of its own. Under ``create_graph=True``
    (a gradient penalty, Hessian-vector products) its result would carry no graph and the
    second-order terms would silently vanish (torch's ``once_differentiable`` catches that
    only when the incoming gradient itself requires grad): a clear error instead."""
    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise TrainingInputError(
                "moefy's PEER kernels have no second derivative: a backward with "
                "create_graph=True (gradient penalties, double backward) is not supported; "
                "take first-order gradients only")
        return backward(ctx, *grads)
    return wrapper


class _PeerKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, ids, weights, down, up, down_bias, gate, activation, sparse):
        y, pre, gpre = torch.ops.moefy_cpu.peer_forward(x, ids, weights, down, up, down_bias,
                                                        gate, activation)
        # (T, S) pre-activations: the backward recomputes nothing but reads the rows again
        ctx.save_for_backward(x, ids, weights, down, up, down_bias, gate, pre, gpre)
        ctx.activation, ctx.sparse = activation, sparse
        return y

    @staticmethod
    @first_order
    def backward(ctx, grad_y):
        x, ids, weights, down, up, down_bias, gate, pre, gpre = ctx.saved_tensors
        need_x, _, need_w, need_down, need_up, need_bias, need_gate = ctx.needs_input_grad[:7]
        gx, gw, uniq, g_down, g_up, g_gate, g_bias = torch.ops.moefy_cpu.peer_backward(
            grad_y.contiguous(), x, ids, weights, down, up, down_bias, gate, pre, gpre,
            ctx.activation, need_x, need_w, need_down, need_up, need_gate, need_bias)

        def table(need: bool, values: Tensor, like: Tensor | None) -> Tensor | None:
            return _table_grad(uniq, values, like.shape, ctx.sparse) if need else None

        return (gx if need_x else None, None, gw if need_w else None,
                table(need_down, g_down, down), table(need_up, g_up, up),
                table(need_bias, g_bias, down_bias), table(need_gate, g_gate, gate),
                None, None)




# --------------------------------------------------------------------------- PyTorch paths


class _GatherScalars(torch.autograd.Function):
    """``table[ids]`` for a 1-D table whose gradient may have to be sparse (an
    ``F.embedding`` of a (N, 1) view cannot give a sparse gradient back through the view)."""

    @staticmethod
    def forward(ctx, table, ids, sparse):
        ctx.save_for_backward(ids)
        ctx.n, ctx.sparse = table.shape[0], sparse
        return table[ids]

    @staticmethod
    @first_order
    def backward(ctx, grad):
        (ids,) = ctx.saved_tensors
        flat, g = ids.reshape(-1), grad.reshape(-1)
        if ctx.sparse:
            grad = torch.sparse_coo_tensor(flat[None], g, (ctx.n,), check_invariants=False)
            return grad.coalesce(), None, None
        return g.new_zeros(ctx.n).index_add_(0, flat, g), None, None


class _CoalescedGrad(torch.autograd.Function):
    """Identity whose backward coalesces a sparse gradient: the per-chunk (and per-gather)
    sparse gradients of a table come back as one with unique, sorted indices."""

    @staticmethod
    def forward(ctx, table):
        return table.view_as(table)

    @staticmethod
    @first_order
    def backward(ctx, grad):
        return grad.coalesce() if grad.is_sparse else grad


def _hidden(pre: Tensor, gate_dot: Tensor | None, act: Activation) -> Tensor:
    return act.fn(pre) if gate_dot is None else act.fn(gate_dot) * pre


def _peer_chunk(x, ids, weights, down, up, down_bias, gate, act, sparse) -> Tensor:
    """One chunk of tokens, eager. Slots of weight 0 are dropped before anything is
    gathered (variable-size bags for ``embedding_bag``)."""
    C, S = ids.shape
    live = weights != 0
    if bool(live.all()):
        rows = F.embedding(ids, down, sparse=sparse)  # (C, S, H)
        pre = torch.bmm(rows, x.unsqueeze(-1)).squeeze(-1)  # (C, S)
        gate_dot = None
        if gate is not None:
            gate_dot = torch.bmm(F.embedding(ids, gate, sparse=sparse), x.unsqueeze(-1))
            gate_dot = gate_dot.squeeze(-1)
        if down_bias is not None:
            pre = pre + _GatherScalars.apply(down_bias, ids, sparse)
        coef = weights * _hidden(pre, gate_dot, act)  # (C, S)
        return F.embedding_bag(ids, up, mode="sum", per_sample_weights=coef, sparse=sparse)
    pairs = live.reshape(-1).nonzero().squeeze(1)  # (P,) live (token, slot) pairs
    pid = ids.reshape(-1)[pairs]
    xg = x[pairs // S]  # (P, H)
    pre = (F.embedding(pid, down, sparse=sparse) * xg).sum(-1)  # (P,)
    gate_dot = None
    if gate is not None:
        gate_dot = (F.embedding(pid, gate, sparse=sparse) * xg).sum(-1)
    if down_bias is not None:
        pre = pre + _GatherScalars.apply(down_bias, pid, sparse)
    coef = weights.reshape(-1)[pairs] * _hidden(pre, gate_dot, act)
    offsets = live.sum(1).cumsum(0) - live.sum(1)  # (C,) start of each token's bag
    return F.embedding_bag(pid, up, offsets, mode="sum", per_sample_weights=coef,
                           sparse=sparse)


def _peer_chunked(x, ids, weights, down, up, down_bias, gate, act, sparse) -> Tensor:
    """Plain PyTorch ops in chunks of tokens; each chunk is recomputed in the backward
    (activation checkpointing) so training never holds more than one chunk's rows."""
    if sparse and torch.is_grad_enabled():
        down, up = _CoalescedGrad.apply(down), _CoalescedGrad.apply(up)
        gate = None if gate is None else _CoalescedGrad.apply(gate)
    T, S = ids.shape
    gathered = 2 if gate is None else 3
    row_bytes = max(1, S * x.shape[1] * x.element_size() * gathered)
    chunk = max(1, CHUNK_BYTES // row_bytes)
    if T <= chunk:
        return _peer_chunk(x, ids, weights, down, up, down_bias, gate, act, sparse)
    recompute = _needs_grad(x, weights, down, up, down_bias, gate)
    outs = []
    for t0 in range(0, T, chunk):
        args = (x[t0:t0 + chunk], ids[t0:t0 + chunk], weights[t0:t0 + chunk], down, up,
                down_bias, gate, act, sparse)
        if recompute:
            outs.append(torch.utils.checkpoint.checkpoint(_peer_chunk, *args,
                                                          use_reentrant=False))
        else:
            outs.append(_peer_chunk(*args))
    return torch.cat(outs)


def _peer_gather(x, ids, weights, down, up, down_bias, gate, act) -> Tensor:
    """Static shapes only: every slot gathered, weight-0 slots masked with ``where`` (never
    multiplied by 0). Holds (T, S, H) rows per table; this is what export and compile see."""
    live = weights != 0  # (T, S)
    keep = live.unsqueeze(-1)
    xc = x.unsqueeze(-1)  # (T, H, 1)
    pre = torch.matmul(torch.where(keep, F.embedding(ids, down), 0.0), xc).squeeze(-1)
    gate_dot = None
    if gate is not None:
        gate_dot = torch.matmul(torch.where(keep, F.embedding(ids, gate), 0.0), xc)
        gate_dot = gate_dot.squeeze(-1)
    if down_bias is not None:  # masked too: an inf bias would make act's gradient NaN
        pre = pre + torch.where(live, down_bias[ids], 0.0)
    coef = torch.where(live, weights * _hidden(pre, gate_dot, act), 0.0)  # (T, S)
    rows_up = torch.where(keep, F.embedding(ids, up), 0.0)  # (T, S, H)
    return torch.matmul(coef.unsqueeze(1), rows_up).squeeze(1)


# --------------------------------------------------------------------------- retrieval


# sparse table gradients come only from the eager operator
_eager_peer_experts = torch.compiler.disable(peer_experts)


def retrieved_experts(x: Tensor, ids: Tensor, weights: Tensor, down: Tensor, up: Tensor, *,
                      down_bias: Tensor | None = None, gate: Tensor | None = None,
                      activation="gelu", sparse: bool = False) -> Tensor:
    """``peer_experts`` as a PEER layer runs them: with sparse table gradients asked for
    (``sparse=True`` under grad mode), eagerly even under torch.compile (a graph break)
    rather than as a gather with dense gradients; otherwise exactly ``peer_experts``.

    >>> x, down, up = torch.randn(3, 8), torch.randn(100, 8), torch.randn(100, 8)
    >>> ids, weights = torch.randint(0, 100, (3, 4)), torch.rand(3, 4)
    >>> retrieved_experts(x, ids, weights, down, up, activation="relu").shape
    torch.Size([3, 8])
    """
    experts = _eager_peer_experts if sparse and torch.is_grad_enabled() else peer_experts
    return experts(x, ids, weights, down, up, down_bias=down_bias, gate=gate,
                   activation=activation, sparse=sparse)
