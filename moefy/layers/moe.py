"""``moefy.MoE``: a routed mixture of FFN experts plus an always-on part.

    x (..., H) → router → top-k (weights, indices) → experts (sparse dispatch) → combine
               └──────────────────────────── shared (always on) ─────────────────┘ → + → y (..., O)

O, the output width, is H unless the layer replaces a block that changes the width (the last
block of a tabular MLP, a classifier head: ``output_size``).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moefy.activations import get_activation
from moefy.errors import ExpertParallelError
from moefy.layers import routers
from moefy.layers.inputs import check_layer_input
from moefy.layers.record import ConversionRecord
from moefy.layers.routers import ROUTERS, Selection
from moefy.layers.shard import ExpertShard
from moefy.layers.tokens import current_token_ids
from moefy.runtime import ops as _ops  # noqa: F401  (registers torch.ops.moefy.*)
from moefy.runtime.dispatch import ExpertRunner
from moefy.runtime.experts import ExpertWeights, expert_forward

COMBINES = ("softmax", "sum")


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    # nn.Linear's default initialisation, per expert.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.init.uniform_(t, -bound, bound)


def _check_capacity_factor(value) -> None:
    if value is not None and not (isinstance(value, (int, float)) and not isinstance(value, bool)
                                  and math.isfinite(value) and value > 0):
        raise ValueError(f"MoE: capacity_factor must be None (dropless) or a finite number > 0, "
                         f"got {value!r}")


def _set_activation(module: nn.Module, activation) -> None:
    """``module.activation``: a name; a custom element-wise function (an ``nn.Module``, e.g.
    the subgraph found between an FFN's projections) is kept as ``module.activation_fn``
    (a submodule: it is copied, moved and saved with the layer) under the name "custom"."""
    if isinstance(activation, nn.Module):
        module.activation = "custom"
        module.activation_fn = activation
    else:
        module.activation = get_activation(activation).name
        module.activation_fn = None


class DenseFFN(nn.Module):
    """A plain FFN ``W_out · act(W_in x + b_in) + b_out`` (gated: ``act(W_g x) * (W_in x)``),
    H → O (``output_size``, default H)."""

    def __init__(self, hidden_size: int, ffn_size: int, *, activation="gelu",
                 gated: bool = False, bias: bool = True, output_size: int | None = None):
        super().__init__()
        _set_activation(self, activation)
        self.fc_in = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.fc_gate = nn.Linear(hidden_size, ffn_size, bias=bias) if gated else None
        self.fc_out = nn.Linear(ffn_size, output_size or hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = get_activation(self.activation_fn or self.activation).fn
        h = self.fc_in(x)
        h = act(h) if self.fc_gate is None else act(self.fc_gate(x)) * h
        return self.fc_out(h)


class SharedExperts(nn.Module):
    """The always-on part of an MoE: shared experts (one dense FFN), an output bias and a
    low-rank linear compensation ``up(down(x))`` (an estimate of what the skipped experts
    would have added, fitted on calibration data).

    Any may be absent; with none, ``forward`` returns zeros. Maps H → O (``output_size``,
    default H).
    """

    def __init__(self, hidden_size: int, ffn_size: int = 0, *, activation="gelu",
                 gated: bool = False, bias: bool = True, output_size: int | None = None):
        super().__init__()
        self.hidden_size = hidden_size
        self.output_size = output_size or hidden_size
        self.ffn = (
            DenseFFN(hidden_size, ffn_size, activation=activation, gated=gated, bias=bias,
                     output_size=self.output_size)
            if ffn_size > 0 else None
        )
        self.bias: nn.Parameter | None = None  # (O,)
        self.compensation: nn.Sequential | None = None  # Linear(H, r) → Linear(r, O) + bias
        # Off when the MoE selects every expert: nothing is skipped, nothing to compensate.
        self.use_compensation = True

    @property
    def is_empty(self) -> bool:
        return self.ffn is None and self.bias is None and self.compensation is None

    def set_compensation(self, down: torch.Tensor, up: torch.Tensor,
                         bias: torch.Tensor) -> None:
        """Install the linear compensation x ↦ up @ (down @ x) + bias: down (r, H),
        up (O, r), bias (O,)."""
        r, h = down.shape
        lin = nn.Sequential(nn.Linear(h, r, bias=False), nn.Linear(r, up.shape[0], bias=True))
        lin = lin.to(device=down.device, dtype=down.dtype)
        with torch.no_grad():
            lin[0].weight.copy_(down)
            lin[1].weight.copy_(up)
            lin[1].bias.copy_(bias)
        self.compensation = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn is None:
            y = x.new_zeros(x.shape[:-1] + (self.output_size,))
        else:
            y = self.ffn(x)
        if self.compensation is not None and self.use_compensation:
            y = y + self.compensation(x)
        return y if self.bias is None else y + self.bias


class _ExpertView(nn.Module):
    """Routed expert ``index`` of an MoE as a standalone dense FFN sharing its weights."""

    def __init__(self, moe: MoE, index: int):
        super().__init__()
        object.__setattr__(self, "_moe", moe)  # not a submodule: no cycle, no double parameters
        self.index = index

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return expert_forward(x, self._moe.expert_weights(), self.index)

    def extra_repr(self) -> str:
        return f"expert={self.index}"


class MoE(nn.Module):
    """A sparse Mixture-of-Experts FFN layer.

    Experts are stored stacked in ONNX Runtime's layout: ``w_in`` (E, I, H), ``w_gate``
    (E, I, H) when gated, ``w_out`` (E, O, I), biases (E, I) and (E, O).

    Args:
        hidden_size: H, the model width (the input's last dim).
        expert_size: I, each routed expert's hidden width.
        num_experts: E, routed experts.
        top_k: experts per token.
        activation: relu | gelu | gelu_tanh | silu | squared_relu | quick_gelu | hardswish,
            or an ``nn.Module`` computing any element-wise function (kept as
            ``activation_fn``; such layers run on the generic paths).
        gated: experts compute ``act(gate(x)) * in(x)`` (SwiGLU / GeGLU).
        bias: experts carry biases.
        shared_expert_size: width of the always-on shared FFN (0: none).
        combine: "softmax" weights the k experts by a softmax over their logits (Mixtral);
            "sum" adds them unweighted (function-preserving neuron splits).
        router: how the linear router's logits select experts (``moefy.layers.routers``):
            "softmax": top-k of the logits (Mixtral);
            "noisy": as softmax, plus N(0,1)·softplus(W_noise x) on the logits in training;
            "sigmoid": s = σ(logits), top-k of s + b where b is a per-expert bias nudged after
            every training forward toward balance (DeepSeek-V3, no aux loss), weights s
            renormalised over the k;
            "topp": experts in descending probability until their sum reaches ``top_p``,
            at least 1 and at most ``top_k`` (unused slots carry weight 0);
            "expert_choice": each expert takes its ceil(T·k/E) highest-probability tokens,
            so a token gets 0..E experts (padded with weight-0 slots; not causal);
            "hash": expert = a fixed hash of the token id mod E (``token_ids`` needed; no
            parameters are used).
        capacity_factor: None (dropless) or a finite number > 0: each expert takes at most
            ceil(T·k/E·capacity_factor) assignments per forward, in token order; the rest are
            dropped (weight 0) and counted in ``last_dropped``.
        top_p: probability mass for ``router="topp"``.
        output_size: O, the output's last dim; default H. Another width holds a block that
            changes it (the last block of a tabular MLP, a classifier head).

    In training mode each forward leaves ``last_aux`` (Switch load-balancing loss and router
    z-loss, differentiable; see ``moefy.aux_loss``). ``expert_dropout`` (default 0) drops
    routed assignments at random in training. ``route`` changes nothing; ``forward`` records
    ``last_aux``, ``last_dropped`` and (sigmoid router, training) nudges ``selection_bias``.

    Contract: ``moe(x)[t] == sum_j w[t, j] * moe.expert(i[t, j])(x[t]) + moe.shared(x[t])``
    with ``w, i = moe.route(x)``, where a slot of weight 0 contributes nothing.

    Modes: the same results under grad, ``no_grad`` and ``inference_mode`` (weights created
    in it too), train and eval, and from several threads at once. CPU float32 inference keeps
    a oneDNN-prepacked copy of the experts (``prepack``), rebuilt when the weights change:
    changes through autograd-visible in-place ops and new tensors are always seen; edits that
    bypass the version counter (``.data``, inference tensors) are caught by a sampled
    fingerprint of every weight row; after editing single elements that way, call
    ``invalidate()``.

    >>> moe = MoE(16, 32, num_experts=4, top_k=2)
    >>> moe(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 16])
    """

    def __init__(self, hidden_size: int, expert_size: int, num_experts: int, top_k: int, *,
                 activation="gelu", gated: bool = False, bias: bool = True,
                 shared_expert_size: int = 0, combine: str = "softmax",
                 router: str = "softmax", capacity_factor: float | None = None,
                 top_p: float = 0.5, output_size: int | None = None):
        super().__init__()
        output_size = hidden_size if output_size is None else output_size
        for name, value in (("hidden_size", hidden_size), ("expert_size", expert_size),
                            ("num_experts", num_experts), ("top_k", top_k),
                            ("output_size", output_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MoE: {name} must be a positive int, got {value!r}")
        if top_k > num_experts:
            raise ValueError(f"MoE: top_k ({top_k}) cannot exceed num_experts ({num_experts})")
        if not isinstance(shared_expert_size, int) or shared_expert_size < 0:
            raise ValueError(
                f"MoE: shared_expert_size must be an int >= 0, got {shared_expert_size!r}")
        if combine not in COMBINES:
            raise ValueError(f"MoE: combine must be one of {COMBINES}, got {combine!r}")
        if router not in ROUTERS:
            raise ValueError(f"MoE: router must be one of {ROUTERS}, got {router!r}")
        _set_activation(self, activation)
        self.hidden_size, self.expert_size = hidden_size, expert_size
        self.output_size = output_size
        self.num_experts, self._top_k = num_experts, top_k
        self.gated, self.combine, self.router_type = gated, combine, router
        self.capacity_factor, self.top_p = capacity_factor, top_p
        self.expert_dropout = 0.0
        self.bias_update_rate = 1e-3  # router="sigmoid": balancing step per training forward
        self.last_aux: dict[str, torch.Tensor] | None = None
        self.last_dropped = 0
        # Keep a oneDNN-prepacked copy of the experts for CPU float32 inference.
        self.prepack = True
        # Set by split conversions: the dense FFN's neuron indices of each routed expert.
        self.expert_neurons: list[list[int]] | None = None
        self.shared_neurons: list[int] | None = None

        E, I, H, O = num_experts, expert_size, hidden_size, output_size
        self.router = nn.Linear(H, E, bias=False)
        self.router_noise = nn.Linear(H, E, bias=False) if router == "noisy" else None
        if self.router_noise is not None:
            nn.init.zeros_(self.router_noise.weight)
        if router == "sigmoid":
            self.register_buffer("selection_bias", torch.zeros(E))
        self.w_in = nn.Parameter(_uniform_(torch.empty(E, I, H), H))
        self.w_gate = nn.Parameter(_uniform_(torch.empty(E, I, H), H)) if gated else None
        self.w_out = nn.Parameter(_uniform_(torch.empty(E, O, I), I))
        self.b_in = nn.Parameter(_uniform_(torch.empty(E, I), H)) if bias else None
        self.b_gate = nn.Parameter(_uniform_(torch.empty(E, I), H)) if bias and gated else None
        self.b_out = nn.Parameter(_uniform_(torch.empty(E, O), I)) if bias else None
        self.shared = SharedExperts(H, shared_expert_size, activation=activation, gated=gated,
                                    bias=bias, output_size=O)
        self._runner = ExpertRunner()
        # This rank's block of the routed experts under expert parallelism, else None.
        self.shard: ExpertShard | None = None
        # How convert made this layer from a dense FFN (empty when built directly).
        self.conversion = ConversionRecord()

    # ------------------------------------------------------------------ public
    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_experts:
            raise ValueError(f"MoE: top_k must be an int in [1, {self.num_experts}], got {k!r}")
        self._top_k = k
        self.shared.use_compensation = k < self.num_experts

    @property
    def capacity_factor(self) -> float | None:
        return self._capacity_factor

    @capacity_factor.setter
    def capacity_factor(self, value: float | None) -> None:
        _check_capacity_factor(value)
        self._capacity_factor = value

    @property
    def expert_dropout(self) -> float:
        return self._expert_dropout

    @expert_dropout.setter
    def expert_dropout(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
                0 <= value < 1):
            raise ValueError(f"MoE: expert_dropout must be a number in [0, 1), got {value!r}")
        self._expert_dropout = float(value)

    @property
    def top_p(self) -> float:
        return self._top_p

    @top_p.setter
    def top_p(self, value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise ValueError(f"MoE: top_p must be in (0, 1], got {value!r}")
        self._top_p = float(value)

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing decision for the flattened tokens of ``x`` (..., H): (weights, indices),
        each (tokens, slots) — slots is ``top_k`` except for "topp" (≤ top_k) and
        "expert_choice" (≤ E), where unused slots carry weight 0. Changes nothing."""
        sel = self.select(self._flatten(x), token_ids)
        return sel.weights.to(x.dtype), sel.indices

    def select(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> Selection:
        """``route`` with everything the router computed (``moefy.layers.routers.Selection``:
        weights, indices, logits, used and dropped slots) for flattened tokens ``x`` (T, H).
        Changes nothing."""
        logits = self.router(x)  # (T, E)
        if self.router_noise is not None and self.training:
            noise = nn.functional.softplus(self.router_noise(x))
            logits = logits + torch.randn_like(logits) * noise
        if token_ids is None and self.router_type == "hash":
            token_ids = current_token_ids()  # pushed around a converted model's forward
        sel = routers.select(
            logits, self.router_type, self.top_k, combine=self.combine,
            capacity_factor=self.capacity_factor, top_p=self.top_p,
            selection_bias=getattr(self, "selection_bias", None), token_ids=token_ids,
            training=self.training)
        weights = sel.weights
        if self.training and self.expert_dropout > 0:
            keep = torch.rand_like(weights) >= self.expert_dropout
            weights = weights * keep / (1 - self.expert_dropout)
        return sel._replace(weights=weights)

    def expert(self, e: int) -> nn.Module:
        """Routed expert ``e`` as a standalone dense FFN that shares this layer's weights."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert index {e} out of range for {self.num_experts} experts")
        if self.shard is not None:
            raise ExpertParallelError("expert(e) of a layer sharded by expert_parallel: this "
                                      "rank holds only its own experts")
        return _ExpertView(self, e)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w_in, self.w_out, self.w_gate, self.b_in, self.b_gate,
                             self.b_out, self.activation_fn or self.activation)

    def invalidate(self) -> None:
        """Drop the prepacked copy of the expert weights (rebuilt on the next call). Needed
        only after editing single weight elements in a way autograd does not see (through
        ``.data``, or on inference tensors); everything else is detected."""
        self._runner.invalidate()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        x2 = self._flatten(x)
        lead = x.shape[:-1]
        sel = self.select(x2, token_ids)
        if not torch.compiler.is_compiling():  # counts and training state, not graph
            self.last_dropped = 0 if sel.dropped is None else int(sel.dropped.sum())
        y = self.routed(x2, sel.weights.to(x2.dtype), sel.indices)
        if self.training:  # after routed: with expert parallelism its exchange checks first
            # that every rank is in the same mode, before this all-reduces the sigmoid load
            self._record_training(sel)
        if not self.shared.is_empty:
            y = y + self.shared(x2)
        return y.reshape(*lead, self.output_size)

    def routed(self, x: torch.Tensor, weights: torch.Tensor,
               indices: torch.Tensor) -> torch.Tensor:
        """Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]) for flattened tokens x (T, H), as
        (T, O); the runtime picks the kernel (``moefy.runtime.dispatch.ExpertRunner``); with
        ``moefy.distributed.expert_parallel`` the experts run on the ranks that own them."""
        if self.shard is not None and self.shard.world > 1:  # one rank: no exchange
            return self.shard.routed(self, x, weights, indices)
        return self.run_experts(x, weights, indices, capacity_factor=self.capacity_factor)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, *,
                    capacity_factor: float | None = None) -> torch.Tensor:
        """Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]) over the experts this process
        holds (indices local to its block when sharded; weight-0 slots skipped).
        ``capacity_factor`` only travels into an exported graph: routing applied it."""
        return self._runner(x, weights, indices, self.expert_weights(),
                            training=self.training, prepack=self.prepack,
                            capacity_factor=capacity_factor)

    # ------------------------------------------------------------------ internals
    def _record_training(self, sel: Selection) -> None:
        self.last_aux = routers.auxiliary_losses(sel, self.num_experts)
        shard = self.shard
        if self.router_type == "sigmoid" and (sel.indices.shape[0] or shard is not None):
            load = routers.expert_load(sel.indices, sel.used, self.num_experts)
            if shard is not None:  # the replicated bias follows every rank's load alike
                shard.reduce_load(load)
            step = self.bias_update_rate * torch.sign(load.mean() - load)
            with torch.no_grad():
                if torch.compiler.is_compiling() or not self.selection_bias.is_inference() or (
                        torch.is_inference_mode_enabled()):
                    self.selection_bias += step
                else:  # made under inference_mode: replaced, as it cannot change in place here
                    self.selection_bias = self.selection_bias + step

    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.hidden_size, self.w_in, "MoE", "moe")
        return x.reshape(-1, self.hidden_size)

    def __getstate__(self):
        # the last training forward's auxiliary losses hold its autograd graph, which neither
        # deepcopies nor pickles; a copy starts without them
        state = super().__getstate__() if hasattr(super(), "__getstate__") else dict(
            self.__dict__)
        return {**state, "last_aux": None}

    def extra_repr(self) -> str:
        act = self.activation if self.activation_fn is None else "custom"
        return (f"hidden_size={self.hidden_size}, expert_size={self.expert_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={act!r}, gated={self.gated}, "
                f"combine={self.combine!r}"
                + ("" if self.output_size == self.hidden_size
                   else f", output_size={self.output_size}"))

