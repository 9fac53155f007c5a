"""``MoEConfig``: how to turn each dense FFN into experts."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

METHODS = ("upcycle", "split", "peer", "neuron")
SELECTIONS = ("input", "gate", "sequence", "static")
PARTITIONS = ("contiguous", "random", "kmeans", "coactivation")
ROUTERS = ("softmax", "noisy", "sigmoid", "topp", "expert_choice", "hash")
ROUTER_INITS = ("similarity", "representative", "fit")


@dataclass
class MoEConfig:
    """Conversion settings, validated on construction.

    Args:
        method: "upcycle" (E copies of the FFN, a new router), "split" (the FFN's neurons
            partitioned into E experts; the experts sum to the dense FFN) or "peer" (each of
            the FFN's d_ff neurons becomes a single-neuron expert of a ``moefy.PEER`` layer,
            N = d_ff padded to a product-key grid n1 × n2 with inert experts; product keys
            and query fitted to retrieve the neurons the FFN activates most, see
            ``moefy.passes.peer``) or "neuron" (every FFN neuron a single-neuron expert chosen
            per token by signals the layer computes anyway, and the input channels of the
            other projections in its block (attention q/k/v/o) chosen alike: a
            ``moefy.NeuronFFN`` and ``moefy.SparseLinear`` layers whose thresholds are
            calibrated so that a token reads ``active`` of the weights; see
            ``moefy.passes.neuron``).
        num_experts: routed experts per FFN (split, upcycle; peer: leave it, N follows d_ff).
        top_k: experts per token (peer: neurons per head; the active fraction is
            peer_heads · top_k / d_ff).
        shared_experts: always-on experts (split: carved from the FFN's neurons).
        partition: split only — "contiguous", "random", "kmeans" (balanced, on normalised
            input-weight rows) or "coactivation" (neurons that fire together, from
            ``calibration_data``).
        granularity: upcycle only — cut each copy into this many shards of d_ff/G neurons
            (granular upcycling); num_experts and top_k must be multiples of it.
        router: how routing scores become a selection ("softmax" top-k; "noisy" top-k, noise
            in training; "sigmoid" scores with aux-loss-free bias balancing; "topp" experts by
            descending probability until their sum reaches ``top_p``, at most ``top_k``;
            "expert_choice" each expert takes its top tokens; "hash" expert = token id mod a
            fixed hash). See ``moefy.MoE``.
        router_init: split only — "similarity" (expert centres of the neurons' input weights),
            "representative" (each expert's most typical neuron, CMoE) or "fit" (a linear
            router trained on calibration tokens to rank experts by their output). Default:
            "fit" with calibration_data, else "similarity".
        compensate: split only — what the skipped experts would have added: "mean" moves each
            expert's mean calibration output into the always-on part (skipping an expert then
            costs only its deviation from its mean); "linear" adds to that a low-rank linear map
            of the token (rank hidden/3: hidden/(3·d_ff) of the dense FFN's work, 8% for a
            4× FFN) fitted by least squares to what the routed experts still miss on
            calibration tokens; False: none. Default "linear" with calibration_data (both need
            it). Compensation is off whenever top_k == num_experts: exact then either way.
        compensate_rank: the rank of the "linear" compensation (default hidden/3). Lower
            trades quality for speed: all-MiniLM-L6-v2 at 25% (16 experts, top-4), mean
            embedding cosine 0.858 at rank 128 (hidden/3), 0.839 at 64, 0.816 at 32.
        fit_steps: split only, with calibration_data — after building, train each MoE layer
            (experts, router, compensation) for this many Adam steps on its calibration
            tokens to reproduce the dense FFN (a layer-local fit: about 1/20 s per step on
            CPU for a 384×1536 FFN). 0: training-free.
        capacity_factor: None (dropless) or > 0: each expert takes at most
            ceil(tokens · top_k / num_experts · capacity_factor) tokens per forward; overflow
            assignments are dropped (contribute zero) and counted.
        top_p: the probability mass for router="topp".
        only / skip: glob patterns on FFN names (their module paths); ``only`` keeps matches,
            ``skip`` drops them.
        keep_first / keep_last: leave this many FFNs (in model order) dense.
        seed: random seed for routers and random partitions.
        peer_heads: peer only — query heads (default 1). Heads share one set of keys; for
            conversion each head owns a block of grid rows, so no neuron is retrieved twice
            (with weight 1 per neuron a duplicate would count twice).
        peer_key_dim: peer only — query / key width d (even). Default 2·max(n1, n2): the
            fitted row and column scores then factor exactly into keys and queries.
        peer_fit_steps: peer only — Adam steps that fit keys and query to rank the neurons
            as the dense FFN activates them on calibration tokens (needs calibration_data).
            Default: 200 with calibration_data, else 0 (keys and query from the weights
            alone).
        minutes: a wall-time budget for the whole ``convert`` call (None: no budget). After
            calibration, building and fits, the time left distils the converted model
            towards the dense one on the calibration batches (KL on next-token logits for
            models that return ``.logits``, else the relative MSE of the first output; the
            MoE parts are trained, see ``moefy.distill``). Needs calibration_data. A
            conversion that alone takes longer is logged, not stopped.
        active: neuron only — the share of the projection weights a token reads (the
            converted FFNs and, unless ``ffn_only``, the other projections of their blocks;
            not embeddings or the LM head), 0 < active <= 1. 1 (the default): every weight,
            exactly the dense model. Below 1 needs calibration_data: thresholds per layer and
            matrix are allocated greedily where the calibration data says they cost least.
        selection: neuron only — how an FFN picks its neurons: "input" (TEAL/WINA: the input
            channels of gate/up by |x_j|·‖W[:, j]‖, then the neurons h_i by
            |h_i|·‖W_down[:, i]‖) or "gate" (the gate computed on its selected inputs, then
            neurons by |act(g_i)|·c_i with c_i calibrated; up and down read only for them)
            or "sequence" (GRIFFIN: the prompt runs dense and picks, per sequence, the
            neurons its tokens used most; each decoded token then reads only those: see
            ``moefy.NeuronFFN``). The attention projections stay per-token input-sparse.
            Or "static": one set of neurons for every token, the ``active`` share of each
            FFN's neurons with the largest variance × ‖W_down[:, i]‖² on the calibration
            data, the dropped neurons' mean and linear part refit into down by least
            squares; the attention projections stay dense (``active`` counts the FFNs only).
            The converted FFNs are smaller dense ones: what an encoder, which only
            prefills, runs faster in ONNX Runtime.
        ffn_only: neuron only — leave the attention projections dense; ``active`` is then the
            share of the FFN weights read.
        calibration_tokens: read ``calibration_data`` until each FFN has seen this many
            tokens (default 2^20), then stop and
            log it: an endless stream (a repeating iterator) cannot hang the conversion.
            None: read everything.

    >>> MoEConfig(method="split", num_experts=8, top_k=2).partition
    'kmeans'
    """

    method: str = "split"
    num_experts: int = 16
    top_k: int = 4
    shared_experts: int = 0
    partition: str = "kmeans"
    granularity: int = 1
    router: str = "softmax"
    router_init: str | None = None
    compensate: bool | str | None = None
    compensate_rank: int | None = None
    fit_steps: int = 0
    capacity_factor: float | None = None
    top_p: float = 0.5
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    keep_first: int = 0
    keep_last: int = 0
    seed: int = 0
    calibration_tokens: int | None = 1 << 20
    peer_heads: int | None = None
    peer_key_dim: int | None = None
    peer_fit_steps: int | None = None
    minutes: float | None = None
    active: float | None = None
    selection: str = "input"
    ffn_only: bool = False

    @classmethod
    def for_budget(cls, active: float, minutes: float | None = None, *,
                   experts: int = 64, causal: bool | None = None) -> MoEConfig:
        """Settings for a share of active FFN neurons and a time budget: say what you
        want, not how.

        ``causal=True`` (a decoder LM) picks the method that measured better there:
        ``method="neuron"`` with ``active`` the share of the decoder layers' projection
        weights a token reads (on SmolLM2-135M at 50%: perplexity ×1.24 against ×1.39 for
        the split recipe below, and faster). Otherwise (an encoder, or not said) the split
        recipe below, which measured best on all-MiniLM-L6-v2.

        ``active`` (0 < active < 1): the share of each FFN's neurons a token uses. The FFN is
        cut into ``experts`` equal pieces (fine experts: a token's important neurons are
        scattered, measured on SmolLM2 and all-MiniLM-L6-v2, see the README). Half of the
        active pieces are shared (always on: the neurons most often among tokens' strongest
        on the calibration data), the other half routed by a fitted router among the rest,
        partitioned by co-activation, with linear compensation of the skipped experts.
        ``minutes``: the conversion's wall-time budget; what calibration and building leave
        is spent distilling (``MoEConfig.minutes``). Needs calibration_data; reads at most
        16384 tokens of it (``calibration_tokens``): building must leave time to distil.

        >>> c = MoEConfig.for_budget(0.25, minutes=10)
        >>> (c.shared_experts, c.num_experts, c.top_k, c.minutes)
        (8, 56, 8, 10)
        >>> MoEConfig.for_budget(0.5, causal=True).method
        'neuron'
        """
        if not (isinstance(active, (int, float)) and not isinstance(active, bool)
                and 0 < active < 1):
            raise ValueError(f"MoEConfig.for_budget: active must be a share of the FFN's "
                             f"neurons, 0 < active < 1, got {active!r}")
        if not isinstance(experts, int) or isinstance(experts, bool) or experts < 2:
            raise ValueError(f"MoEConfig.for_budget: experts must be an int >= 2, got "
                             f"{experts!r}")
        if causal is not None and not isinstance(causal, bool):
            raise ValueError(f"MoEConfig.for_budget: causal must be True, False or None, got "
                             f"{causal!r}")
        if causal:
            return cls(method="neuron", active=active, minutes=minutes,
                       calibration_tokens=1 << 14)
        pieces = round(active * experts)
        if not 1 <= pieces < experts:
            raise ValueError(
                f"MoEConfig.for_budget: active={active} of {experts} experts rounds to "
                f"{pieces} active experts; pick active in [{1 / experts:.3g}, "
                f"{(experts - 1) / experts:.3g}] or more experts")
        shared = pieces // 2
        return cls(method="split", num_experts=experts - shared, shared_experts=shared,
                   top_k=pieces - shared, partition="coactivation", router_init="fit",
                   compensate="linear", minutes=minutes, calibration_tokens=1 << 14)

    def __post_init__(self):
        def positive(name: str, allow_zero: bool = False) -> None:
            value = getattr(self, name)
            low = 0 if allow_zero else 1
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                kind = "an int >= 0" if allow_zero else "a positive int"
                raise ValueError(f"MoEConfig.{name} must be {kind}, got {value!r}")

        if self.method not in METHODS:
            raise ValueError(f"MoEConfig.method must be one of {METHODS}, got {self.method!r}")
        if self.partition not in PARTITIONS:
            raise ValueError(
                f"MoEConfig.partition must be one of {PARTITIONS}, got {self.partition!r}")
        if self.router not in ROUTERS:
            raise ValueError(f"MoEConfig.router must be one of {ROUTERS}, got {self.router!r}")
        for name in ("num_experts", "top_k", "granularity"):
            positive(name)
        for name in ("shared_experts", "keep_first", "keep_last", "seed", "fit_steps"):
            positive(name, allow_zero=True)
        if self.calibration_tokens is not None:
            positive("calibration_tokens")
        m = self.minutes
        if m is not None and not (isinstance(m, (int, float)) and not isinstance(m, bool)
                                  and math.isfinite(m) and m > 0):
            raise ValueError(f"MoEConfig.minutes must be None (no budget) or a finite number "
                             f"> 0, got {m!r}")
        for name in ("peer_heads", "peer_key_dim", "peer_fit_steps"):
            if getattr(self, name) is not None:
                if self.method != "peer":
                    raise ValueError(f"MoEConfig.{name} applies to method='peer' only")
                positive(name, allow_zero=name == "peer_fit_steps")
        if self.peer_key_dim is not None and self.peer_key_dim % 2:
            raise ValueError(f"MoEConfig.peer_key_dim must be even (two half-keys), got "
                             f"{self.peer_key_dim}")
        a = self.active
        if a is not None and not (isinstance(a, (int, float)) and not isinstance(a, bool)
                                  and math.isfinite(a) and 0 < a <= 1):
            raise ValueError(f"MoEConfig.active must be None or a share 0 < active <= 1, got "
                             f"{a!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"MoEConfig.selection must be one of {SELECTIONS}, got "
                             f"{self.selection!r}")
        if not isinstance(self.ffn_only, bool):
            raise ValueError(f"MoEConfig.ffn_only must be a bool, got {self.ffn_only!r}")
        if self.method != "neuron":
            for name, default in (("active", None), ("selection", "input"), ("ffn_only", False)):
                if getattr(self, name) != default:
                    raise ValueError(f"MoEConfig.{name} applies to method='neuron' only")
        if self.method == "peer":
            self._check_peer()
        elif self.method == "neuron":
            self._check_neuron()
        elif self.top_k > self.num_experts:
            raise ValueError(
                f"MoEConfig.top_k ({self.top_k}) cannot exceed num_experts ({self.num_experts})")
        if self.granularity > 1:
            if self.method != "upcycle":
                raise ValueError("MoEConfig.granularity applies to method='upcycle' only")
            for name in ("num_experts", "top_k"):
                if getattr(self, name) % self.granularity:
                    raise ValueError(
                        f"MoEConfig.{name} ({getattr(self, name)}) must be a multiple of "
                        f"granularity ({self.granularity}): experts come in virtual groups of "
                        "granularity shards, and top-k selects whole groups")
        if self.router_init is not None and self.router_init not in ROUTER_INITS:
            raise ValueError(f"MoEConfig.router_init must be None or one of {ROUTER_INITS}, "
                             f"got {self.router_init!r}")
        if self.compensate not in (None, False, "mean", "linear"):
            raise ValueError("MoEConfig.compensate must be None, False, 'mean' or 'linear', "
                             f"got {self.compensate!r}")
        if self.compensate_rank is not None and not (
                isinstance(self.compensate_rank, int) and self.compensate_rank >= 1):
            raise ValueError("MoEConfig.compensate_rank must be None (hidden/3) or a positive "
                             f"int, got {self.compensate_rank!r}")
        cf = self.capacity_factor
        if cf is not None and not (isinstance(cf, (int, float)) and not isinstance(cf, bool)
                                   and math.isfinite(cf) and cf > 0):
            raise ValueError("MoEConfig.capacity_factor must be None (dropless) or a finite "
                             f"number > 0, got {cf!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"MoEConfig.top_p must be in (0, 1], got {self.top_p!r}")
        if self.method == "upcycle" and self.shared_experts:
            raise ValueError("MoEConfig.shared_experts applies to method='split' only")
        if isinstance(self.only, str) or isinstance(self.skip, str):
            raise ValueError("MoEConfig.only / skip take a list of glob patterns, not a string")

    def _check_neuron(self) -> None:
        """Settings of the routed methods that single-neuron selection does not have."""
        self._check_unused("neuron", [
            ("shared_experts", 0), ("capacity_factor", None), ("router", "softmax"),
            ("router_init", None), ("compensate", None), ("compensate_rank", None),
            ("fit_steps", 0), ("partition", "kmeans"), ("num_experts", 16), ("top_k", 4),
            ("top_p", 0.5), ("granularity", 1)],
            "every neuron is an expert chosen by a calibrated threshold; its settings are "
            "active, selection, ffn_only (and minutes, calibration_tokens, only/skip)")

    def _check_peer(self) -> None:
        """Settings of the other methods that a PEER conversion cannot honour."""
        self._check_unused("peer", [
            ("shared_experts", 0), ("capacity_factor", None), ("router", "softmax"),
            ("router_init", None), ("compensate", None), ("compensate_rank", None),
            ("fit_steps", 0), ("partition", "kmeans"), ("num_experts", 16), ("top_p", 0.5),
            ("granularity", 1), ("minutes", None)],
            "PEER retrieves single-neuron experts with fitted product keys; its settings are "
            "top_k, peer_heads, peer_key_dim, peer_fit_steps")

    def _check_unused(self, method: str, unused: list[tuple[str, object]], why: str) -> None:
        for name, default in unused:
            if getattr(self, name) != default and not (name == "compensate" and
                                                       self.compensate is False):
                raise ValueError(
                    f"MoEConfig.{name}={getattr(self, name)!r} does not apply to "
                    f"method={method!r} (leave it at {default!r}): {why}")
