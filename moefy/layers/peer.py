"""``moefy.PEER``: parameter-efficient expert retrieval (He 2024, "Mixture of A Million Experts").

    x (..., H) → h query networks → BatchNorm → product keys: per head top-k of each half,
               k² candidate sums, top-k → softmax → Σ_heads Σ_k g · σ(u_i·x) v_i → y

N = n₁·n₂ single-neuron experts eᵢ(x) = σ(uᵢ·x)·vᵢ live in two tables ``down`` (uᵢ) and ``up``
(vᵢ), each (N, H). Every head has its own query (one ``Linear(H, heads·d)`` holds them all) and
retrieves its own k experts, but all heads share one expert pool and ONE set of product keys:
two sub-key tables ``keys_a`` (n₁, d/2) and ``keys_b`` (n₂, d/2); expert ``a·n₂ + b`` has the key
[keys_a[a]; keys_b[b]]. The product-key search returns exactly the top-k of q·key over all N
keys (ties aside) at a cost of O((n₁ + n₂)·d/2 + k²) per head instead of O(N·d).

What the paper leaves open and what moefy chose:
- Key dimension d: ``key_dim=None`` means 256 (the half-keys of 128 follow PKM's order of
  magnitude), or the hidden size rounded up to even when that is smaller; a wider query only
  costs its GEMM, the sub-key scores cost h·(n₁+n₂)·d/2 per token.
- Grid: the paper's N = n² (``num_experts`` a perfect square), or any (n₁, n₂) pair; a
  conversion pads d_ff to the nearest such grid.
- Initialisation: ``down`` and the query as ``nn.Linear`` (uniform ±1/√H), the sub-keys uniform
  ±1/√(d/2) (PKM's keys), ``up`` uniform ±1/√(h·k) (an ``nn.Linear`` whose inputs are the h·k
  active neurons), biases zero, BatchNorm weight 1 and bias 0.
- BatchNorm on the queries (``query_norm="batch"``, the paper's default): one ``BatchNorm1d``
  over the heads·d query features, statistics over tokens. Padding tokens would bias those
  statistics: ``forward(x, mask=...)`` keeps them out (they are still computed). A training
  batch with fewer than two usable tokens normalises with the running statistics and leaves
  them unchanged (the batch variance of one token is 0).
- Scores: softmax over each head's k scores (paper), ``"sigmoid"`` (its stated alternative), or
  ``"none"``: weight 1 for every retrieved expert, which is what a converted dense FFN needs
  (a dense FFN weights all its neurons by 1).
- Experts may be gated (``act(gᵢ·x) · (uᵢ·x + bᵢ) · vᵢ``, a single neuron of a SwiGLU FFN) and
  carry a per-expert bias and one output bias: a converted FFN keeps its biases exactly.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.activations import get_activation
from moefy.errors import InputError
from moefy.layers.inputs import check_layer_input
from moefy.layers.record import ConversionRecord
from moefy.runtime.peer import advise_huge_pages, first_order, peer_experts

SCORES = ("softmax", "sigmoid", "none")
QUERY_NORMS = ("batch", None)
_EXHAUSTIVE_BYTES = 64 << 20  # one chunk of the all-keys scores in route(exhaustive=True)
_SEARCH_BYTES = 4 << 20  # one block of sub-key scores in the product-key search
_HUGE_PAGE_BYTES = 64 << 20  # expert tables at least this big ask for huge pages


def _tracing(x: torch.Tensor) -> bool:
    """Under torch.compile / torch.export (fake tensors, proxies): no Python loops over a
    symbolic token count."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _key_grad(rows: torch.Tensor, pos: torch.Tensor, g: torch.Tensor, n: int) -> torch.Tensor:
    """Σ over the (row r, slot j) pairs that chose sub-key i of g[r, j] · rows[r], for each of
    the n sub-keys: the pairs sorted by sub-key, then one weighted bag-sum per sub-key (no
    scatter-add collisions)."""
    k = pos.shape[-1]
    if rows.dtype == torch.float32 and rows.device.type == "cpu" and _search_kernel_available():
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


_eager_peer_experts = torch.compiler.disable(peer_experts)
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                            "_reorder_linear_weight")


