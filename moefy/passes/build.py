"""Builders: a matched dense FFN ⇒ a ``moefy.MoE`` holding its weights.

    upcycle:  W1, W2  ⇒  E copies (+ a new router);  softmax weights sum to 1, so exact at init
    split:    W1, W2  ⇒  neuron groups P_e: expert e = W1[P_e], W2[:, P_e];  Σ experts + b2 = FFN
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from moefy.calibrate import FFNStats
from moefy.config import MoEConfig
from moefy.errors import ConversionError
from moefy.layers.moe import MoE
from moefy.passes.find_ffn import FFNMatch, Projection
from moefy.passes.partition import partition_neurons


@dataclass
class DenseWeights:
    """A dense FFN in nn.Linear layout: w_in (I, H), w_gate (I, H), w_out (H, I)."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    w_gate: torch.Tensor | None
    b_in: torch.Tensor | None
    b_gate: torch.Tensor | None
    b_out: torch.Tensor | None
    activation: str

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def ffn_size(self) -> int:
        return self.w_in.shape[0]


def _linear_weight(model: nn.Module, proj: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = model.get_parameter(proj.weight).detach()
    w = w.t() if proj.transposed else w  # Conv1D stores (in, out)
    b = None if proj.bias is None else model.get_parameter(proj.bias).detach()
    return w, b


def dense_weights(model: nn.Module, match: FFNMatch) -> DenseWeights:
    """Read a matched FFN's weights from ``model``, normalised to nn.Linear layout."""
    w_in, b_in = _linear_weight(model, match.up)
    w_out, b_out = _linear_weight(model, match.down)
    w_gate = b_gate = None
    if match.gate is not None:
        w_gate, b_gate = _linear_weight(model, match.gate)
    elif match.fused_gate_first is not None:
        first, second = w_in.chunk(2, dim=0)
        bf, bs = (None, None) if b_in is None else b_in.chunk(2)
        if match.fused_gate_first:
            w_gate, w_in, b_gate, b_in = first, second, bf, bs
        else:
            w_in, w_gate, b_in, b_gate = first, second, bf, bs
    if w_out.shape != (w_in.shape[1], w_in.shape[0]):
        raise ConversionError(
            f"{match.name}: second projection {tuple(w_out.shape)} does not fit the first "
            f"{tuple(w_in.shape)}")
    return DenseWeights(w_in, w_out, w_gate, b_in, b_gate, b_out, match.activation)


def check_divisible(name: str, dense: DenseWeights, config: MoEConfig) -> None:
    """Raise (before anything changes) when the FFN cannot be cut as asked."""
    width = dense.ffn_size
    if config.method == "upcycle" and width % config.granularity:
        raise ConversionError(
            f"{name}: the FFN width {width} does not cut into granularity="
            f"{config.granularity} equal shards")
    groups = config.num_experts + config.shared_experts
    if config.method == "split" and width % groups:
        options = [g for g in range(2, min(width, 256) + 1) if width % g == 0]
        raise ConversionError(
            f"{name}: the FFN width {width} does not split into num_experts + shared_experts "
            f"= {groups} equal experts. Use a total that divides {width}, e.g. one of "
            f"{options[:16]}")


def _new_moe(dense: DenseWeights, expert_size: int, config: MoEConfig, *, combine: str,
             shared_size: int = 0) -> MoE:
    bias = dense.b_in is not None or dense.b_out is not None
    with torch.device("meta"):  # no random init of weights the builder overwrites anyway
        moe = MoE(dense.hidden_size, expert_size, config.num_experts, config.top_k,
                  activation=dense.activation, gated=dense.w_gate is not None, bias=bias,
                  shared_expert_size=shared_size, combine=combine, router=config.router)
    return moe.to(dense.w_in.dtype).to_empty(device=dense.w_in.device)


def _zeros_if_none(t: torch.Tensor | None, n: int, like: torch.Tensor) -> torch.Tensor:
    return like.new_zeros(n) if t is None else t


@torch.no_grad()
def upcycle(dense: DenseWeights, config: MoEConfig, generator: torch.Generator) -> MoE:
    """E/G copies of the FFN, each cut into G shards, and a small random router: exact.

    G = 1 is sparse upcycling: E exact copies; softmax weights over the k chosen sum to 1.
    G > 1 is granular upcycling with virtual groups: the G shards of a copy share one router
    row, so top-k (k a multiple of G) takes whole copies and gives each shard 1/G of its
    copy's weight; shard outputs are scaled by G (biases: b_out once per copy), so the sum
    over a copy's shards is the dense FFN again.
    """
    E, G, H = config.num_experts, config.granularity, dense.hidden_size
    size = dense.ffn_size // G
    moe = _new_moe(dense, size, config, combine="softmax")
    b_in = _zeros_if_none(dense.b_in, dense.ffn_size, dense.w_in)
    b_gate = _zeros_if_none(dense.b_gate, dense.ffn_size, dense.w_in)
    b_out = _zeros_if_none(dense.b_out, H, dense.w_in)
    for e in range(E):
        rows = slice((e % G) * size, (e % G + 1) * size)  # shard e % G of copy e // G
        moe.w_in[e] = dense.w_in[rows]
        moe.w_out[e] = dense.w_out[:, rows] * G
        if moe.w_gate is not None:
            moe.w_gate[e] = dense.w_gate[rows]
        if moe.b_in is not None:
            moe.b_in[e] = b_in[rows]
            moe.b_out[e] = b_out
        if moe.b_gate is not None:
            moe.b_gate[e] = b_gate[rows]
    router = torch.randn(E // G, H, generator=generator) * 0.02
    moe.router.weight.copy_(router.repeat_interleave(G, dim=0).to(moe.router.weight.dtype))
    return moe


@torch.no_grad()
def split(dense: DenseWeights, config: MoEConfig, generator: torch.Generator,
          stats: FFNStats | None = None) -> MoE:
    """Partition the neurons into E routed + S shared experts; their sum is the FFN.

    Shared neurons: the most often active on calibration data (CMoE), or without data the
    largest weight mass ‖W1 row‖·‖W2 column‖. The rest are partitioned into E experts.
    """
    E, S, n = config.num_experts, config.shared_experts, dense.ffn_size
    size = n // (E + S)
    if stats is not None:
        score = stats.active
    else:
        score = dense.w_in.float().norm(dim=1) * dense.w_out.float().norm(dim=0)  # (I,)
    order = torch.argsort(score, descending=True, stable=True)
    shared_idx = order[: S * size].sort().values
    rest = order[S * size:].sort().values
    coact = None if stats is None else stats.correlation()[rest][:, rest]
    parts = partition_neurons(dense.w_in[rest],
                              None if dense.w_gate is None else dense.w_gate[rest], E,
                              config.partition, generator, coactivation=coact)
    groups = [rest[p] for p in parts]
    moe = _new_moe(dense, size, config, combine="sum", shared_size=S * size)
    b_in = _zeros_if_none(dense.b_in, n, dense.w_in)
    b_gate = _zeros_if_none(dense.b_gate, n, dense.w_in)
    for e, idx in enumerate(groups):
        moe.w_in[e] = dense.w_in[idx]
        moe.w_out[e] = dense.w_out[:, idx]
        if moe.w_gate is not None:
            moe.w_gate[e] = dense.w_gate[idx]
        if moe.b_in is not None:
            moe.b_in[e] = b_in[idx]
            moe.b_out[e].zero_()  # the output bias is added once, by the shared part
        if moe.b_gate is not None:
            moe.b_gate[e] = b_gate[idx]
    if S:
        ffn = moe.shared.ffn
        ffn.fc_in.weight.copy_(dense.w_in[shared_idx])
        ffn.fc_out.weight.copy_(dense.w_out[:, shared_idx])
        if ffn.fc_gate is not None:
            ffn.fc_gate.weight.copy_(dense.w_gate[shared_idx])
        if ffn.fc_in.bias is not None:
            ffn.fc_in.bias.copy_(b_in[shared_idx])
            ffn.fc_out.bias.zero_()
        if ffn.fc_gate is not None and ffn.fc_gate.bias is not None:
            ffn.fc_gate.bias.copy_(b_gate[shared_idx])
    if dense.b_out is not None:
        moe.shared.bias = nn.Parameter(dense.b_out.clone())
    # Training-free similarity router: each expert's centre, the mean direction of its
    # neurons' input weights (the gate's for gated FFNs, which decides what fires).
    key = dense.w_gate if dense.w_gate is not None else dense.w_in
    unit = nn.functional.normalize(key.float(), dim=1)
    centres = torch.stack([unit[idx].mean(0) for idx in groups])
    moe.router.weight.copy_(centres.to(moe.router.weight.dtype))
    moe.expert_neurons = [idx.tolist() for idx in groups]
    moe.shared_neurons = shared_idx.tolist()
    return moe
