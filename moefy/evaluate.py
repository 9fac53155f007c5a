"""Held-out evaluation: how close a converted model stays to its dense original on text that
neither was fitted on. Causal LMs are compared by perplexity, anything else by the cosine of
its mean-pooled output states (sentence embeddings).

    batches ──model──▶ logits (B, S, V) ──next-token cross-entropy over the mask──▶ perplexity
    batches ──model──▶ states (B, S, H) ──mean over the mask, L2-normalised──▶ embeddings (B, H)
    each sequence ──prefill its first half in one call, then the rest one token at a time
        through the KV cache (batch 1)──▶ decode perplexity (generation as it runs)

A batch is a dict of keyword inputs with ``input_ids`` (and an ``attention_mask`` saying which
tokens are real; without one, all are), passed to the model as given. A model may return a
tensor or a Hugging Face output (``.logits`` for perplexity, the first field, such as
``last_hidden_state``, for embeddings).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.errors import InputError

Batch = Mapping[str, torch.Tensor]


@dataclass(frozen=True)
class Fidelity:
    """``model`` against ``reference`` on the same held-out batches: for a causal LM, each
    one's perplexity (both None when no chunk has a next token to predict); otherwise each
    row's cosine between their embeddings."""

    causal: bool
    perplexity: float | None = None
    reference_perplexity: float | None = None
    cosine: torch.Tensor | None = None  # (rows,)
    decode_perplexity: float | None = None  # fidelity(decode=True): each one's, decoding
    reference_decode_perplexity: float | None = None

    @property
    def ratio(self) -> float | None:
        """The model's perplexity as a multiple of the reference's (1.0: no worse)."""
        if self.perplexity is None or self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity

    @property
    def decode_ratio(self) -> float | None:
        """The model's decode perplexity as a multiple of the reference's."""
        if self.decode_perplexity is None or self.reference_decode_perplexity is None:
            return None
        return self.decode_perplexity / self.reference_decode_perplexity


def fidelity(model: nn.Module, reference: nn.Module, batches: Iterable[Batch], *,
             causal: bool, decode: bool = False) -> Fidelity:
    """How close ``model`` stays to ``reference`` (its dense original) on held-out
    ``batches``: perplexity of both when ``causal``, else the per-row embedding cosine.
    With ``decode`` (causal only), each one's ``decode_perplexity`` too.

    >>> import torch
    >>> class Bigram(torch.nn.Module):  # a tiny causal LM: each token's logits for the next
    ...     def __init__(self, vocab=16):
    ...         super().__init__()
    ...         self.logits = torch.nn.Embedding(vocab, vocab)
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return self.logits(input_ids)
    >>> _ = torch.manual_seed(0)
    >>> dense, held = Bigram(), [{"input_ids": torch.randint(0, 16, (2, 12))}]
    >>> fidelity(dense, dense, held, causal=True).ratio
    1.0
    >>> round(float(fidelity(dense, dense, held, causal=False).cosine.min()), 4)
    1.0
    """
    batches = list(batches)  # read twice, once per model
    if causal:
        if not _predicted(batches):
            return Fidelity(causal=True)
        extra = {}
        if decode and _decoded(batches):
            extra = {"decode_perplexity": decode_perplexity(model, batches),
                     "reference_decode_perplexity": decode_perplexity(reference, batches)}
        return Fidelity(causal=True, perplexity=perplexity(model, batches),
                        reference_perplexity=perplexity(reference, batches), **extra)
    cosine = (embeddings(model, batches) * embeddings(reference, batches)).sum(-1)
    return Fidelity(causal=False, cosine=cosine)


def perplexity(model: nn.Module, batches: Iterable[Batch]) -> float:
    """exp of a causal LM's mean next-token cross-entropy over the real tokens of
    ``batches``. Raises ``InputError`` when no token has a next one to predict.

    >>> import torch
    >>> class Bigram(torch.nn.Module):  # each token's logits for the next one
    ...     def __init__(self, vocab=16):
    ...         super().__init__()
    ...         self.logits = torch.nn.Embedding(vocab, vocab)
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return self.logits(input_ids)
    >>> clueless = Bigram()
    >>> _ = torch.nn.init.zeros_(clueless.logits.weight)  # every next token equally likely
    >>> round(perplexity(clueless, [{"input_ids": torch.randint(0, 16, (2, 12))}]), 3)
    16.0
    """
    total = count = 0.0
    with torch.no_grad():
        for i, b in enumerate(batches):
            ids, mask = _ids_and_mask(b, i)
            out = model(**b)
            logits = (out if isinstance(out, torch.Tensor) else out.logits)[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                  reduction="none").view_as(mask[:, 1:]) * mask[:, 1:]
            total += float(nll.sum())
            count += float(mask[:, 1:].sum())
    if not count:
        raise InputError("perplexity: no token to predict (every chunk is a single token, or "
                         "the batches are empty)")
    return math.exp(total / count)


