"""Routers: router logits ⇒ a selection of experts per token, with no side effects.

    logits (T, E) ─ softmax | noisy | sigmoid | topp | expert_choice | hash ─▶ weights (T, slots)
                                                                              indices (T, slots)
                  ─ combine "sum" (unweighted) ─ capacity factor (drops) ─▶ Selection

Every function here is pure: it reads its arguments and returns a ``Selection``. What a
training forward changes (the auxiliary losses, the sigmoid router's balancing bias, the
dropped-assignment count) is done by ``moefy.MoE.forward`` from the selection it gets back.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn as nn

from moefy.errors import InputError

ROUTERS = ("softmax", "noisy", "sigmoid", "topp", "expert_choice", "hash")
_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)  # Knuth / murmur constants
_HASH_PRIME = 2147483629  # the largest prime below 2^31: ids·mult mod it mixes every bit


class Selection(NamedTuple):
    """A routing decision for T flattened tokens."""

    weights: torch.Tensor  # (T, slots) routing weight of each slot; 0: slot unused
    indices: torch.Tensor  # (T, slots) expert of each slot
    logits: torch.Tensor  # (T, E) router logits (auxiliary losses read them)
    used: torch.Tensor | None  # (T, slots) slots that hold an expert after capacity
    dropped: torch.Tensor | None  # (T, slots) slots the capacity factor dropped


def hash_experts(token_ids: torch.Tensor, tokens: int, num_experts: int,
                 top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """expert = a fixed hash of the token id mod E, one hash per slot; weights 1/k."""
    if token_ids is None:
        raise InputError("router='hash' needs token_ids (the input ids of the tokens, one "
                         "per row of x); converted models pass them from input_ids")
    if not isinstance(token_ids, torch.Tensor) or token_ids.is_floating_point() or (
            token_ids.is_complex()):
        raise InputError("router='hash': token_ids must be an integer tensor of token ids, got "
                        f"{getattr(token_ids, 'dtype', type(token_ids).__name__)}")
    ids = token_ids.reshape(-1).long()
    if ids.shape[0] != tokens:
        raise InputError(f"router='hash': token_ids has {ids.shape[0]} ids for {tokens} tokens")
    cols = []
    for j in range(top_k):
        mult = _HASH_MULTIPLIERS[j % len(_HASH_MULTIPLIERS)] + 2 * (j // 4)
        # Mul and Mod only: integer-exact in every ONNX runtime (a floor division would be
        # lowered through float32 and lose the low bits of these 31-bit values)
        h = torch.remainder(ids * mult, _HASH_PRIME)
        cols.append(torch.remainder(h, num_experts))
    indices = torch.stack(cols, dim=1) if cols else ids.new_zeros(tokens, 0)
    weights = torch.full(indices.shape, 1.0 / top_k, device=ids.device)
    return weights, indices


def expert_choice(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each expert takes its ceil(T·k/E) most probable tokens; a token gets 0..E experts
    (slots padded with weight 0)."""
    t, e = logits.shape
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
    # tokens compete for experts: a token with non-finite logits must not win a slot (NaN
    # would outrank every real token) and so push a real token out
    probs = torch.where(torch.isfinite(probs), probs, -1.0)
    cap = min(t, math.ceil(t * top_k / e))
    chosen = torch.zeros_like(probs)
    if cap:
        chosen.scatter_(0, probs.topk(cap, dim=0).indices, 1.0)  # each expert's tokens
    slots = max(1, int(chosen.sum(1).max().item())) if t else 1
    top, indices = (probs * chosen + chosen).topk(slots, dim=1)  # chosen ones first
    weights = torch.where(top > 1, top - 1, torch.zeros_like(top))
    return weights, indices


def capacity_mask(indices: torch.Tensor, used: torch.Tensor, num_experts: int, top_k: int,
                  capacity_factor: float) -> torch.Tensor:
    """The used slots that fit their expert's capacity ceil(T·k/E·cf), in token order."""
    t, slots = indices.shape
    capacity = math.ceil(t * top_k / num_experts * capacity_factor)
    onehot = nn.functional.one_hot(indices.reshape(-1), num_experts)
    onehot = onehot * used.reshape(-1, 1)  # (T·slots, E), token order
    position = (onehot.cumsum(0) * onehot).sum(1).reshape(t, slots)  # 1-based
    return used & (position <= capacity)


def select(logits: torch.Tensor, kind: str, top_k: int, *, combine: str = "softmax",
           capacity_factor: float | None = None, top_p: float = 0.5,
           selection_bias: torch.Tensor | None = None, token_ids: torch.Tensor | None = None,
           training: bool = False) -> Selection:
    """Routing decision from router logits (T, E). Pure: changes nothing."""
    t, num_experts = logits.shape
    if kind == "hash":
        weights, indices = hash_experts(token_ids, t, num_experts, top_k)
    elif kind == "sigmoid":
        scores = torch.sigmoid(logits.float())
        biased = scores if selection_bias is None else scores + selection_bias
        indices = torch.topk(biased, top_k, dim=-1).indices
        top = scores.gather(1, indices)
        weights = top / top.sum(-1, keepdim=True).clamp_min(1e-20)
    elif kind == "expert_choice":
        weights, indices = expert_choice(logits, top_k)
    else:
        top, indices = torch.topk(logits, top_k, dim=-1)  # (T, k)
        # softmax over the k selected == softmax over all E, renormalised over the k
        weights = torch.softmax(top, dim=-1, dtype=torch.float32)
        if kind == "topp":
            probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, indices)
            keep = (probs.cumsum(-1) - probs) < top_p  # mass before this one < p
            weights = weights * keep
            weights = weights / weights.sum(-1, keepdim=True)
    # which slots hold an expert (top-p and expert choice pad with weight 0); the plain
    # inference path does not need it
    needs_used = combine == "sum" or capacity_factor is not None or training
    # a slot is used unless its weight is exactly 0: a NaN weight (a NaN token) stays used, so
    # the token's own output shows the NaN instead of a made-up finite value
    used = weights != 0 if needs_used else None
    if combine == "sum":
        # unweighted; in training the router's gradient passes straight through
        grad = weights - weights.detach() if training else 0
        weights = used.float() + grad
    dropped = None
    if capacity_factor is not None:
        keep = capacity_mask(indices, used, num_experts, top_k, capacity_factor)
        dropped = used & ~keep
        used = keep
        weights = weights * used
    return Selection(weights, indices, logits, used, dropped)


def auxiliary_losses(selection: Selection, num_experts: int) -> dict[str, torch.Tensor]:
    """Switch load-balancing loss E·Σ_e f_e·P_e and the router z-loss (mean logsumexp²);
    zero (and still differentiable) for zero tokens."""
    logits, indices, used = selection.logits, selection.indices, selection.used
    if logits.shape[0] == 0:
        zero = logits.float().sum() * 0
        return {"balance": zero, "z": zero}
    load = expert_load(indices, used, num_experts)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    frac = load / load.sum().clamp_min(1)
    return {"balance": num_experts * (frac * probs.mean(0)).sum(),
            "z": torch.logsumexp(logits.float(), dim=-1).pow(2).mean()}


def expert_load(indices: torch.Tensor, used: torch.Tensor | None,
                num_experts: int) -> torch.Tensor:
    """Assignments per expert (E,), counting only used slots."""
    ones = (torch.ones(indices.numel(), device=indices.device) if used is None
            else used.reshape(-1).float())
    return torch.zeros(num_experts, device=indices.device).index_add_(
        0, indices.reshape(-1), ones)
