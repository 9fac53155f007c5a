"""``MoEConfig``: how to turn each dense FFN into experts."""

from __future__ import annotations

from dataclasses import dataclass, field

METHODS = ("upcycle", "split")
PARTITIONS = ("contiguous", "random", "kmeans", "coactivation")
ROUTERS = ("softmax",)


@dataclass
class MoEConfig:
    """Conversion settings, validated on construction.

    Args:
        method: "upcycle" (E copies of the FFN, a new router) or "split" (the FFN's neurons
            partitioned into E experts; the experts sum to the dense FFN).
        num_experts: routed experts per FFN.
        top_k: experts per token.
        shared_experts: always-on experts (split: carved from the FFN's neurons).
        partition: split only — "contiguous", "random", "kmeans" (balanced, on normalised
            input-weight rows) or "coactivation" (neurons that fire together, from
            ``calibration_data``).
        granularity: upcycle only — cut each copy into this many shards of d_ff/G neurons
            (granular upcycling); num_experts and top_k must be multiples of it.
        router: "softmax".
        capacity_factor: None (dropless) — the only value supported in this version.
        only / skip: glob patterns on FFN names (their module paths); ``only`` keeps matches,
            ``skip`` drops them.
        keep_first / keep_last: leave this many FFNs (in model order) dense.
        seed: random seed for routers and random partitions.

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
    capacity_factor: float | None = None
    only: list[str] = field(default_factory=list)
    skip: list[str] = field(default_factory=list)
    keep_first: int = 0
    keep_last: int = 0
    seed: int = 0

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
        for name in ("shared_experts", "keep_first", "keep_last", "seed"):
            positive(name, allow_zero=True)
        if self.top_k > self.num_experts:
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
        if self.capacity_factor is not None:
            raise ValueError("MoEConfig.capacity_factor is not supported yet; use None "
                             "(dropless)")
        if self.method == "upcycle" and self.shared_experts:
            raise ValueError("MoEConfig.shared_experts applies to method='split' only")
        if isinstance(self.only, str) or isinstance(self.skip, str):
            raise ValueError("MoEConfig.only / skip take a list of glob patterns, not a string")
