"""The stacked expert weights that every dispatch implementation reads.

Layout is ONNX Runtime's ``com.microsoft.MoE`` layout, i.e. stacked ``nn.Linear`` weights:
``w_in`` (E, I, H), ``w_gate`` (E, I, H) when gated, ``w_out`` (E, O, I); biases (E, I) / (E, O).
O, the output width, is H except for a block that changes the width (a classifier head).
A gated expert computes ``act(x @ w_gate[e].T + b_gate[e]) * (x @ w_in[e].T + b_in[e])``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from moefy.activations import get_activation


class ExpertWeights(NamedTuple):
    w_in: torch.Tensor  # (E, I, H)
    w_out: torch.Tensor  # (E, O, I)
    w_gate: torch.Tensor | None = None  # (E, I, H)
    b_in: torch.Tensor | None = None  # (E, I)
    b_gate: torch.Tensor | None = None  # (E, I)
    b_out: torch.Tensor | None = None  # (E, O)
    activation: str = "gelu"

    @property
    def num_experts(self) -> int:
        return self.w_in.shape[0]

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[2]

    @property
    def expert_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def output_size(self) -> int:
        return self.w_out.shape[1]


def _row(t: torch.Tensor | None, e: int) -> torch.Tensor | None:
    return None if t is None else t[e]


def expert_hidden(x: torch.Tensor, ew: ExpertWeights, e: int) -> torch.Tensor:
    """Expert ``e``'s hidden activation for rows ``x`` (n, H) -> (n, I)."""
    act = get_activation(ew.activation).fn
    a = F.linear(x, ew.w_in[e], _row(ew.b_in, e))
    if ew.w_gate is None:
        return act(a)
    return act(F.linear(x, ew.w_gate[e], _row(ew.b_gate, e))) * a


def expert_forward(x: torch.Tensor, ew: ExpertWeights, e: int) -> torch.Tensor:
    """Expert ``e`` as a dense FFN on rows ``x`` (n, H) -> (n, O)."""
    return F.linear(expert_hidden(x, ew, e), ew.w_out[e], _row(ew.b_out, e))


def check_routing(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  ew: ExpertWeights) -> None:
    """Raise a readable error when the dispatch inputs do not fit together."""
    if x.dim() != 2 or x.shape[1] != ew.hidden_size:
        raise ValueError(f"expected x of shape (tokens, {ew.hidden_size}), got {tuple(x.shape)}")
    if indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"expected indices of shape ({x.shape[0]}, top_k), got {tuple(indices.shape)}")
    if weights.shape != indices.shape:
        raise ValueError(
            f"weights {tuple(weights.shape)} and indices {tuple(indices.shape)} differ")
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"indices must be int32 or int64, got {indices.dtype}")
