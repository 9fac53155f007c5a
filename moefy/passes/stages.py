"""The typed stages of a conversion: what each pass of ``moefy.convert`` takes and makes.

    Request ──RunDense──▶ Reference
    Request ──TraceUnits──▶ Traced ──FindFFNs──▶ Found ──TraceHosts──▶ Found
      ──PlanRewrite──▶ Plans ──MakeDynamic──▶ Plans ──Select──▶ Plans ──CheckBeforeChange
      ──Calibrate──▶ Statistics ──BuildAndRewrite──▶ Converted ──Verify──▶ ──DistillForBudget──▶

Every stage is frozen: a pass reads the stages it names (``Pass.needs``) and returns a new
one; a pass that refines a stage (``TraceHosts``, ``MakeDynamic``, ``Select``) returns a new
stage of the same type, which stands for it from then on. The layers a conversion builds
are the one thing passes change in place (the model itself, and each layer's record).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from moefy.config import MoEConfig
from moefy.passes.find_ffn import FFNMatch, Rejection
from moefy.passes.rewrite import SurgeryPlan
from moefy.passes.trace import TracedUnit

if TYPE_CHECKING:  # calibrate.py's Calibrate pass makes Statistics: a type only, no cycle
    from moefy.passes.calibrate import FFNStats


@dataclass(frozen=True)
class Request:
    """What ``convert`` was asked, after its checks."""

    model: nn.Module
    config: MoEConfig
    args: tuple
    kwargs: Mapping
    calibration_data: object = None
    inplace: bool = False
    explain: bool = False
    progress: bool | None = None
    started: float = 0.0  # perf_counter at convert's start (config.minutes counts from it)


@dataclass(frozen=True)
class Reference:
    """The dense model's output tensors on the example inputs (None: not kept, verify off)."""

    outputs: tuple[torch.Tensor, ...] | None


@dataclass(frozen=True)
class Traced:
    """The model's exported graph(s): the whole model, else its largest exportable modules."""

    units: tuple[TracedUnit, ...]


@dataclass(frozen=True)
class Found:
    """FFN matches per graph, every rejected candidate and why, and the hosts of inline FFNs
    that did not export alone (path -> why)."""

    units: tuple[TracedUnit, ...]
    matches: tuple[tuple[TracedUnit, FFNMatch], ...]
    rejections: tuple[Rejection, ...]
    untraced: Mapping[str, str] = field(default_factory=dict)

    def of(self, unit: TracedUnit) -> list[FFNMatch]:
        return [m for u, m in self.matches if u is unit]


@dataclass(frozen=True)
class Plan:
    """One FFN: its graph, its representative call site, how it is swapped, and every call
    site's match (``match`` first)."""

    unit: TracedUnit
    match: FFNMatch
    plan: SurgeryPlan
    sites: tuple[FFNMatch, ...]

    @property
    def key(self) -> str:
        """Where its calibration statistics are kept."""
        return f"{self.unit.path}:{self.match.output.name}"


@dataclass(frozen=True)
class Plans:
    """One plan per FFN; per graph that only graph mode can rewrite, why (unit path ->
    reasons); the units the selected plans convert in graph mode."""

    units: tuple[TracedUnit, ...]
    plans: tuple[Plan, ...]
    inline: Mapping[str, tuple[str, ...]]
    graph_paths: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Statistics:
    """Per FFN (``Plan.key``), activation statistics from the calibration batches; the batches
    kept for distillation (``config.minutes``)."""

    stats: Mapping[str, FFNStats] = field(default_factory=dict)
    batches: tuple = ()


@dataclass(frozen=True)
class Converted:
    """The converted model; in place, the dense modules it replaced (path -> module)."""

    target: nn.Module
    originals: Mapping[str, nn.Module] = field(default_factory=dict)


def join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path
