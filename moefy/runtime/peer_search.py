"""PEER's retrieval kernels, chosen per call (a PEER layer states what to compute; these
choose how):

    q (T, heads, d), keys_a (n₁, d/2), keys_b (n₂, d/2)
      ⇒  s_a (T, heads, n₁), s_b (T, heads, n₂)     (``subkey_scores``: oneDNN GEMMs)
      ⇒  product-key top-k  ⇒  scores, ids a·n₂ + b (T, heads, k)

``linear`` runs the GEMMs on oneDNN with weights reordered per call (CPU float32, no
autograd; ``query_linear`` with oneDNN's backward too for a training step), else
``F.linear``; ``product_key_topk`` uses the C++ search (``torch.ops.moefy_cpu.peer_search``)
where it applies, else torch's top-k, which is its oracle; ``product_key_search`` runs both
a block of tokens at a time with a backward that touches only the chosen sub-keys (the C++
``peer_key_grad`` for CPU float32). The experts themselves are ``moefy.runtime.peer``.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from moefy.runtime.kernels import search_kernel_available
from moefy.runtime.peer import first_order

Tensor = torch.Tensor

# Sub-key scores one block of the product-key search holds (tokens × heads × max(n₁, n₂)).
_SEARCH_BYTES = 4 << 20
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``x @ weight.T + bias`` for the retrieval's GEMMs (queries, sub-key scores). For CPU
    float32 without autograd, through oneDNN with the weight reordered for this call's row
    count: 2-3x torch's default (MKL) on these shapes (a block of 1024 query rows × 128
    against 1024 sub-keys: 450 vs 130 GFLOP/s on 2 cores). The weights are small (queries
    H × heads·d, sub-keys n × d/2), so the reorder costs little and is made afresh each call:
    nothing cached, nothing to go stale. Elsewhere ``F.linear``.

    >>> x, w = torch.randn(4, 8), torch.randn(3, 8)
    >>> torch.allclose(linear(x, w), x @ w.t(), atol=1e-5)
    True
    """
    if not (_ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[0] > 0 and not _symbolic(x)) or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.linear(x, weight, bias)
    mkldnn = torch.ops.mkldnn
    packed = mkldnn._reorder_linear_weight(weight.detach().contiguous(), x.shape[0])
    return mkldnn._linear_pointwise(x.contiguous(), packed,
                                    None if bias is None else bias.detach(), "none", [], "")


def query_linear(x: Tensor, query: torch.nn.Linear) -> Tensor:
    """``query(x)``, the query network of a training step: for CPU float32 rows under grad
    mode, all three GEMMs of forward and backward on oneDNN (``linear``; 2-3x torch's default
    GEMM here); elsewhere the module itself.

    >>> query = torch.nn.Linear(8, 6)
    >>> query_linear(torch.randn(4, 8, requires_grad=True), query).shape
    torch.Size([4, 6])
    """
    if _onednn_trains(x):
        return _OneDNNLinear.apply(x, query.weight, query.bias)
    return query(x)


def subkey_scores(q: Tensor, keys_a: Tensor, keys_b: Tensor) -> tuple[Tensor, Tensor]:
    """Queries (T, heads, d) against each half's sub-keys, ``keys_a`` (n₁, d/2) and ``keys_b``
    (n₂, d/2): scores (T, heads, n₁), (T, heads, n₂).

    >>> s_a, s_b = subkey_scores(torch.randn(5, 2, 8), torch.randn(3, 4), torch.randn(7, 4))
    >>> s_a.shape, s_b.shape
    (torch.Size([5, 2, 3]), torch.Size([5, 2, 7]))
    """
    half = keys_a.shape[1]
    lead = q.shape[:-1]
    return (linear(q[..., :half].reshape(-1, half), keys_a).view(*lead, keys_a.shape[0]),
            linear(q[..., half:].reshape(-1, half), keys_b).view(*lead, keys_b.shape[0]))


