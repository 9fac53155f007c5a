"""Planning: FFN matches ⇒ one plan per FFN (module surgery, else graph mode), the plans that
only / skip / keep_first / keep_last leave, and every check that can fail before the model
changes.

    dense model → TraceUnits → graphs (the whole model, else its largest exportable modules)
      → FindFFNs → matches (+ every rejected candidate and why)
      → TraceHosts → a module whose forward runs an FFN inline, exported alone
      → PlanRewrite → one plan per FFN, however many call sites (swap a module; else graph
        mode for the smallest module whose forward runs it)
      → MakeDynamic → graph-mode units exported again with dynamic sizes
      → Select → CheckBeforeChange
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import replace

import torch.nn as nn

from moefy.config import MoEConfig
from moefy.errors import (
    ConversionError,
    NoFFNFoundError,
    TraceError,
    first_line,
)
from moefy.passes import build, find_ffn, neuron, peer, rewrite, trace
from moefy.passes.base import Pass, PassResult
from moefy.passes.stages import Found, Plan, Plans, Request, Traced, join
from moefy.passes.trace import TracedUnit

_log = logging.getLogger("moefy.convert")


class TraceUnits(Pass):
    """dense model ⇒ exported graph(s) (whole model, else its largest exportable modules)."""

    def call(self, r: Request) -> PassResult:
        # static shapes (2-4x faster to export) unless calibration batches of other sizes
        # will run through the graphs; graph-mode units are exported again, dynamic
        calibrating = r.calibration_data is not None and r.config.method in ("split", "peer")
        units = trace.trace_units(r.model, r.args, r.kwargs, dynamic=calibrating)
        return PassResult(False, {"graphs": len(units)}, Traced(tuple(units)))


class FindFFNs(Pass):
    """graphs ⇒ FFN matches, plus every rejected candidate and why."""

    needs = (Traced,)

    def call(self, r: Request, traced: Traced) -> PassResult:
        matches, rejections = [], []
        for unit in traced.units:
            found, rejected = find_ffn.find_ffns(unit.ep, r.config.method)
            matches += [(unit, m) for m in found]
            rejections += [find_ffn.Rejection(join(unit.path, x.node), x.reason)
                           for x in rejected]
        return PassResult(False, {"ffns": len(matches), "rejected": len(rejections)},
                          Found(traced.units, tuple(matches), tuple(rejections)))


class TraceHosts(Pass):
    """FFNs inline in a submodule's forward (no module boundary to swap) ⇒ that module
    exported alone, with the inputs it received on the example inputs, so that graph mode
    rewrites it and swaps it in, not the whole model. Its FFN matches replace those found in
    the larger graph; a host that does not export stays there (``Found.untraced`` says
    why)."""

    needs = (Found,)

    def call(self, r: Request, found: Found) -> PassResult:
        wanted: dict[str, TracedUnit] = {}  # host path -> the unit whose graph holds it
        for unit in found.units:
            scopes = rewrite.module_scopes(unit.ep.graph)
            for sites in by_weights(found.of(unit)):
                host = rewrite.host_module(sites[0])
                plan = rewrite.plan_surgery(sites[0], unit.ep.graph, unit.module, scopes, sites)
                # a block that changes the width stays dense rather than go to graph mode
                left_dense = _graph_mode_problem(sites[0], plan, host) is not None
                if isinstance(plan, str) and host and not left_dense:
                    wanted[join(unit.path, host)] = unit
        # outermost only: a host's own graph mode covers any FFN inline in a module inside it
        hosts = [h for h in wanted if not any(h.startswith(o + ".") for o in wanted)]
        if not hosts:
            return PassResult(False, {"hosts": 0}, found)
        calls = trace.record_calls(r.model, r.args, r.kwargs, paths=set(hosts))
        units, matches, untraced = list(found.units), list(found.matches), {}
        for path in hosts:
            parent, module = wanted[path], r.model.get_submodule(path)
            if path not in calls:
                untraced[path] = f"{path} did not run on the example inputs"
                continue
            try:
                ep = trace.export_model(module, *calls[path], dynamic=True)  # for graph mode
            except TraceError as exc:
                untraced[path] = f"{path} alone did not export ({first_line(exc)})"
                continue
            inner = path[len(parent.path) + 1:] if parent.path else path
            matches = [(u, m) for u, m in matches if u is not parent or not (
                (h := rewrite.host_module(m)) == inner or h.startswith(inner + "."))]
            unit = TracedUnit(path, module, ep, dynamic=True)
            units.append(unit)
            found_here = find_ffn.find_ffns(ep, r.config.method)[0]  # rejections: seen
            matches += [(unit, m) for m in found_here]
        return PassResult(False, {"hosts": len(hosts) - len(untraced),
                                  "untraced": len(untraced)},
                          Found(tuple(units), tuple(matches), found.rejections, untraced))


class PlanRewrite(Pass):
    """matches ⇒ one plan per FFN, however many sites call it: the modules to swap (surgery),
    else graph mode for the smallest module whose forward runs the whole FFN."""

    needs = (Found,)

    def call(self, r: Request, found: Found) -> PassResult:
        plans, inline, rejections = [], {}, list(found.rejections)
        for unit in found.units:
            scopes = rewrite.module_scopes(unit.ep.graph)
            for sites in by_weights(found.of(unit)):
                match = sites[0]  # the representative: its key holds the FFN's statistics
                plan = rewrite.plan_surgery(match, unit.ep.graph, unit.module, scopes, sites)
                why = _graph_mode_problem(match, plan, unit.path)
                if why is not None:
                    rejections.append(find_ffn.Rejection(join(unit.path, match.output.name),
                                                         why))
                    continue
                if isinstance(plan, str):  # no module boundary: graph mode for this unit
                    name = (join(unit.path, match.name) if match.name
                            else unit.path or match.output.name)
                    why = found.untraced.get(join(unit.path, rewrite.host_module(match)))
                    inline.setdefault(unit.path, []).append(
                        f"{name}: {plan}" + (f"; {why}" if why else ""))
                    plan = rewrite.SurgeryPlan(name, "", [], None)
                else:
                    plan = rewrite.SurgeryPlan(
                        join(unit.path, plan.name), join(unit.path, plan.replace),
                        [join(unit.path, p) for p in plan.identities], plan.dropout)
                plans.append(Plan(unit, match, plan, tuple(sites)))
        inline = {path: tuple(reasons) for path, reasons in inline.items()}
        if r.explain:
            _print_explanation(plans, rejections, inline)
        if not plans:
            raise NoFFNFoundError(_no_ffn_message(r.model, rejections))
        return PassResult(False, {"surgery": sum(p.unit.path not in inline for p in plans),
                                  "graph_mode": sum(p.unit.path in inline for p in plans),
                                  "shared_sites": sum(len(p.sites) - 1 for p in plans)},
                          Plans(found.units, tuple(plans), inline))


class MakeDynamic(Pass):
    """static graphs that graph mode returns ⇒ the same graphs exported again with dynamic
    batch and sequence sizes (the result must take other sizes), their plans moved onto the
    new graph's matches (the same FFNs, found by their weights). A unit that does not export
    so keeps its static graph, which then takes only the example's sizes."""

    needs = (Plans,)

    def call(self, r: Request, plans: Plans) -> PassResult:
        new: dict[int, TracedUnit] = {}  # id(old unit) -> its dynamic twin
        sites: dict[int, dict] = {}  # id(old unit) -> the twin's sites by weights
        for unit in {id(p.unit): p.unit for p in plans.plans
                     if p.unit.path in plans.inline}.values():
            if unit.dynamic:
                continue
            calls = ({"": (r.args, r.kwargs)} if not unit.path
                     else trace.record_calls(r.model, r.args, r.kwargs, paths={unit.path}))
            try:
                ep = trace.export_model(unit.module, *calls[unit.path], dynamic=True)
            except TraceError as exc:
                _log.warning("graph mode keeps %s's example sizes: %s",
                             unit.path or "the model", first_line(exc))
                continue
            by = {weights_of(g[0]): g
                  for g in by_weights(find_ffn.find_ffns(ep, r.config.method)[0])}
            if any(weights_of(p.match) not in by for p in plans.plans if p.unit is unit):
                _log.warning("graph mode keeps %s's example sizes: its dynamic graph matched "
                             "other FFNs", unit.path or "the model")
                continue
            new[id(unit)], sites[id(unit)] = TracedUnit(unit.path, unit.module, ep, True), by
        if not new:
            return PassResult(False, {"reexported": 0}, plans)
        moved = []
        for p in plans.plans:
            if id(p.unit) in new:
                group = sites[id(p.unit)][weights_of(p.match)]
                p = Plan(new[id(p.unit)], group[0], p.plan, tuple(group))
            moved.append(p)
        units = tuple(new.get(id(u), u) for u in plans.units)
        return PassResult(False, {"reexported": len(new)},
                          replace(plans, units=units, plans=tuple(moved)))


