"""The state a conversion's passes read and write, in pipeline order (``moefy.convert``).

    dense model, config, inputs ⇒ units (graphs) → found (matches) → plans → stats → target

Each pass reads what the passes before it left and adds its own part; ``convert`` keeps each
pass's ``PassResult``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from moefy.config import MoEConfig
from moefy.passes import find_ffn, rewrite, trace


@dataclass
class ConversionState:
    """What the passes read and write, in pipeline order."""

    model: nn.Module
    config: MoEConfig
    args: tuple
    kwargs: dict
    calibration_data: object = None
    inplace: bool = False
    explain: bool = False
    progress: bool | None = None
    units: list = field(default_factory=list)  # TracedUnit
    found: list = field(default_factory=list)  # (unit, FFNMatch)
    rejections: list = field(default_factory=list)  # Rejection
    plans: list = field(default_factory=list)  # Planned
    inline: dict = field(default_factory=dict)  # unit path -> why it needs graph mode
    graph_paths: set = field(default_factory=set)  # units converted in graph mode
    stats: dict = field(default_factory=dict)  # FFN key -> FFNStats
    reference: list | None = None  # the dense model's output tensors on the example inputs
    originals: dict = field(default_factory=dict)  # in place: module path -> the dense module
    target: nn.Module | None = None
    started: float = 0.0  # perf_counter at convert's start (config.minutes counts from it)
    batches: list = field(default_factory=list)  # calibration batches kept for distillation
    results: list = field(default_factory=list)  # (pass name, PassResult), in order


@dataclass
class Planned:
    unit: trace.TracedUnit
    match: find_ffn.FFNMatch  # the representative call site (the first in graph order)
    plan: rewrite.SurgeryPlan
    sites: list = field(default_factory=list)  # every call site's FFNMatch, ``match`` first


def join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path
