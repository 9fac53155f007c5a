"""Planning: FFN matches ⇒ one plan per FFN (module surgery, else graph mode), the plans that
only / skip / keep_first / keep_last leave, and every check that can fail before the model
changes.

    dense model → TraceUnits → graphs (the whole model, else its largest exportable modules)
      → FindFFNs → matches (+ every rejected candidate and why)
      → PlanRewrite → one plan per FFN, however many call sites (swap a module; else graph mode
        for the smallest module whose forward runs it, exported again with dynamic sizes)
      → Select → CheckBeforeChange
"""

from __future__ import annotations

import fnmatch
import logging

import torch.nn as nn

from moefy.config import MoEConfig
from moefy.errors import (
    ConversionError,
    NoFFNFoundError,
    TraceError,
    first_line,
)
from moefy.passes import build, find_ffn, peer, rewrite, trace
from moefy.passes.base import Pass, PassResult
from moefy.passes.state import ConversionState, Planned, join

_log = logging.getLogger("moefy.convert")


class TraceUnits(Pass):
    """dense model ⇒ exported graph(s) (whole model, else its largest exportable modules)."""

    def call(self, s: ConversionState) -> PassResult:
        # static shapes (2-4x faster to export) unless calibration batches of other sizes
        # will run through the graphs; graph-mode units are exported again, dynamic
        calibrating = s.calibration_data is not None and s.config.method in ("split", "peer")
        s.units = trace.trace_units(s.model, s.args, s.kwargs, dynamic=calibrating)
        return PassResult(False, {"graphs": len(s.units)})


class FindFFNs(Pass):
    """graphs ⇒ FFN matches, plus every rejected candidate and why."""

    def call(self, s: ConversionState) -> PassResult:
        for unit in s.units:
            matches, rejected = find_ffn.find_ffns(unit.ep)
            s.found += [(unit, m) for m in matches]
            s.rejections += [find_ffn.Rejection(join(unit.path, r.node), r.reason)
                             for r in rejected]
        return PassResult(False, {"ffns": len(s.found), "rejected": len(s.rejections)})


class PlanRewrite(Pass):
    """matches ⇒ one plan per FFN, however many sites call it: the modules to swap (surgery),
    else graph mode for the smallest module whose forward runs the whole FFN."""

    def call(self, s: ConversionState) -> PassResult:
        untraced = _trace_hosts(s)  # before planning: hosts become units of their own
        for unit in s.units:
            scopes = rewrite.module_scopes(unit.ep.graph)
            for sites in _by_weights([m for u, m in s.found if u is unit]):
                match = sites[0]  # the representative: its key holds the FFN's statistics
                plan = rewrite.plan_surgery(match, unit.ep.graph, unit.module, scopes, sites)
                if isinstance(plan, str):  # no module boundary: graph mode for this unit
                    name = (join(unit.path, match.name) if match.name
                            else unit.path or match.output.name)
                    why = untraced.get(join(unit.path, rewrite.host_module(match)))
                    s.inline.setdefault(unit.path, []).append(
                        f"{name}: {plan}" + (f"; {why}" if why else ""))
                    plan = rewrite.SurgeryPlan(name, "", [], None)
                else:
                    plan = rewrite.SurgeryPlan(
                        join(unit.path, plan.name), join(unit.path, plan.replace),
                        [join(unit.path, p) for p in plan.identities], plan.dropout)
                s.plans.append(Planned(unit, match, plan, sites))
        _make_dynamic(s, {p.unit.path: p.unit for p in s.plans if p.unit.path in s.inline})
        if s.explain:
            _print_explanation(s.plans, s.rejections, s.inline)
        if not s.plans:
            raise NoFFNFoundError(_no_ffn_message(s.model, s.rejections))
        return PassResult(False, {"surgery": sum(p.unit.path not in s.inline for p in s.plans),
                                 "graph_mode": sum(p.unit.path in s.inline for p in s.plans),
                                 "shared_sites": sum(len(p.sites) - 1 for p in s.plans)})


def _by_weights(matches: list) -> list[list]:
    """Matches grouped by the weights they read, in graph order: one group is one FFN, and
    each further match in it is another call site of that FFN (a module run by several
    layers)."""
    groups: dict[tuple, list] = {}
    for m in matches:
        groups.setdefault(_weights(m), []).append(m)
    return list(groups.values())


def _weights(match) -> tuple:
    return (match.up.weight, match.gate.weight if match.gate is not None else None,
            match.down.weight)


def _make_dynamic(s: ConversionState, units: dict) -> None:
    """Graph mode returns the unit's graph, which must take other batch and sequence sizes:
    export each static unit (path -> unit) again with them dynamic, and move its plans onto
    the new graph's matches (the same FFNs, found by their weights). A unit that does not
    export so keeps its static graph, which then takes only the example's sizes."""
    for unit in units.values():
        if unit.dynamic:
            continue
        calls = ({"": (s.args, s.kwargs)} if not unit.path
                 else trace.record_calls(s.model, s.args, s.kwargs, paths={unit.path}))
        plans = [p for p in s.plans if p.unit is unit]
        try:
            ep = trace.export_model(unit.module, *calls[unit.path], dynamic=True)
        except TraceError as exc:
            _log.warning("graph mode keeps %s's example sizes: %s", unit.path or "the model",
                         first_line(exc))
            continue
        sites = {_weights(g[0]): g for g in _by_weights(find_ffn.find_ffns(ep)[0])}
        if any(_weights(p.match) not in sites for p in plans):
            _log.warning("graph mode keeps %s's example sizes: its dynamic graph matched "
                         "other FFNs", unit.path or "the model")
            continue
        unit.ep, unit.dynamic = ep, True
        for p in plans:
            p.sites = sites[_weights(p.match)]
            p.match = p.sites[0]
        s.found = [(u, m) for u, m in s.found if u is not unit]
        s.found += [(unit, m) for g in sites.values() for m in g]


