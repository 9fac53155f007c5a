"""``moefy.MoE``: a routed mixture of FFN experts plus an always-on part.

    x (..., H) → router → top-k (weights, indices) → experts (sparse dispatch) → combine
               └──────────────────────────── shared (always on) ─────────────────┘ → + → y
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from moefy.activations import get_activation
from moefy.runtime import ops as _ops  # noqa: F401  (registers torch.ops.moefy.*)
from moefy.runtime._kernels import decode_kernels_available
from moefy.runtime.dispatch import (
    SMALL_BATCH_TOKENS,
    PackedExperts,
    decode_ffn,
    packed_path_applies,
    weights_key,
)
from moefy.runtime.experts import ExpertWeights, expert_forward

COMBINES = ("softmax", "sum")
ROUTERS = ("softmax", "noisy", "sigmoid", "topp", "expert_choice", "hash")
# Training with small experts: every expert for every token in two large GEMMs, unselected
# entries masked to zero, beats a per-expert loop of small GEMMs forward and backward when
# the (tokens, E·I) hidden tensor stays this small.
_MASKED_MAX_ELEMENTS = 1 << 26
_HASH_MULTIPLIERS = (0x9E3779B1, 0x85EBCA77, 0xC2B2AE3D, 0x27D4EB2F)  # odd: bijective mod 2^32


def _uniform_(t: torch.Tensor, fan_in: int) -> torch.Tensor:
    # nn.Linear's default initialisation, per expert.
    bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    return nn.init.uniform_(t, -bound, bound)


def _masked_dense(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  ew: ExpertWeights) -> torch.Tensor:
    """Σ_j weights[t, j] · expert_{indices[t, j]}(x[t]) computed as one masked dense FFN
    (differentiable by autograd; same values as the sparse dispatch)."""
    E, I, H = ew.w_in.shape
    t = x.shape[0]
    gate = x.new_zeros(t, E).index_put_(  # (T, E) routing weight of every expert
        (torch.arange(t, device=x.device).unsqueeze(1).expand_as(indices), indices),
        weights.to(x.dtype), accumulate=True)
    act = get_activation(ew.activation).fn
    flat = lambda w: w.reshape(E * I, H)  # noqa: E731
    bias = lambda b: None if b is None else b.reshape(E * I)  # noqa: E731
    h = nn.functional.linear(x, flat(ew.w_in), bias(ew.b_in))  # (T, E·I)
    if ew.w_gate is not None:
        h = act(nn.functional.linear(x, flat(ew.w_gate), bias(ew.b_gate))) * h
    else:
        h = act(h)
    h = (h.view(t, E, I) * gate.unsqueeze(-1)).view(t, E * I)
    y = h @ ew.w_out.permute(1, 0, 2).reshape(H, E * I).t()  # (T, H)
    if ew.b_out is not None:
        y = y + gate @ ew.b_out
    return y


class DenseFFN(nn.Module):
    """A plain FFN ``W_out · act(W_in x + b_in) + b_out`` (gated: ``act(W_g x) * (W_in x)``)."""

    def __init__(self, hidden_size: int, ffn_size: int, *, activation: str = "gelu",
                 gated: bool = False, bias: bool = True):
        super().__init__()
        self.activation = get_activation(activation).name
        self.fc_in = nn.Linear(hidden_size, ffn_size, bias=bias)
        self.fc_gate = nn.Linear(hidden_size, ffn_size, bias=bias) if gated else None
        self.fc_out = nn.Linear(ffn_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = get_activation(self.activation).fn
        h = self.fc_in(x)
        h = act(h) if self.fc_gate is None else act(self.fc_gate(x)) * h
        return self.fc_out(h)


class SharedExperts(nn.Module):
    """The always-on part of an MoE: shared experts (one dense FFN), an output bias and a
    low-rank linear compensation ``up(down(x))`` (an estimate of what the skipped experts
    would have added, fitted on calibration data).

    Any may be absent; with none, ``forward`` returns zeros.
    """

    def __init__(self, hidden_size: int, ffn_size: int = 0, *, activation: str = "gelu",
                 gated: bool = False, bias: bool = True):
        super().__init__()
        self.hidden_size = hidden_size
        self.ffn = (
            DenseFFN(hidden_size, ffn_size, activation=activation, gated=gated, bias=bias)
            if ffn_size > 0 else None
        )
        self.bias: nn.Parameter | None = None
        self.compensation: nn.Sequential | None = None  # Linear(H, r) → Linear(r, H) + bias
        # Off when the MoE selects every expert: nothing is skipped, nothing to compensate.
        self.use_compensation = True

    @property
    def is_empty(self) -> bool:
        return self.ffn is None and self.bias is None and self.compensation is None

    def set_compensation(self, down: torch.Tensor, up: torch.Tensor,
                         bias: torch.Tensor) -> None:
        """Install the linear compensation x ↦ up @ (down @ x) + bias: down (r, H),
        up (H, r), bias (H,)."""
        r, h = down.shape
        lin = nn.Sequential(nn.Linear(h, r, bias=False), nn.Linear(r, h, bias=True))
        lin = lin.to(device=down.device, dtype=down.dtype)
        with torch.no_grad():
            lin[0].weight.copy_(down)
            lin[1].weight.copy_(up)
            lin[1].bias.copy_(bias)
        self.compensation = lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.ffn is None:
            y = x.new_zeros(x.shape[:-1] + (self.hidden_size,))
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
    (E, I, H) when gated, ``w_out`` (E, H, I), biases (E, I) and (E, H).

    Args:
        hidden_size: H, the model width.
        expert_size: I, each routed expert's hidden width.
        num_experts: E, routed experts.
        top_k: experts per token.
        activation: relu | gelu | gelu_tanh | silu | squared_relu | quick_gelu.
        gated: experts compute ``act(gate(x)) * in(x)`` (SwiGLU / GeGLU).
        bias: experts carry biases.
        shared_expert_size: width of the always-on shared FFN (0: none).
        combine: "softmax" weights the k experts by a softmax over their logits (Mixtral);
            "sum" adds them unweighted (function-preserving neuron splits).
        router: how the linear router's logits select experts:
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
        capacity_factor: None (dropless) or > 0: each expert takes at most
            ceil(T·k/E·capacity_factor) assignments per forward, in token order; the rest are
            dropped (weight 0) and counted in ``last_dropped``.
        top_p: probability mass for ``router="topp"``.

    In training mode each forward leaves ``last_aux`` (Switch load-balancing loss and router
    z-loss, differentiable; see ``moefy.aux_loss``). ``expert_dropout`` (default 0) drops
    routed assignments at random in training.

    Contract: ``moe(x)[t] == sum_j w[t, j] * moe.expert(i[t, j])(x[t]) + moe.shared(x[t])``
    with ``w, i = moe.route(x)``.

    >>> moe = MoE(16, 32, num_experts=4, top_k=2)
    >>> moe(torch.randn(3, 5, 16)).shape
    torch.Size([3, 5, 16])
    """

    def __init__(self, hidden_size: int, expert_size: int, num_experts: int, top_k: int, *,
                 activation: str = "gelu", gated: bool = False, bias: bool = True,
                 shared_expert_size: int = 0, combine: str = "softmax",
                 router: str = "softmax", capacity_factor: float | None = None,
                 top_p: float = 0.5):
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("expert_size", expert_size),
                            ("num_experts", num_experts), ("top_k", top_k)):
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
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"MoE: capacity_factor must be None or > 0, got {capacity_factor!r}")
        if not 0 < top_p <= 1:
            raise ValueError(f"MoE: top_p must be in (0, 1], got {top_p!r}")
        self.activation = get_activation(activation).name
        self.hidden_size, self.expert_size = hidden_size, expert_size
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

        E, I, H = num_experts, expert_size, hidden_size
        self.router = nn.Linear(H, E, bias=False)
        self.router_noise = nn.Linear(H, E, bias=False) if router == "noisy" else None
        if self.router_noise is not None:
            nn.init.zeros_(self.router_noise.weight)
        if router == "sigmoid":
            self.register_buffer("selection_bias", torch.zeros(E))
        self.w_in = nn.Parameter(_uniform_(torch.empty(E, I, H), H))
        self.w_gate = nn.Parameter(_uniform_(torch.empty(E, I, H), H)) if gated else None
        self.w_out = nn.Parameter(_uniform_(torch.empty(E, H, I), I))
        self.b_in = nn.Parameter(_uniform_(torch.empty(E, I), H)) if bias else None
        self.b_gate = nn.Parameter(_uniform_(torch.empty(E, I), H)) if bias and gated else None
        self.b_out = nn.Parameter(_uniform_(torch.empty(E, H), I)) if bias else None
        self.shared = SharedExperts(H, shared_expert_size, activation=activation, gated=gated,
                                    bias=bias)
        self._packed: PackedExperts | None = None
        self._token_ids: torch.Tensor | None = None

    # ------------------------------------------------------------------ public
    @property
    def top_k(self) -> int:
        return self._top_k

    @top_k.setter
    def top_k(self, k: int) -> None:
        if not isinstance(k, int) or not 1 <= k <= self.num_experts:
            raise ValueError(f"MoE: top_k must be an int in [1, {self.num_experts}], got {k!r}")
        self._top_k = k
        self.shared.use_compensation = k < self.num_experts

    def route(self, x: torch.Tensor, token_ids: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Routing decision for the flattened tokens of ``x`` (..., H): (weights, indices),
        each (tokens, slots) — slots is ``top_k`` except for "topp" (≤ top_k) and
        "expert_choice" (≤ E), where unused slots carry weight 0."""
        x = self._flatten(x)
        logits = self.router(x)  # (T, E)
        if self.router_noise is not None and self.training:
            noise = nn.functional.softplus(self.router_noise(x))
            logits = logits + torch.randn_like(logits) * noise
        kind, k = self.router_type, self.top_k
        if kind == "hash":
            weights, indices = self._hash(x, token_ids)
        elif kind == "sigmoid":
            scores = torch.sigmoid(logits.float())
            indices = torch.topk(scores + self.selection_bias, k, dim=-1).indices
            top = scores.gather(1, indices)
            weights = top / top.sum(-1, keepdim=True).clamp_min(1e-20)
        elif kind == "expert_choice":
            weights, indices = self._expert_choice(logits)
        else:
            top, indices = torch.topk(logits, k, dim=-1)  # (T, k)
            # softmax over the k selected == softmax over all E, renormalised over the k
            weights = torch.softmax(top, dim=-1, dtype=torch.float32)
            if kind == "topp":
                probs = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, indices)
                keep = (probs.cumsum(-1) - probs) < self.top_p  # mass before this one < p
                weights = weights * keep
                weights = weights / weights.sum(-1, keepdim=True)
        # which slots hold an expert (top-p and expert choice pad with weight 0); the plain
        # inference path does not need it
        needs_used = self.combine == "sum" or self.capacity_factor is not None or self.training
        used = weights > 0 if needs_used else None
        if self.combine == "sum":
            # unweighted; in training the router's gradient passes straight through
            grad = weights - weights.detach() if self.training else 0
            weights = used.float() + grad
        if self.capacity_factor is not None:
            used = self._apply_capacity(indices, used)
            weights = weights * used
        if self.training and self.expert_dropout > 0:
            keep = torch.rand_like(weights) >= self.expert_dropout
            weights = weights * keep / (1 - self.expert_dropout)
        if self.training:
            self._record_training(logits, indices, used)
        return weights.to(x.dtype), indices

    def _hash(self, x: torch.Tensor, token_ids: torch.Tensor | None):
        if token_ids is None:
            raise ValueError("router='hash' needs token_ids (the input ids of the tokens, one "
                             "per row of x); converted models pass them from input_ids")
        ids = token_ids.reshape(-1).long()
        if ids.shape[0] != x.shape[0]:
            raise ValueError(f"token_ids has {ids.shape[0]} ids for {x.shape[0]} tokens")
        cols = []
        for j in range(self.top_k):
            mult = _HASH_MULTIPLIERS[j % len(_HASH_MULTIPLIERS)] + 2 * (j // 4)
            h = torch.remainder(ids * mult, 1 << 31)  # arithmetic only: exports to Mul/Mod/Div
            cols.append(torch.remainder(torch.div(h, 128, rounding_mode="floor"),
                                        self.num_experts))
        indices = torch.stack(cols, dim=1)
        weights = torch.full(indices.shape, 1.0 / self.top_k, device=x.device)
        return weights, indices

    def _expert_choice(self, logits: torch.Tensor):
        t, e = logits.shape
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)  # (T, E)
        cap = min(t, math.ceil(t * self.top_k / e))
        chosen = torch.zeros_like(probs)
        if cap:
            chosen.scatter_(0, probs.topk(cap, dim=0).indices, 1.0)  # each expert's tokens
        slots = max(1, int(chosen.sum(1).max().item())) if t else 1
        top, indices = (probs * chosen + chosen).topk(slots, dim=1)  # chosen ones first
        weights = torch.where(top > 1, top - 1, torch.zeros_like(top))
        return weights, indices

    def _apply_capacity(self, indices: torch.Tensor, used: torch.Tensor) -> torch.Tensor:
        t, slots = indices.shape
        capacity = math.ceil(t * self.top_k / self.num_experts * self.capacity_factor)
        onehot = nn.functional.one_hot(indices.reshape(-1), self.num_experts)
        onehot = onehot * used.reshape(-1, 1)  # (T·slots, E), token order
        position = (onehot.cumsum(0) * onehot).sum(1).reshape(t, slots)  # 1-based
        keep = used & (position <= capacity)
        if not torch.compiler.is_compiling():  # a count, not part of the traced graph
            self.last_dropped = int((used & ~keep).sum())
        return keep

    def _record_training(self, logits: torch.Tensor, indices: torch.Tensor,
                         used: torch.Tensor) -> None:
        e = self.num_experts
        load = torch.zeros(e, device=logits.device).index_add_(
            0, indices.reshape(-1), used.reshape(-1).float())  # assignments per expert
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        frac = load / load.sum().clamp_min(1)
        self.last_aux = {
            "balance": e * (frac * probs.mean(0)).sum(),  # Switch: E·Σ f_e·P_e
            "z": torch.logsumexp(logits.float(), dim=-1).pow(2).mean(),  # ST-MoE z-loss
        }
        if self.router_type == "sigmoid":
            with torch.no_grad():
                self.selection_bias += self.bias_update_rate * torch.sign(load.mean() - load)

    def expert(self, e: int) -> nn.Module:
        """Routed expert ``e`` as a standalone dense FFN that shares this layer's weights."""
        if not 0 <= e < self.num_experts:
            raise IndexError(f"expert index {e} out of range for {self.num_experts} experts")
        return _ExpertView(self, e)

    def expert_weights(self) -> ExpertWeights:
        return ExpertWeights(self.w_in, self.w_out, self.w_gate, self.b_in, self.b_gate,
                             self.b_out, self.activation)

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = self._flatten(x)
        if token_ids is None:
            token_ids = self._token_ids  # set around a converted model's forward (hash)
        weights, indices = self.route(x2, token_ids)
        y = self._routed(x2, weights, indices)
        if not self.shared.is_empty:
            y = y + self.shared(x2)
        return y.reshape(*lead, self.hidden_size)

    # ------------------------------------------------------------------ internals
    def _flatten(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 0 or x.shape[-1] != self.hidden_size:
            raise ValueError(
                f"MoE expects input of shape (..., {self.hidden_size}), got {tuple(x.shape)}")
        return x.reshape(-1, self.hidden_size)

    def _routed(self, x: torch.Tensor, weights: torch.Tensor,
                indices: torch.Tensor) -> torch.Tensor:
        ew = self.expert_weights()
        needs_grad = self._needs_grad(x, weights, ew)
        if needs_grad and self.training and not torch.compiler.is_compiling() and (
                x.shape[0] * self.num_experts * self.expert_size <= _MASKED_MAX_ELEMENTS):
            return _masked_dense(x, weights, indices, ew)
        if packed_path_applies(x) and not needs_grad:
            if x.shape[0] <= SMALL_BATCH_TOKENS and decode_kernels_available():
                return decode_ffn(x, weights, indices, ew)  # reads the weights as they are
            if self.prepack:
                key = weights_key(ew)
                if self._packed is None or self._packed.key != key:
                    self._packed = PackedExperts(ew)
                return self._packed(x, weights, indices)
        return torch.ops.moefy.expert_ffn(x, weights, indices, *ew[:6], ew.activation,
                                          float(self.capacity_factor or 0.0))

    @staticmethod
    def _needs_grad(x: torch.Tensor, weights: torch.Tensor, ew: ExpertWeights) -> bool:
        if not torch.is_grad_enabled():
            return False
        return x.requires_grad or weights.requires_grad or any(
            p.requires_grad for p in ew[:6] if p is not None)

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_packed"] = None  # oneDNN-layout tensors do not pickle or deepcopy
        return state

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, expert_size={self.expert_size}, "
                f"num_experts={self.num_experts}, top_k={self.top_k}, "
                f"activation={self.activation!r}, gated={self.gated}, "
                f"combine={self.combine!r}")