def _graph_mode_problem(match, plan, unit_path: str) -> str | None:
    """Why a block that changes the width (H → O: a classifier head such as DeBERTa's pooler
    dense → act → classifier) is left dense rather than converted in graph mode, or None. It
    is converted where a module swap holds it (a tabular MLP, a head of its own); graph mode
    would turn the module that runs it, often the whole model, into a GraphModule."""
    if not isinstance(plan, str) or match.widths is None or match.widths[0] == match.widths[1]:
        return None
    h, o = match.widths
    return (f"output width {o} differs from input width {h} and {plan}: a block that changes "
            "the width is converted only by a module swap, not in graph mode (which would "
            f"turn {unit_path or 'the model'} into a GraphModule for it)")


def by_weights(matches: list) -> list[list]:
    """Matches grouped by the weights they read, in graph order: one group is one FFN, and
    each further match in it is another call site of that FFN (a module run by several
    layers)."""
    groups: dict[tuple, list] = {}
    for m in matches:
        groups.setdefault(weights_of(m), []).append(m)
    return list(groups.values())


def weights_of(match) -> tuple:
    return (match.up.weight, match.gate.weight if match.gate is not None else None,
            match.down.weight)


class Select(Pass):
    """plans ⇒ the plans that only / skip / keep_first / keep_last leave."""

    needs = (Plans,)

    def call(self, r: Request, plans: Plans) -> PassResult:
        chosen = _select(plans.plans, r.config)
        graph_paths = frozenset(p.unit.path for p in chosen if p.unit.path in plans.inline)
        return PassResult(False, {"selected": len(chosen),
                                  "left_dense": len(plans.plans) - len(chosen)},
                          replace(plans, plans=tuple(chosen), graph_paths=graph_paths))


class CheckBeforeChange(Pass):
    """Raise now for anything the rewrite would fail on; the model is still untouched."""

    needs = (Plans,)

    def call(self, r: Request, plans: Plans) -> PassResult:
        if r.inplace and "" in plans.graph_paths:
            raise ConversionError(
                "these FFNs run inline in the model's own forward and can only be converted "
                "in graph mode, which returns a new GraphModule; call convert with "
                "inplace=False:\n  " + "\n  ".join(plans.inline[""]))
        for p in plans.plans:
            dense = build.dense_weights(p.unit.module, p.match)
            build.check_divisible(p.plan.name, dense, r.config)
            if r.config.method == "peer":
                peer.check_peer(p.plan.name, dense, r.config)
            elif r.config.method == "neuron":
                neuron.check_neuron(p.plan.name, dense)
        return PassResult(False, {"checked": len(plans.plans)})


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
