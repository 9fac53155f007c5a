"""``moefy.convert``: dense model ⇒ MoE model, as one explicit pipeline of passes."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from moefy.calibrate import Progress, collect_stats, token_mask
from moefy.config import MoEConfig
from moefy.errors import (
    AlreadyConvertedError,
    ConversionError,
    NoFFNFoundError,
    VerificationError,
)
from moefy.layers.moe import MoE
from moefy.passes import build, find_ffn, rewrite, trace
from moefy.passes.base import Pass, PassResult


def convert(model: nn.Module, config: MoEConfig, *, example_inputs=None, calibration_data=None,
            inplace: bool = False, verify: bool = True, explain: bool = False,
            progress: bool | None = None) -> nn.Module:
    """Rewrite every feed-forward block of ``model`` into a ``moefy.MoE``.

    Args:
        model: a dense model (Hugging Face models need no example inputs).
        config: a ``MoEConfig``.
        example_inputs: a tuple of positional tensors or a dict of keyword tensors.
        calibration_data: an iterable of inputs like ``example_inputs`` (a DataLoader works),
            streamed once in bounded memory (padding tokens are skipped via
            ``attention_mask``). Split conversions then choose shared experts by activation
            frequency, group neurons that fire together (``partition="coactivation"``),
            compensate skipped experts by their mean output and fit the router.
        inplace: change ``model`` itself instead of a copy.
        verify: where the method preserves the function (upcycle; split with
            top_k == num_experts), check the converted model's outputs against the dense one.
        explain: print every candidate projection and why it was taken or rejected.
        progress: show calibration progress on stderr (default: when stderr is a terminal).

    Returns the converted model: the same class as ``model`` with its FFN modules swapped, or,
    when an FFN runs inline in a larger forward with no module to swap, a ``GraphModule`` of
    the exported graph with each FFN replaced by a call of its MoE (graph mode).

    >>> mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    >>> moe = convert(mlp, MoEConfig(num_experts=4, top_k=4), example_inputs=(torch.randn(2, 16),))
    >>> isinstance(moe[0], MoE)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"convert expects a moefy.MoEConfig, got {type(config).__name__}")
    if config.partition == "coactivation" and config.method == "split" and (
            calibration_data is None):
        raise ConversionError("partition='coactivation' needs calibration_data: an iterable of "
                              "model inputs (tuples or dicts of tensors, e.g. a DataLoader)")
    if calibration_data is None and config.method == "split" and (
            config.router_init in ("fit", "representative") or config.compensate):
        what = (f"compensate={config.compensate!r}" if config.compensate
                else f"router_init={config.router_init!r}")
        raise ConversionError(f"{what} needs calibration_data: an iterable of model inputs")
    existing = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    if existing:
        raise AlreadyConvertedError(
            f"the model already holds {len(existing)} moefy MoE layer(s) ({', '.join(existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}): every FFN is already converted. Convert "
            "the original dense model instead.")

    state = _State(model, config, *trace.split_inputs(model, example_inputs),
                   calibration_data=calibration_data, inplace=inplace, explain=explain,
                   progress=progress)
    pipeline = [
        TraceUnits(),  # graphs first: everything after reads structure, not class names
        FindFFNs(),  # matches and the reason for every rejected candidate
        PlanRewrite(),  # needs the graph's module scopes; decides surgery or graph mode
        Select(),  # after planning, so only / skip see the final FFN names
        CheckBeforeChange(),  # every failure that input can cause, before anything changes
        Calibrate(),  # statistics the split builder reads
        BuildAndRewrite(),  # one FFN at a time: peak memory is the result plus one FFN
        Verify(enabled=verify),  # last: compares the finished model with the dense one
    ]
    for step in pipeline:
        step(state)
    return state.target