def _gemm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
          ) -> torch.Tensor:
    """``x @ weight.T + bias``. For CPU float32 without autograd, through oneDNN with the
    weight reordered for this call's row count: 2-3x torch's default (MKL) on these shapes
    (a block of 1024 query rows × 128 against 1024 sub-keys: 450 vs 130 GFLOP/s on 2 cores).
    The weights are small (queries H × heads·d, sub-keys n × d/2), so the reorder costs
    little and is made afresh each call: nothing cached, nothing to go stale."""
    if not (_ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[0] > 0 and not _tracing(x)) or (torch.is_grad_enabled() and any(
                t is not None and t.requires_grad for t in (x, weight, bias))):
        return F.linear(x, weight, bias)
    mkldnn = torch.ops.mkldnn
    packed = mkldnn._reorder_linear_weight(weight.detach().contiguous(), x.shape[0])
    return mkldnn._linear_pointwise(x.contiguous(), packed,
                                    None if bias is None else bias.detach(), "none", [], "")


def _onednn_trains(x: torch.Tensor) -> bool:
    return (_ONEDNN and x.dtype == torch.float32 and x.device.type == "cpu" and x.dim() == 2
            and x.shape[0] > 0 and torch.is_grad_enabled() and not _tracing(x))


class _Linear(torch.autograd.Function):
    """``x @ weight.T + bias`` with all three GEMMs of forward and backward on oneDNN
    (``_gemm``): the query network's training step, 2-3x torch's default GEMM here."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        with torch.no_grad():
            return _gemm(x, weight, bias)

    @staticmethod
    @first_order
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        grad_x = _gemm(g, weight.t()) if ctx.needs_input_grad[0] else None
        grad_w = _gemm(g.t(), x.t()) if ctx.needs_input_grad[1] else None
        grad_b = g.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_x, grad_w, grad_b


def _usable_rows(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens BatchNorm's training statistics come from: real (``mask``) and finite; None
    when that is every token (no copy of the queries then)."""
    finite = torch.isfinite(q).all(1)
    keep = finite if mask is None else finite & mask
    return None if bool(keep.all()) else keep


def _search_kernel_available() -> bool:
    from moefy.runtime.kernels import search_kernel_available
    return search_kernel_available()


def _search_kernel_applies(s_a: torch.Tensor, s_b: torch.Tensor) -> bool:
    if s_a.dtype != torch.float32 or s_a.device.type != "cpu" or _tracing(s_a):
        return False
    if not (s_a.is_contiguous() and s_b.is_contiguous()) or s_a.numel() == 0:
        return False
    return _search_kernel_available()


class PEERRoute(NamedTuple):
    """What ``PEER.route`` returns, per token and head, in descending score order."""

    ids: torch.Tensor  # (T, heads, k) int64 expert ids
    scores: torch.Tensor  # (T, heads, k) q·key
    weights: torch.Tensor  # (T, heads, k) after softmax / sigmoid / ones


def _grid(num_experts) -> tuple[int, int]:
    if isinstance(num_experts, (tuple, list)):
        if len(num_experts) != 2 or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in num_experts):
            raise ValueError(f"PEER: num_experts must be a perfect square n*n or a pair "
                             f"(n1, n2) of positive ints, got {num_experts!r}")
        return int(num_experts[0]), int(num_experts[1])
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"PEER: num_experts must be a positive int, got {num_experts!r}")
    n = math.isqrt(num_experts)
    if n * n != num_experts:
        raise ValueError(f"PEER: num_experts={num_experts} is not a perfect square; product "
                         f"keys need a grid: pass {n * n} or {(n + 1) ** 2}, or a pair (n1, n2)"
                         f" with n1*n2 experts")
    return n, n


def _table(rows: int, cols: int) -> torch.Tensor:
    """An empty expert table. Large CPU tables ask for transparent huge pages before their
    first write: every retrieved row is a random 1 KiB read, which with 4 KiB pages almost
    always misses the TLB (the experts run 15-30% faster on huge pages)."""
    table = torch.empty(rows, cols)
    if table.device.type == "cpu" and table.numel() * table.element_size() >= _HUGE_PAGE_BYTES:
        advise_huge_pages(table)  # only a hint: False where unavailable
    return table


def _positive(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"PEER: {name} must be a positive int, got {value!r}")
    return value