def _trace_hosts(s: ConversionState) -> dict[str, str]:
    """FFNs inline in a submodule's forward (no module boundary to swap): export that module
    alone, with the inputs it received on the example inputs, so that graph mode rewrites
    it and swaps it in, not the whole model. Its FFN matches replace those found in the
    larger graph. Returns, per host that did not export, why (it stays in the larger
    graph)."""
    wanted: dict[str, trace.TracedUnit] = {}  # host path -> the unit whose graph holds it
    for unit in s.units:
        scopes = rewrite.module_scopes(unit.ep.graph)
        for sites in _by_weights([m for u, m in s.found if u is unit]):
            host = rewrite.host_module(sites[0])
            plan = rewrite.plan_surgery(sites[0], unit.ep.graph, unit.module, scopes, sites)
            if isinstance(plan, str) and host:
                wanted[join(unit.path, host)] = unit
    # outermost only: a host's own graph mode covers any FFN inline in a module inside it
    hosts = [h for h in wanted if not any(h.startswith(o + ".") for o in wanted)]
    if not hosts:
        return {}
    calls = trace.record_calls(s.model, s.args, s.kwargs, paths=set(hosts))
    untraced = {}
    for path in hosts:
        parent, module = wanted[path], s.model.get_submodule(path)
        if path not in calls:
            untraced[path] = f"{path} did not run on the example inputs"
            continue
        try:
            ep = trace.export_model(module, *calls[path], dynamic=True)  # for graph mode
        except TraceError as exc:
            untraced[path] = f"{path} alone did not export ({first_line(exc)})"
            continue
        inner = path[len(parent.path) + 1:] if parent.path else path
        s.found = [(u, m) for u, m in s.found if u is not parent or not (
            (h := rewrite.host_module(m)) == inner or h.startswith(inner + "."))]
        unit = trace.TracedUnit(path, module, ep, dynamic=True)
        s.units.append(unit)
        s.found += [(unit, m) for m in find_ffn.find_ffns(ep)[0]]  # rejections: seen above
    return untraced


class Select(Pass):
    """plans ⇒ the plans that only / skip / keep_first / keep_last leave."""

    def call(self, s: ConversionState) -> PassResult:
        before = len(s.plans)
        s.plans = _select(s.plans, s.config)
        s.graph_paths = {p.unit.path for p in s.plans if p.unit.path in s.inline}
        return PassResult(False, {"selected": len(s.plans), "left_dense": before - len(s.plans)})


class CheckBeforeChange(Pass):
    """Raise now for anything the rewrite would fail on; the model is still untouched."""

    def call(self, s: ConversionState) -> PassResult:
        if s.inplace and "" in s.graph_paths:
            raise ConversionError(
                "these FFNs run inline in the model's own forward and can only be converted "
                "in graph mode, which returns a new GraphModule; call convert with "
                "inplace=False:\n  " + "\n  ".join(s.inline[""]))
        for p in s.plans:
            dense = build.dense_weights(p.unit.module, p.match)
            build.check_divisible(p.plan.name, dense, s.config)
            if s.config.method == "peer":
                peer.check_peer(p.plan.name, dense, s.config)
        return PassResult(False, {"checked": len(s.plans)})


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


def _print_explanation(plans, rejections, inline) -> None:
    print(f"moefy: {len(plans)} FFN(s) found")
    for p in plans:
        m, plan = p.match, p.plan
        how = (f"graph mode in {p.unit.path or 'the model'}" if p.unit.path in inline
               else f"swap {plan.replace}" + (f", identities {plan.identities}"
                                              if plan.identities else ""))
        if len(p.sites) > 1:
            how += f"; one MoE shared by {len(p.sites)} call sites"
        print(f"  + {plan.name}: {m.activation}{', gated' if m.gate else ''}"
              f"{', fused gate_up' if m.fused_gate_first is not None else ''}; {how}")
    for r in rejections:
        print(f"  - {r.node}: {r.reason}")
    for reasons in inline.values():
        for line in reasons:
            print(f"  ! graph mode: {line}")


def _no_ffn_message(model: nn.Module, rejections) -> str:
    mixing = [r for r in rejections if "token-mixing" in r.reason]
    if mixing:  # an FFN was found, but it mixes tokens: say that first
        lines = [f"{type(model).__name__}'s feed-forward blocks mix tokens ({len(mixing)} "
                 f"found): {mixing[0].reason}"]
    else:
        lines = [f"no feed-forward block found in {type(model).__name__}. Searched for "
                 "projection → element-wise activation → projection (plain, gated, fused "
                 "gate_up; any element-wise activation)."]
    if rejections:
        lines.append("Candidates examined:")
        lines += [f"  {r.node}: {r.reason}" for r in rejections[:40]]
    else:
        lines.append("The traced graph has no projection by a parameter (linear, addmm, "
                     "x @ W, einsum, or a 1×1 convolution with a parameter weight).")
    return "\n".join(lines)
