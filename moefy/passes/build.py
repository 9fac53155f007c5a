"""Builders: a matched dense FFN ⇒ a ``moefy.MoE`` holding its weights.

    upcycle:  W1, W2  ⇒  E copies (+ a new router);  softmax weights sum to 1, so exact at init
    split:    W1, W2  ⇒  neuron groups P_e: expert e = W1[P_e], W2[:, P_e];  Σ experts + b2 = FFN
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn as nn

from moefy.config import MoEConfig
from moefy.errors import ConversionError
from moefy.layers.moe import MoE
from moefy.layers.record import ConversionRecord
from moefy.passes.calibrate import FFNStats
from moefy.passes.find_ffn import FFNMatch
from moefy.passes.fit import fit_compensation, fit_layer, set_router
from moefy.passes.partition import partition_neurons
from moefy.passes.projection import Projection


@dataclass
class DenseWeights:
    """A dense FFN in nn.Linear layout: w_in (I, H), w_gate (I, H), w_out (O, I); O is H
    except for a block that changes the width (a classifier head)."""

    w_in: torch.Tensor
    w_out: torch.Tensor
    w_gate: torch.Tensor | None
    b_in: torch.Tensor | None
    b_gate: torch.Tensor | None
    b_out: torch.Tensor | None
    # a name in moefy.activations.ACTIVATIONS, or the element-wise module h ↦ act(h) that
    # the graph computes when it is none of them (FFNMatch.activation_fn), or the whole
    # hidden function when a norm reads every neuron (find_ffn.NormedHidden)
    activation: str | nn.Module
    # why the neurons cannot be cut into experts or shards (a norm over the hidden width);
    # None when they can
    indivisible: str | None = None

    @property
    def hidden_size(self) -> int:
        return self.w_in.shape[1]

    @property
    def ffn_size(self) -> int:
        return self.w_in.shape[0]

    @property
    def output_size(self) -> int:
        return self.w_out.shape[0]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    """A parameter or buffer of ``model`` by name (BatchNorm statistics are buffers)."""
    try:
        return model.get_parameter(name)
    except AttributeError:
        return model.get_buffer(name)


def _linear_weight(model: nn.Module, proj: Projection) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(W, b) in nn.Linear layout, with the per-feature affine maps after the projection
    (eval-mode BatchNorm, x · s + t) folded in: W ← s·W, b ← s·b + t."""
    w = model.get_parameter(proj.weight).detach()
    w = w.flatten(1) if w.dim() > 2 else w  # 1×1 convolution: (out, in, 1, 1)
    w = w.t() if proj.transposed else w  # Conv1D, x @ W: stored (in, out)
    b = None if proj.bias is None else model.get_parameter(proj.bias).detach()
    for step in proj.affine:
        scale, shift = step.scale_shift(lambda name: _tensor(model, name))
        scale, shift = scale.to(w.device), shift.to(w.device)
        b = (shift if b is None else b.double() * scale + shift).to(w.dtype)
        w = (w.double() * scale[:, None]).to(w.dtype)
    return w, b


def _normed(model: nn.Module, match: FFNMatch, dense: DenseWeights) -> DenseWeights:
    """An FFN with a norm over its hidden width (sub-LN) as one plain FFN whose activation is
    the whole hidden function (``NormedHidden``): gated, w_in = [W_gate; W_up] and
    w_out = [W_down, 0]; the norm's weight γ and bias β fold into the second projection
    (W_down · diag(γ), b_down + W_down β)."""
    norm, f = match.hidden_norm, dense.ffn_size
    w_out, b_out = dense.w_out, dense.b_out
    if norm.bias is not None:
        beta = _tensor(model, norm.bias).detach()
        b_out = (w_out.double() @ beta.double() + (0 if b_out is None else b_out.double()))
        b_out = b_out.to(w_out.dtype)
    if norm.weight is not None:
        w_out = w_out * _tensor(model, norm.weight).detach()[None, :]
    w_in, b_in, gated = dense.w_in, dense.b_in, dense.w_gate is not None
    if gated:
        w_in = torch.cat([dense.w_gate, w_in])
        w_out = torch.cat([w_out, torch.zeros_like(w_out)], dim=1)
        if b_in is not None or dense.b_gate is not None:
            b_in = torch.cat([_zeros_if_none(dense.b_gate, f, w_in),
                              _zeros_if_none(b_in, f, w_in)])
    why = (f"a {norm.kind.replace('_', ' ')} over its {f} hidden features (between the "
           f"activation and {match.down.weight}) reads every neuron at once")
    return DenseWeights(w_in, w_out, None, b_in, None, b_out,
                        norm.hidden_fn(dense.activation, gated, f), indivisible=why)