def decode_perplexity(model: nn.Module, batches: Iterable[Batch], *,
                      prefill: float = 0.5) -> float:
    """Perplexity of generation as it runs: for each sequence of ``batches`` (its real tokens,
    batch 1), the first ``prefill`` share (at least one token) goes through the model in one
    call with ``use_cache=True``; the rest is fed one token at a time through the returned KV
    cache, and each of those tokens is scored by the logits of the call before it. exp of
    the mean cross-entropy over the scored tokens.

    This is the regime a per-token sparse model runs in when it decodes, and the one where a
    model that picks its weights from the prompt (``selection="sequence"``) cannot hide
    behind an exact prefill. ``model`` is a Hugging Face causal LM (or anything called with
    ``input_ids``, ``past_key_values`` and ``use_cache`` that returns ``.logits`` and
    ``.past_key_values``). Raises ``InputError`` when ``prefill`` is not in (0, 1), the model
    returns no cache, or no sequence has a token left to decode.
    """
    if not (isinstance(prefill, float | int) and not isinstance(prefill, bool)
            and 0 < prefill < 1):
        raise InputError(f"decode_perplexity: prefill is the share of each sequence read in "
                         f"one call, in (0, 1); got {prefill!r}")
    total = count = 0.0
    cache_name = cache_argument(model)
    with torch.no_grad():
        for i, b in enumerate(batches):
            ids, mask = _ids_and_mask(b, i)
            for row in range(ids.shape[0]):
                seq = ids[row][mask[row].bool()].view(1, -1)
                n = seq.shape[1]
                first = max(1, int(n * prefill))
                if n <= first:
                    continue
                try:
                    out = model(input_ids=seq[:, :first], use_cache=True)
                except TypeError as exc:
                    raise InputError(f"decode_perplexity: the model cannot be called with "
                                     f"use_cache=True ({exc}); it needs a causal LM with a KV "
                                     "cache (a Hugging Face causal LM)") from exc
                for t in range(first, n):
                    logits, cache = _logits_and_cache(out, i)
                    total -= float(torch.log_softmax(logits[0, -1].float(), -1)[seq[0, t]])
                    count += 1
                    if t + 1 < n:
                        out = model(input_ids=seq[:, t:t + 1], use_cache=True,
                                    **{cache_name: cache})
    if not count:
        raise InputError("decode_perplexity: no sequence has a token after its prefill (each "
                         "needs at least two real tokens), or the batches are empty")
    return math.exp(total / count)


def cache_argument(model: nn.Module) -> str:
    """The keyword a causal LM takes its KV cache by: ``cache`` (transformers ≥ 5.2x, where
    ``past_key_values`` is deprecated) or ``past_key_values``."""
    import inspect

    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def cache_of(out):
    """The KV cache a causal LM's output carries (``.cache`` or ``.past_key_values``)."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


def _logits_and_cache(out, i: int):
    logits = getattr(out, "logits", None)
    cache = cache_of(out)
    if not isinstance(logits, torch.Tensor) or cache is None:
        raise InputError(f"decode_perplexity: on batch {i} the model returned "
                         f"{type(out).__name__} without logits and a KV cache; it needs a "
                         "causal LM that returns .logits and .past_key_values when called with "
                         "use_cache=True (a Hugging Face causal LM)")
    return logits, cache


def embeddings(model: nn.Module, batches: Iterable[Batch]) -> torch.Tensor:
    """Sentence embeddings, one row per sequence of ``batches``: the model's output states
    averaged over the real tokens, L2-normalised (sentence-transformers' pooling), float32.
    The cosine of two models' rows is the dot product of their embeddings.

    >>> import torch
    >>> class Encoder(torch.nn.Module):  # a tiny encoder: each token's state
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.states = torch.nn.Embedding(16, 8)
    ...     def forward(self, input_ids, attention_mask=None):
    ...         return self.states(input_ids)
    >>> ids = torch.randint(0, 16, (3, 5))
    >>> emb = embeddings(Encoder(), [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    >>> emb.shape, bool(torch.allclose(emb.norm(dim=-1), torch.ones(3)))
    (torch.Size([3, 8]), True)
    """
    rows = []
    with torch.no_grad():
        for i, b in enumerate(batches):
            _, mask = _ids_and_mask(b, i)
            out = model(**b)
            states = (out if isinstance(out, torch.Tensor) else out[0]).float()  # (B, S, H)
            m = mask.unsqueeze(-1).float()  # (B, S, 1)
            rows.append((states * m).sum(1) / m.sum(1))  # (B, H)
    if not rows:
        raise InputError("embeddings: the batches are empty")
    return F.normalize(torch.cat(rows), dim=-1)


def _ids_and_mask(batch: Batch, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(batch, Mapping) or "input_ids" not in batch:
        raise InputError(f"batch {i} is a {type(batch).__name__}; each batch must be a dict of "
                         "keyword inputs with input_ids (and an optional attention_mask)")
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    return ids, torch.ones_like(ids) if mask is None else mask


def _decoded(batches: list[Batch]) -> bool:
    """Whether some sequence has a real token after its prefill (two or more real tokens)."""
    return any(bool((_ids_and_mask(b, i)[1].sum(-1) >= 2).any())
               for i, b in enumerate(batches))


def _predicted(batches: list[Batch]) -> float:
    """How many tokens have a next one to predict (0: perplexity says nothing)."""
    return sum(float(_ids_and_mask(b, i)[1][:, 1:].sum()) for i, b in enumerate(batches))