@dataclass
class _State:
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
    plans: list = field(default_factory=list)  # _Planned
    inline: dict = field(default_factory=dict)  # unit path -> why it needs graph mode
    graph_paths: set = field(default_factory=set)  # units converted in graph mode
    stats: dict = field(default_factory=dict)  # FFN key -> FFNStats
    target: nn.Module | None = None


class TraceUnits(Pass):
    """dense model ⇒ exported graph(s) (whole model, else its largest exportable modules)."""

    def call(self, s: _State) -> PassResult:
        s.units = trace.trace_units(s.model, s.args, s.kwargs)
        return PassResult(True, {"graphs": len(s.units)})


class FindFFNs(Pass):
    """graphs ⇒ FFN matches, plus every rejected candidate and why."""

    def call(self, s: _State) -> PassResult:
        for unit in s.units:
            matches, rejected = find_ffn.find_ffns(unit.ep)
            s.found += [(unit, m) for m in matches]
            s.rejections += [find_ffn.Rejection(_join(unit.path, r.node), r.reason)
                             for r in rejected]
        return PassResult(bool(s.found), {"ffns": len(s.found), "rejected": len(s.rejections)})


class PlanRewrite(Pass):
    """matches ⇒ the modules to swap (surgery plan), or graph mode for their unit."""

    def call(self, s: _State) -> PassResult:
        scopes = {id(u): rewrite._scopes(u.ep.graph) for u in s.units}
        for unit, match in s.found:
            plan = rewrite.plan_surgery(match, unit.ep.graph, unit.module, scopes[id(unit)])
            name = _join(unit.path, match.name or match.output.name)
            if isinstance(plan, str):  # no module boundary: graph mode for this unit
                s.inline.setdefault(unit.path, []).append(f"{name}: {plan}")
                plan = rewrite.SurgeryPlan(name, "", [], None)
            else:
                plan = rewrite.SurgeryPlan(
                    _join(unit.path, plan.name), _join(unit.path, plan.replace),
                    [_join(unit.path, p) for p in plan.identities], plan.dropout)
            s.plans.append(_Planned(unit, match, plan))
        if s.explain:
            _print_explanation(s.plans, s.rejections, s.inline)
        if not s.plans:
            raise NoFFNFoundError(_no_ffn_message(s.model, s.rejections))
        return PassResult(True, {"surgery": sum(p.unit.path not in s.inline for p in s.plans),
                                 "graph_mode": sum(p.unit.path in s.inline for p in s.plans)})


class Select(Pass):
    """plans ⇒ the plans that only / skip / keep_first / keep_last leave."""

    def call(self, s: _State) -> PassResult:
        before = len(s.plans)
        s.plans = _select(s.plans, s.config)
        s.graph_paths = {p.unit.path for p in s.plans if p.unit.path in s.inline}
        return PassResult(len(s.plans) != before, {"selected": len(s.plans)})


class CheckBeforeChange(Pass):
    """Raise now for anything the rewrite would fail on; the model is still untouched."""

    def call(self, s: _State) -> PassResult:
        if s.inplace and "" in s.graph_paths:
            raise ConversionError(
                "these FFNs run inline in the model's own forward and can only be converted "
                "in graph mode, which returns a new GraphModule; call convert with "
                "inplace=False:\n  " + "\n  ".join(s.inline[""]))
        for p in s.plans:
            dense = build.dense_weights(p.unit.module, p.match)
            build.check_divisible(p.plan.name, dense, s.config)
        return PassResult(False, {"checked": len(s.plans)})