def product_key_topk(s_a: Tensor, s_b: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Product-key top-k from sub-key scores (T, heads, n₁), (T, heads, n₂): per head, top-k
    of each half, the k² sums, top-k again, which is exactly the top-k of s_a[a] + s_b[b] over
    all n₁·n₂ keys (ties aside). Returns scores and expert ids a·n₂ + b, (T, heads, k) each,
    in descending score order; the scores stay differentiable in ``s_a`` and ``s_b``. The C++
    search (``torch.ops.moefy_cpu.peer_search``) where it applies (eager CPU float32,
    contiguous), else torch's top-k.

    >>> s_a, s_b = torch.randn(5, 2, 6), torch.randn(5, 2, 9)
    >>> scores, ids = product_key_topk(s_a, s_b, 4)
    >>> every = (s_a.unsqueeze(-1) + s_b.unsqueeze(-2)).flatten(-2)  # (5, 2, 54)
    >>> torch.allclose(scores, every.topk(4, dim=-1).values)
    True
    """
    n2 = s_b.shape[-1]
    if _search_kernel_applies(s_a, s_b):
        shape = s_a.shape[:-1] + (k,)
        a, b = torch.ops.moefy_cpu.peer_search(s_a.detach().reshape(-1, s_a.shape[-1]),
                                               s_b.detach().reshape(-1, s_b.shape[-1]), k)
        a, b = a.view(shape), b.view(shape)
        # the scores gathered from the sub-key scores stay differentiable
        return s_a.gather(-1, a) + s_b.gather(-1, b), a * n2 + b
    # k' = min(k, n) per half still holds the exact top-k: an expert (a, b) outside the
    # top-k' of half A has k' experts (a', b) scoring at least as high
    top_a, idx_a = s_a.topk(min(k, s_a.shape[-1]), dim=-1)  # (T, heads, ka)
    top_b, idx_b = s_b.topk(min(k, s_b.shape[-1]), dim=-1)  # (T, heads, kb)
    kb = top_b.shape[-1]
    candidates = (top_a.unsqueeze(-1) + top_b.unsqueeze(-2)).flatten(-2)  # (T, heads, ka·kb)
    scores, flat = candidates.topk(k, dim=-1)  # (T, heads, k)
    a = idx_a.gather(-1, flat // kb)
    b = idx_b.gather(-1, flat % kb)
    return scores, a * n2 + b


def product_key_search(q: Tensor, keys_a: Tensor, keys_b: Tensor, k: int
                       ) -> tuple[Tensor, Tensor]:
    """``product_key_topk(*subkey_scores(q, keys_a, keys_b), k)`` for queries (T, heads, d),
    a block of tokens at a time: the scores of a block (≈4 MiB) stay in cache between the GEMM
    and the top-k, and the allocator reuses the block's memory instead of faulting in fresh
    pages for (T, heads, n) at once. Differentiable in ``q`` and the sub-keys, with a sparse
    backward: the gradient reaches only the k chosen sub-keys per half and head.

    >>> q, keys_a, keys_b = torch.randn(5, 2, 8), torch.randn(6, 4), torch.randn(9, 4)
    >>> scores, ids = product_key_search(q, keys_a, keys_b, 4)
    >>> torch.equal(ids, product_key_topk(*subkey_scores(q, keys_a, keys_b), 4)[1])
    True
    """
    if _symbolic(q):
        return product_key_topk(*subkey_scores(q, keys_a, keys_b), k)
    t = q.shape[0]
    step = max(1, _SEARCH_BYTES // (q.shape[1] * max(keys_a.shape[0], keys_b.shape[0])
                                    * q.element_size()))
    grads = torch.is_grad_enabled() and any(p.requires_grad for p in (q, keys_a, keys_b))
    with torch.no_grad() if grads else contextlib.nullcontext():
        parts = [product_key_topk(*subkey_scores(q[i:i + step], keys_a, keys_b), k)
                 for i in range(0, max(t, 1), step)]  # zero tokens: one empty block
        scores = torch.cat([p[0] for p in parts]) if len(parts) != 1 else parts[0][0]
        ids = torch.cat([p[1] for p in parts]) if len(parts) != 1 else parts[0][1]
    if grads:
        # a sparse backward instead of autograd's dense one through the (T, heads, n) scores
        scores = _ChosenScores.apply(q, keys_a, keys_b, ids, scores)
    return scores, ids


def _symbolic(x: Tensor) -> bool:
    """Under torch.compile / torch.export, or a fake or proxy tensor: the retrieval's
    eager-only paths (oneDNN reorders, the C++ search, blocks of tokens) step aside. (The
    retrieval's own test, narrower than the experts' ``_tracing``: it lets JIT tracing and
    Parameters through, as it always has.)"""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _search_kernel_applies(s_a: Tensor, s_b: Tensor) -> bool:
    if s_a.dtype != torch.float32 or s_a.device.type != "cpu" or _symbolic(s_a):
        return False
    if not (s_a.is_contiguous() and s_b.is_contiguous()) or s_a.numel() == 0:
        return False
    return search_kernel_available()


def _onednn_trains(x: Tensor) -> bool:
    return (_ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[0] > 0 and torch.is_grad_enabled() and not _symbolic(x))


class _OneDNNLinear(torch.autograd.Function):
    """``x @ weight.T + bias`` with all three GEMMs of forward and backward on oneDNN
    (``linear``)."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return linear(x, weight, bias)

    @staticmethod
    @first_order
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        grad_x = linear(g, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = linear(g.t(), x.t()) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _key_grad(rows: Tensor, pos: Tensor, g: Tensor, n: int) -> Tensor:
    """Σ over the (row r, slot j) pairs that chose sub-key i of g[r, j] · rows[r], for each of
    the n sub-keys: the pairs sorted by sub-key, then one weighted bag-sum per sub-key (no
    scatter-add collisions); the C++ kernel for CPU float32."""
    k = pos.shape[-1]
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and search_kernel_available():
        return torch.ops.moefy_cpu.peer_key_grad(rows, pos.reshape(-1, k).contiguous(),
                                                 g.float().reshape(-1, k).contiguous(), n)
    flat = pos.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=n)
    offsets = torch.cumsum(counts, 0) - counts
    source = torch.div(order, k, rounding_mode="floor")  # the row each sorted pair came from
    return F.embedding_bag(source, rows, offsets, mode="sum",
                           per_sample_weights=g.reshape(-1)[order].to(rows.dtype))


class _ChosenScores(torch.autograd.Function):
    """scores[t, h, j] = q[t, h, :d/2]·keys_a[a[t, h, j]] + q[t, h, d/2:]·keys_b[b[t, h, j]],
    computed by the search already (passed in); the backward touches only chosen sub-keys."""

    @staticmethod
    def forward(ctx, q, keys_a, keys_b, ids, scores):
        ctx.save_for_backward(q, keys_a, keys_b, ids)
        return scores.clone()

    @staticmethod
    @first_order
    def backward(ctx, g):
        q, keys_a, keys_b, ids = ctx.saved_tensors
        n2 = keys_b.shape[0]
        a, b = torch.div(ids, n2, rounding_mode="floor"), ids % n2
        half = keys_a.shape[1]
        k = a.shape[-1]
        rows = q.reshape(-1, 2 * half)
        g2 = g.reshape(-1, k)
        grad_q = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:  # (under autocast q may be in a lower precision)
            bag = dict(mode="sum", per_sample_weights=g2.to(keys_a.dtype))
            grad_q = torch.cat([F.embedding_bag(a.reshape(-1, k), keys_a, **bag),
                                F.embedding_bag(b.reshape(-1, k), keys_b, **bag)], dim=-1)
            grad_q = grad_q.view(q.shape).to(q.dtype)
        if ctx.needs_input_grad[1]:
            grad_a = _key_grad(rows[:, :half].to(keys_a.dtype).contiguous(), a, g2,
                               keys_a.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = _key_grad(rows[:, half:].to(keys_b.dtype).contiguous(), b, g2,
                               keys_b.shape[0])
        return grad_q, grad_a, grad_b, None, None
