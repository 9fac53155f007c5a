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

The layer states what to compute; how each stage runs (oneDNN GEMMs, the C++ product-key
search, blocks of tokens, a backward that touches only the chosen sub-keys, the fused experts)
is the runtime's choice, in ``moefy.runtime.peer``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.activations import get_activation
from moefy.errors import InputError
from moefy.layers.inputs import check_layer_input
from moefy.layers.record import ConversionRecord
from moefy.runtime.peer import advise_huge_pages, retrieved_experts
from moefy.runtime.peer_search import (
    linear,
    product_key_search,
    product_key_topk,
    query_linear,
    subkey_scores,
)

SCORES = ("softmax", "sigmoid", "none")
QUERY_NORMS = ("batch", None)
_EXHAUSTIVE_BYTES = 64 << 20  # one chunk of the all-keys scores in route(exhaustive=True)
_HUGE_PAGE_BYTES = 64 << 20  # expert tables at least this big ask for huge pages


def _tracing(x: torch.Tensor) -> bool:
    """Under torch.compile / torch.export (fake tensors, proxies): no data-dependent choice
    of the tokens BatchNorm's statistics come from."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _usable_rows(q: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | None:
    """The tokens BatchNorm's training statistics come from: real (``mask``) and finite; None
    when that is every token (no copy of the queries then)."""
    finite = torch.isfinite(q).all(1)
    keep = finite if mask is None else finite & mask
    return None if bool(keep.all()) else keep


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
            q = linear(x, self.query.weight * scale[:, None], shift)
        else:
            q = query_linear(x, self.query)  # (T, heads·d)
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
        return subkey_scores(q, self.keys_a, self.keys_b)

    def _retrieve(self, s_a: torch.Tensor, s_b: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """Product-key top-k from the sub-key scores: scores and expert ids, (T, heads, k)
        each, in descending score order."""
        return product_key_topk(s_a, s_b, self.top_k)

    def _search(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Sub-key scores and product-key top-k together, as ``forward`` runs them (the
        runtime decides how: blocks of tokens, a backward that touches only chosen keys)."""
        return product_key_search(q, self.keys_a, self.keys_b, self.top_k)

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

    def key_scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every key's score q·key, for each token of ``x`` (..., H) and each head: (T, heads,
        N), expert a·n₂ + b at index a·n₂ + b. What fitting the retrieval needs (``route``
        keeps only the top-k): differentiable in the query network, its BatchNorm and the
        sub-keys; holds T·heads·N scores at once, so call it on a few hundred tokens at a
        time. Changes no state (as ``route``).

        >>> import torch, moefy
        >>> layer = moefy.PEER(16, (4, 8), heads=2, top_k=3).eval()
        >>> x = torch.randn(5, 16)
        >>> layer.key_scores(x).shape
        torch.Size([5, 2, 32])
        >>> torch.equal(layer.key_scores(x).topk(3).indices, layer.route(x, exhaustive=True).ids)
        True
        """
        x2, _ = self._flatten(x, None)
        s_a, s_b = self._subkey_scores(self._queries(x2, update=False))
        return (s_a.unsqueeze(-1) + s_b.unsqueeze(-2)).flatten(-2)  # (T, heads, N)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` (x's leading shape, bool), optional: False marks padding tokens, kept out
        of the query BatchNorm's training statistics (their outputs are still computed)."""
        x2, mask2 = self._flatten(x, mask)
        q = self._queries(x2, mask2)
        scores, ids = self._search(q)
        weights = self._weights(scores)
        # under autocast the queries (and so the weights) may come out in a lower precision
        weights = weights.to(x2.dtype)
        y = retrieved_experts(x2, ids.flatten(1), weights.flatten(1), self.down, self.up,
                              down_bias=self.down_bias, gate=self.gate,
                              activation=self.activation, sparse=self.sparse)
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