class PEER(nn.Module):
    """A PEER layer: ``heads`` × ``top_k`` single-neuron experts per token, retrieved with
    product keys from ``num_experts`` (n² or an (n₁, n₂) grid).

    ``forward(x)`` maps (..., hidden_size) to the same shape; ``route(x)`` says which experts
    each head retrieved and with what weight. The expert tables may have sparse gradients
    (``sparse=True``; train them with ``torch.optim.SparseAdam``).

    >>> import torch, moefy
    >>> layer = moefy.PEER(64, 32 * 32, heads=4, top_k=8)
    >>> layer(torch.randn(2, 5, 64)).shape
    torch.Size([2, 5, 64])
    >>> layer.route(torch.randn(3, 64)).ids.shape  # (tokens, heads, top_k)
    torch.Size([3, 4, 8])
    """

    def __init__(self, hidden_size: int, num_experts, *, heads: int = 8, top_k: int = 16,
                 key_dim: int | None = None, activation="gelu", query_norm: str | None = "batch",
                 score: str = "softmax", bias: bool = False, gated: bool = False,
                 sparse: bool = False):
        super().__init__()
        # How convert made this layer from a dense FFN (empty when built directly).
        self.conversion = ConversionRecord()
        self.hidden_size = _positive("hidden_size", hidden_size)
        self.grid = _grid(num_experts)
        self.num_experts = self.grid[0] * self.grid[1]
        self.heads = _positive("heads", heads)
        self.top_k = _positive("top_k", top_k)
        if self.top_k > self.num_experts:
            raise ValueError(f"PEER: top_k={top_k} is more than the {self.num_experts} experts")
        if key_dim is None:
            key_dim = min(256, hidden_size + hidden_size % 2)
        if _positive("key_dim", key_dim) % 2:
            raise ValueError(f"PEER: key_dim must be even (two halves), got {key_dim}")
        self.key_dim = key_dim
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"PEER: query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        if score not in SCORES:
            raise ValueError(f"PEER: score must be one of {SCORES}, got {score!r}")
        if not isinstance(activation, str):
            raise ValueError(f"PEER: activation must be a name (the fused experts kernel "
                             f"implements it), e.g. 'gelu', 'silu', 'relu'; got {activation!r}")
        self.activation = get_activation(activation).name
        self.score = score
        self.gated = bool(gated)
        self.sparse = bool(sparse)

        n1, n2 = self.grid
        h, d = self.hidden_size, self.key_dim
        self.query = nn.Linear(h, self.heads * d, bias=query_norm is None)
        self.query_norm = nn.BatchNorm1d(self.heads * d) if query_norm == "batch" else None
        self.keys_a = nn.Parameter(torch.empty(n1, d // 2))
        self.keys_b = nn.Parameter(torch.empty(n2, d // 2))
        self.down = nn.Parameter(_table(self.num_experts, h))
        self.up = nn.Parameter(_table(self.num_experts, h))
        self.gate = nn.Parameter(_table(self.num_experts, h)) if gated else None
        self.down_bias = nn.Parameter(torch.zeros(self.num_experts)) if bias else None
        self.out_bias = nn.Parameter(torch.zeros(h)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for keys in (self.keys_a, self.keys_b):
                bound = 1.0 / math.sqrt(keys.shape[1])
                keys.uniform_(-bound, bound)
            bound = 1.0 / math.sqrt(self.hidden_size)
            self.down.uniform_(-bound, bound)
            if self.gate is not None:
                self.gate.uniform_(-bound, bound)
            bound = 1.0 / math.sqrt(self.heads * self.top_k)
            self.up.uniform_(-bound, bound)
            for b in (self.down_bias, self.out_bias):
                if b is not None:
                    b.zero_()

    # ---- retrieval, stage by stage -------------------------------------------------------

    def _queries(self, x: torch.Tensor, mask: torch.Tensor | None = None, *,
                 update: bool = True) -> torch.Tensor:
        """(T, H) → (T, heads, d): the per-head queries, batch-normalised."""
        bn = self.query_norm
        if bn is not None and not self.training and bn.running_mean is not None:
            # eval BatchNorm is an affine map per feature: folded into the query GEMM
            scale = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
            shift = bn.bias - bn.running_mean * scale
            if self.query.bias is not None:
                shift = shift + self.query.bias * scale
            q = _gemm(x, self.query.weight * scale[:, None], shift)
        else:
            q = _Linear.apply(x, self.query.weight, self.query.bias) if _onednn_trains(x) else (
                self.query(x))  # (T, heads·d)
            if bn is not None:
                q = self._batch_norm(q, mask, update)
        return q.view(-1, self.heads, self.key_dim)

    def _batch_norm(self, q: torch.Tensor, mask: torch.Tensor | None,
                    update: bool) -> torch.Tensor:
        bn = self.query_norm
        tracked = bn.running_mean is not None
        keep = None if _tracing(q) else _usable_rows(q, mask)
        rows = q if keep is None else q[keep]
        if not (self.training or not tracked) or (rows.shape[0] < 2 and tracked):
            return F.batch_norm(q, bn.running_mean, bn.running_var, bn.weight, bn.bias,
                                False, 0.0, bn.eps)
        # statistics from the real, finite tokens only (a NaN token must not poison every
        # token and the running statistics); every token normalised with them. Written out,
        # as E[q²] − E[q]² and one fused scale-and-shift: torch's CPU batch_norm (and var
        # over dim 0) walk a (tokens, features) matrix column by column, 3x slower in all
        mean = rows.mean(0)
        var = ((rows * rows).mean(0) - mean * mean).clamp_min(0)
        if update and tracked and self.training:
            self._update_running(mean.detach(), var.detach(), rows.shape[0])
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight
        shift = -mean * scale if bn.bias is None else bn.bias - mean * scale
        return torch.addcmul(shift, q, scale)

    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
        bn = self.query_norm
        with torch.no_grad():
            count = bn.num_batches_tracked + 1
            rate = bn.momentum if bn.momentum is not None else 1.0 / float(count)  # cumulative
            new_mean = torch.lerp(bn.running_mean, mean.to(bn.running_mean.dtype), rate)
            new_var = torch.lerp(bn.running_var, (var * n / (n - 1)).to(bn.running_var.dtype),
                                 rate)
            if bn.running_mean.is_inference() and not torch.is_inference_mode_enabled():
                # made under inference_mode: replaced, as it cannot change in place here
                bn.running_mean, bn.running_var, bn.num_batches_tracked = (
                    new_mean, new_var, count)
            else:
                bn.running_mean.copy_(new_mean)
                bn.running_var.copy_(new_var)
                bn.num_batches_tracked.copy_(count)

    def _subkey_scores(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T, heads, d) → scores against each half's sub-keys: (T, heads, n₁), (T, heads, n₂)."""
        half = self.key_dim // 2
        lead = q.shape[:-1]
        n1, n2 = self.grid
        return (_gemm(q[..., :half].reshape(-1, half), self.keys_a).view(*lead, n1),
                _gemm(q[..., half:].reshape(-1, half), self.keys_b).view(*lead, n2))

    def _retrieve(self, s_a: torch.Tensor, s_b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Product-key top-k: per head, top-k of each half, the k² sums, top-k again.
        Returns scores and expert ids, (T, heads, k) each, in descending score order."""
        n2 = self.grid[1]
        k = self.top_k
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

    def _search(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-key scores and product-key top-k, a block of tokens at a time: the scores of a
        block (≈4 MiB) stay in cache between the GEMM and the top-k, and the allocator reuses
        the block's memory instead of faulting in fresh pages for (T, heads, n) at once."""
        if _tracing(q):
            return self._retrieve(*self._subkey_scores(q))
        t = q.shape[0]
        step = max(1, _SEARCH_BYTES // (self.heads * max(self.grid) * q.element_size()))
        grads = torch.is_grad_enabled() and any(
            p.requires_grad for p in (q, self.keys_a, self.keys_b))
        with torch.no_grad() if grads else contextlib.nullcontext():
            parts = [self._retrieve(*self._subkey_scores(q[i:i + step]))
                     for i in range(0, max(t, 1), step)]  # zero tokens: one empty block
            scores = torch.cat([p[0] for p in parts]) if len(parts) != 1 else parts[0][0]
            ids = torch.cat([p[1] for p in parts]) if len(parts) != 1 else parts[0][1]
        if grads:
            # the scores' gradient reaches only the k chosen sub-keys per half and head: a
            # sparse backward instead of autograd's dense one through the (T, heads, n) scores
            scores = _ChosenScores.apply(q, self.keys_a, self.keys_b, ids, scores)
        return scores, ids

    def _weights(self, scores: torch.Tensor) -> torch.Tensor:
        if self.score == "softmax":
            return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
        if self.score == "sigmoid":
            return torch.sigmoid(scores)
        return torch.ones_like(scores)

    def _exhaustive(self, s_a: torch.Tensor, s_b: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k over all N keys, scored directly (chunks of tokens keep memory bounded)."""
        t = s_a.shape[0]
        per_token = self.heads * self.num_experts * s_a.element_size()
        step = max(1, _EXHAUSTIVE_BYTES // max(per_token, 1))
        scores, ids = [], []
        for i in range(0, t, step):
            full = (s_a[i:i + step].unsqueeze(-1) + s_b[i:i + step].unsqueeze(-2)).flatten(-2)
            sc, ix = full.topk(self.top_k, dim=-1)  # (t, heads, k); id = a·n₂ + b
            scores.append(sc)
            ids.append(ix)
        if not scores:
            empty = s_a.new_zeros(0, self.heads, self.top_k)
            return empty, empty.long()
        return torch.cat(scores), torch.cat(ids)

    # ---- public --------------------------------------------------------------------------

    def route(self, x: torch.Tensor, *, exhaustive: bool = False,
              mask: torch.Tensor | None = None) -> PEERRoute:
        """Which experts each head retrieves for each token of ``x`` (..., H), flattened to T
        tokens. ``exhaustive=True`` scores all N keys directly (the check of the product-key
        search; O(N) per token). Changes no state: in training mode the queries are
        normalised with the batch's statistics, as ``forward`` does, without updating the
        running ones."""
        x2, mask2 = self._flatten(x, mask)
        q = self._queries(x2, mask2, update=False)
        if exhaustive:
            scores, ids = self._exhaustive(*self._subkey_scores(q))
        else:
            scores, ids = self._search(q)
        return PEERRoute(ids, scores, self._weights(scores))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (x's leading shape, bool), optional: False marks padding tokens, kept out
        of the query BatchNorm's training statistics (their outputs are still computed)."""
        x2, mask2 = self._flatten(x, mask)
        q = self._queries(x2, mask2)
        scores, ids = self._search(q)
        weights = self._weights(scores)
        # under autocast the queries (and so the weights) may come out in a lower precision
        weights = weights.to(x2.dtype)
        # sparse table gradients come from the eager operator: under torch.compile the
        # experts run eagerly (a graph break) rather than as a gather with dense gradients
        experts = _eager_peer_experts if self.sparse and torch.is_grad_enabled() else (
            peer_experts)
        y = experts(x2, ids.flatten(1), weights.flatten(1), self.down, self.up,
                         down_bias=self.down_bias, gate=self.gate, activation=self.activation,
                         sparse=self.sparse)
        if self.out_bias is not None:
            y = y + self.out_bias
        return y.view(x.shape)

    def _flatten(self, x: torch.Tensor, mask: torch.Tensor | None
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        check_layer_input(x, self.hidden_size, self.down, "PEER", "peer")
        x2 = x.reshape(-1, self.hidden_size)
        if mask is None:
            return x2, None
        if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool or (
                tuple(mask.shape) != tuple(x.shape[:-1])):
            got = (f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, torch.Tensor)
                   else type(mask).__name__)
            raise InputError(f"PEER: mask must be a bool tensor of shape {tuple(x.shape[:-1])} "
                             f"(True = a real token), got {got}")
        return x2, mask.reshape(-1).to(x.device)

    def extra_repr(self) -> str:
        n1, n2 = self.grid
        return (f"hidden_size={self.hidden_size}, num_experts={self.num_experts} "
                f"({n1}x{n2}), heads={self.heads}, top_k={self.top_k}, key_dim={self.key_dim}, "
                f"activation={self.activation!r}, query_norm="
                f"{'batch' if self.query_norm is not None else None!r}, score={self.score!r}, "
                f"gated={self.gated}, sparse={self.sparse}")