class Calibrate(Pass):
    """calibration batches ⇒ per-FFN activation statistics (split only)."""

    def call(self, s: _State) -> PassResult:
        if s.calibration_data is None or s.config.method != "split":
            return PassResult(False)
        batches = 0
        progress = Progress("calibration", s.progress)
        for batch in s.calibration_data:
            args, kwargs = trace.split_inputs(s.model, batch)
            if [u.path for u in s.units] == [""]:  # the whole model is one graph: no hooks
                calls = {"": (args, kwargs)}
            else:
                calls = trace.record_calls(s.model, args, kwargs,
                                           paths={u.path for u in s.units})
            mask = token_mask(kwargs)
            for unit in s.units:
                matches = [p.match for p in s.plans if p.unit is unit]
                if matches:
                    collect_stats(unit.ep, matches, [calls[unit.path]], s.stats, unit.path,
                                  mask=mask)
            batches += 1
            tokens = max((st.tokens for st in s.stats.values()), default=0)
            progress.update(f"{batches} batches, {tokens:,} tokens")
        progress.close()
        if not batches:
            raise ConversionError("calibration_data yielded no batches")
        return PassResult(True, {"batches": batches, "ffns": len(s.stats)})


class BuildAndRewrite(Pass):
    """dense weights ⇒ MoEs, swapped into a copy (or the model, in place) one at a time;
    graph-mode units become their exported graph with each FFN replaced by its MoE."""

    def call(self, s: _State) -> PassResult:
        generator = torch.Generator().manual_seed(s.config.seed)
        graph_units = [u for u in s.units if u.path in s.graph_paths]
        swapped = [p.plan for p in s.plans if p.unit.path not in s.graph_paths]
        swapped += [rewrite.SurgeryPlan(u.path, u.path, [], None) for u in graph_units if u.path]
        if "" not in s.graph_paths:
            s.target = s.model if s.inplace else _copy_without(s.model, swapped)
        for unit in graph_units:
            gm = copy.deepcopy(unit.ep.module())  # ep.module() shares the caller's parameters
            swaps = [(p.match, self._moe(s, p, generator)) for p in s.plans if p.unit is unit]
            gm = rewrite.rewrite_graph(gm, swaps)
            if unit.path:
                s.target.set_submodule(unit.path, gm)
            else:
                s.target = gm
        for unit in s.units:
            unit.ep = None  # it holds references to every dense parameter: let swapped ones go
        for p in s.plans:
            if p.unit.path not in s.graph_paths:
                rewrite.apply_surgery(s.target, p.plan, self._moe(s, p, generator))
        if s.config.router == "hash":
            s.target.register_forward_pre_hook(_pass_token_ids, with_kwargs=True)
        return PassResult(True, {"moe": len(s.plans), "graph_units": len(graph_units)})

    @staticmethod
    def _moe(s: _State, p: _Planned, generator: torch.Generator) -> MoE:
        dense = build.dense_weights(p.unit.module, p.match)
        if s.config.method == "split":
            stats = s.stats.get(f"{p.unit.path}:{p.match.output.name}")
            moe = build.split(dense, s.config, generator, stats)
        else:
            moe = build.upcycle(dense, s.config, generator)
        moe.train(s.model.training)
        moe.conversion = {"name": p.plan.name, "method": s.config.method,
                          "dense_ffn_size": dense.ffn_size, **getattr(moe, "conversion", {})}
        return moe


