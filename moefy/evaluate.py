"""Held-out evaluation: how close a converted model stays to its dense original on text that
neither was fitted on. Causal LMs are compared by perplexity, anything else by the cosine of
its mean-pooled output states (sentence embeddings).

    batches ──model──▶ logits (B, S, V) ──next-token cross-entropy over the mask──▶ perplexity
    batches ──model──▶ states (B, S, H) ──mean over the mask, L2-normalised──▶ embeddings (B, H)

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

    @property
    def ratio(self) -> float | None:
        """The model's perplexity as a multiple of the reference's (1.0: no worse)."""
        if self.perplexity is None or self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity


def fidelity(model: nn.Module, reference: nn.Module, batches: Iterable[Batch], *,
             causal: bool) -> Fidelity:
    """How close ``model`` stays to ``reference`` (its dense original) on held-out
    ``batches``: perplexity of both when ``causal``, else the per-row embedding cosine.

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
        return Fidelity(causal=True, perplexity=perplexity(model, batches),
                        reference_perplexity=perplexity(reference, batches))
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


def _predicted(batches: list[Batch]) -> float:
    """How many tokens have a next one to predict (0: perplexity says nothing)."""
    return sum(float(_ids_and_mask(b, i)[1][:, 1:].sum()) for i, b in enumerate(batches))