def dense_weights(model: nn.Module, match: FFNMatch) -> DenseWeights:
    """Read a matched FFN's weights from ``model``, normalised to nn.Linear layout, and its
    activation (a name, or the matched element-wise module for ``"custom"``).

    ``find_ffns`` already rejects FFNs whose widths do not fit a MoE; the check here guards
    matches built by hand."""
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
    if w_out.shape[1] != w_in.shape[0]:
        raise ConversionError(
            f"{match.name}: second projection {tuple(w_out.shape)} does not fit the first "
            f"{tuple(w_in.shape)}")
    activation = match.activation_fn if match.activation == "custom" else match.activation
    if activation is None:
        raise ConversionError(f"{match.name}: a custom activation without its subgraph "
                              "(FFNMatch.activation_fn)")
    dense = DenseWeights(w_in, w_out, w_gate, b_in, b_gate, b_out, activation)
    return dense if match.hidden_norm is None else _normed(model, match, dense)


def check_divisible(name: str, dense: DenseWeights, config: MoEConfig) -> None:
    """Raise (before anything changes) when the FFN cannot be cut as asked."""
    if dense.indivisible is not None and (config.method != "upcycle" or config.granularity != 1):
        raise ConversionError(
            f"{name}: {dense.indivisible}, so its neurons cannot be cut into experts or shards "
            f"(method={config.method!r}, granularity={config.granularity}). method='upcycle' "
            "with granularity=1 converts it exactly (each expert a whole copy); or leave it "
            "dense with MoEConfig(skip=[...])")
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
             shared_size: int = 0, bias: bool = False) -> MoE:
    bias = bias or dense.b_in is not None or dense.b_out is not None
    with torch.device("meta"):  # no random init of weights the builder overwrites anyway
        moe = MoE(dense.hidden_size, expert_size, config.num_experts, config.top_k,
                  activation=dense.activation, gated=dense.w_gate is not None, bias=bias,
                  shared_expert_size=shared_size, combine=combine, router=config.router,
                  capacity_factor=config.capacity_factor, top_p=config.top_p,
                  output_size=dense.output_size)
    moe = moe.to(dense.w_in.dtype).to_empty(device=dense.w_in.device)
    # to_empty leaves whatever was in memory: zero everything, so that what the builders do
    # not set (the sigmoid router's selection bias, the noisy router's noise weights) starts
    # where MoE.__init__ puts it, and no stale memory ever reaches a model or a file
    for t in [*moe.parameters(), *moe.buffers()]:
        t.zero_()
    return moe


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
    b_out = _zeros_if_none(dense.b_out, dense.output_size, dense.w_in)
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

    Shared neurons: the most often marked on calibration data (CMoE: among a token's
    strongest activations), or without data the largest weight mass ‖W1 row‖·‖W2 column‖.
    The rest are partitioned into E experts. With statistics and ``config.compensate``,
    each expert's mean calibration output c_e moves into the always-on part: expert e
    outputs f_e(x) − c_e and the shared bias gains Σ_e c_e, so skipping an expert costs
    its deviation from its mean, and with every expert selected the sum is unchanged.
    """
    E, S, n = config.num_experts, config.shared_experts, dense.ffn_size
    size = n // (E + S)
    if stats is not None:
        score = stats.marked + stats.active / max(stats.tokens, 1)  # ties: plain activity
    else:
        score = (dense.w_in.float().norm(dim=1) * dense.w_out.float().norm(dim=0)).cpu()
    order = torch.argsort(score, descending=True, stable=True)
    shared_idx = order[: S * size].sort().values
    rest = order[S * size:].sort().values
    coact = None if stats is None else stats.correlation()[rest][:, rest]
    parts = partition_neurons(dense.w_in[rest],
                              None if dense.w_gate is None else dense.w_gate[rest], E,
                              config.partition, generator, coactivation=coact)
    groups = [rest[p] for p in parts]
    compensate = stats is not None and config.compensate is not False
    moe = _new_moe(dense, size, config, combine="sum", shared_size=S * size,
                   bias=compensate)
    b_in = _zeros_if_none(dense.b_in, n, dense.w_in)
    b_gate = _zeros_if_none(dense.b_gate, n, dense.w_in)
    b_out = _zeros_if_none(dense.b_out, dense.output_size, dense.w_in)
    means = torch.zeros(E, dense.output_size, device=dense.w_in.device)
    if compensate:
        mean_h = stats.mean_h.to(dense.w_in.device)  # statistics live on the CPU
        means = torch.stack([dense.w_out[:, idx].float() @ mean_h[idx] for idx in groups])
    for e, idx in enumerate(groups):
        moe.w_in[e] = dense.w_in[idx]
        moe.w_out[e] = dense.w_out[:, idx]
        if moe.w_gate is not None:
            moe.w_gate[e] = dense.w_gate[idx]
        if moe.b_in is not None:
            moe.b_in[e] = b_in[idx]
            moe.b_out[e] = -means[e]  # the output bias itself is added once, by the shared part
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
    if dense.b_out is not None or compensate:
        moe.shared.bias = nn.Parameter((b_out.float() + means.sum(0)).to(dense.w_in.dtype))
    moe.expert_neurons = [idx.tolist() for idx in groups]
    moe.shared_neurons = shared_idx.tolist()
    init = config.router_init or ("fit" if stats is not None else "similarity")
    if init == "fit" and stats is not None and stats.inputs.shape[0] < 64 * E:
        if config.router_init == "fit":
            warnings.warn(f"router_init='fit' on {stats.inputs.shape[0]} calibration tokens "
                          f"(fewer than {64 * E} for {E} experts) may overfit", stacklevel=2)
        else:  # the default: fall back quietly to the training-free router
            init = "similarity"
    if init in ("fit", "representative") and stats is None:
        raise ConversionError(f"router_init={init!r} needs calibration_data")
    fit_info = set_router(moe, dense, groups, init, stats, generator)
    mode = "none" if not compensate else (config.compensate or "linear")
    if mode == "linear" and stats.inputs.shape[0] < 8 * dense.hidden_size:
        # a (hidden × hidden) least-squares fit on fewer tokens would learn their noise
        warnings.warn(f"compensate='linear' needs at least {8 * dense.hidden_size} calibration "
                      f"tokens for this FFN, got {stats.inputs.shape[0]}: using 'mean'",
                      stacklevel=2)
        mode = "mean"
    if mode == "linear" and config.top_k < E:
        rank = config.compensate_rank or dense.hidden_size // 3
        fit_info.update(fit_compensation(moe, dense, stats.inputs, rank))
    if config.fit_steps and stats is not None and config.top_k < E:
        fit_info.update(fit_layer(moe, dense, stats.inputs, config.fit_steps, generator))
    if stats is not None:
        fit_info.update(calibration_tokens=stats.tokens, calibration_skipped=stats.skipped)
    moe.conversion = ConversionRecord(router_init=init, compensation=mode, measured=fit_info)
    return moe