class Verify(Pass):
    """Where the method preserves the function, the converted outputs equal the dense ones."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def call(self, s: _State) -> PassResult:
        preserves = s.config.method == "upcycle" or s.config.top_k == s.config.num_experts
        if not (self.enabled and preserves):
            return PassResult(False)
        _verify(s.model, s.target, s.args, s.kwargs)
        return PassResult(False, {"outputs_checked": 1})


def _pass_token_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of a model converted with router="hash": hand the model's token ids
    (``input_ids``, else its first tensor argument) to its hash-routed MoE layers."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point():
        raise ValueError("router='hash' routes by token id: call the model with input_ids "
                         "(an integer tensor)")
    for m in model.modules():
        if isinstance(m, MoE) and m.router_type == "hash":
            m._token_ids = ids


@dataclass
class _Planned:
    unit: trace.TracedUnit
    match: find_ffn.FFNMatch
    plan: rewrite.SurgeryPlan


def _join(prefix: str, path: str) -> str:
    return f"{prefix}.{path}" if prefix and path else prefix or path


def _copy_without(model: nn.Module, plans) -> nn.Module:
    """deepcopy of ``model``, except the modules about to be swapped out: the copy shares
    them for the moment instead of duplicating weights that are dropped right after."""
    memo: dict[int, object] = {}
    for plan in plans:
        for path in [plan.replace, *plan.identities]:
            module = model.get_submodule(path)
            memo[id(module)] = module
    return copy.deepcopy(model, memo)


def _select(plans, config: MoEConfig):
    chosen = plans[config.keep_first: len(plans) - config.keep_last]
    if config.only:
        chosen = [p for p in chosen if any(fnmatch.fnmatch(p.plan.name, g) for g in config.only)]
    if config.skip:
        chosen = [p for p in chosen
                  if not any(fnmatch.fnmatch(p.plan.name, g) for g in config.skip)]
    if not chosen:
        names = ", ".join(p.plan.name for p in plans)
        raise NoFFNFoundError(f"found FFNs ({names}) but only / skip / keep_first / keep_last "
                              "left none to convert")
    return chosen


def _verify(dense: nn.Module, moe_model: nn.Module, args: tuple, kwargs: dict,
            rtol: float = 1e-5) -> None:
    # Compare in eval mode (dropout off), then restore each module's own training flag.
    modes = [(m, m.training) for model in (dense, moe_model) for m in model.modules()]
    try:
        dense.eval()
        moe_model.eval()
        with torch.no_grad():
            ref = [t for t in tree_leaves(dense(*args, **kwargs)) if isinstance(t, torch.Tensor)]
            got = [t for t in tree_leaves(moe_model(*args, **kwargs))
                   if isinstance(t, torch.Tensor)]
    finally:
        for m, training in modes:
            m.training = training
    if len(ref) != len(got):
        raise VerificationError(f"the converted model returns {len(got)} tensors, the dense "
                                f"model {len(ref)}")
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if not r.is_floating_point():
            continue
        # relative to the output's largest magnitude; half precision rounds each sum anew
        tol = rtol * 10 if r.dtype in (torch.float32, torch.float64) else 3e-2
        scale = r.abs().max().float().clamp_min(1e-12)
        err = ((g.float() - r.float()).abs().max() / scale).item()
        if not err <= tol:
            raise VerificationError(
                f"output {i} differs from the dense model: max difference {err:.2e} relative "
                f"to its largest value (tolerance {tol:.0e} for {r.dtype})")


def _print_explanation(plans, rejections, inline) -> None:
    print(f"moefy: {len(plans)} FFN(s) found")
    for p in plans:
        m, plan = p.match, p.plan
        how = (f"graph mode in {p.unit.path or 'the model'}" if p.unit.path in inline
               else f"swap {plan.replace}" + (f", identities {plan.identities}"
                                              if plan.identities else ""))
        print(f"  + {plan.name}: {m.activation}{', gated' if m.gate else ''}"
              f"{', fused gate_up' if m.fused_gate_first is not None else ''}; {how}")
    for r in rejections:
        print(f"  - {r.node}: {r.reason}")
    for reasons in inline.values():
        for line in reasons:
            print(f"  ! graph mode: {line}")


def _no_ffn_message(model: nn.Module, rejections) -> str:
    lines = [f"no feed-forward block found in {type(model).__name__}. Searched for "
             "projection → activation → projection (plain, gated, fused gate_up; activations "
             "relu, gelu, gelu_tanh, silu, squared relu, quick-gelu)."]
    if rejections:
        lines.append("Candidates examined:")
        lines += [f"  {r.node}: {r.reason}" for r in rejections[:40]]
    else:
        lines.append("The traced graph has no projection by a parameter (nn.Linear, F.linear "
                     "on a parameter, or Conv1D).")
    return "\n".join(lines)
