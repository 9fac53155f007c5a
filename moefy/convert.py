"""``moefy.convert``: dense model ⇒ MoE model, as one explicit pipeline of passes."""

from __future__ import annotations

import copy
import fnmatch
import itertools
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moefy.config import MoEConfig
from moefy.errors import (
    AlreadyConvertedError,
    ConversionError,
    NoFFNFoundError,
    NonFiniteLossError,
    TraceError,
    first_line,
)
from moefy.layers.moe import MoE
from moefy.layers.peer import PEER
from moefy.layers.tokens import install_token_hooks, remove_token_hooks
from moefy.passes import build, find_ffn, peer, rewrite, trace
from moefy.passes.base import Pass, PassResult
from moefy.passes.calibrate import Progress, collect_stats, token_mask
from moefy.passes.distill import distill_for
from moefy.passes.fit import check_finite
from moefy.passes.verify import RunDense, Verify, describe, describe_batch

_log = logging.getLogger(__name__)


def convert(model: nn.Module, config: MoEConfig, *, example_inputs=None, calibration_data=None,
            inplace: bool = False, verify: bool = True, explain: bool = False,
            progress: bool | None = None) -> nn.Module:
    """Rewrite every feed-forward block of ``model`` into a ``moefy.MoE`` (``moefy.PEER`` for
    ``method="peer"``).

    Args:
        model: a dense model (Hugging Face models need no example inputs).
        config: a ``MoEConfig``.
        example_inputs: a tuple of positional tensors or a dict of keyword tensors.
        calibration_data: an iterable of inputs like ``example_inputs`` (a DataLoader works),
            streamed once in bounded memory (padding tokens are skipped via
            ``attention_mask``). Split conversions then choose shared experts by activation
            frequency, group neurons that fire together (``partition="coactivation"``),
            compensate skipped experts by their mean output and fit the router; PEER
            conversions fit their product keys and query on them.
        inplace: change ``model`` itself instead of a copy.
        verify: where the method preserves the function (upcycle; split with
            top_k == num_experts), check the converted model's outputs against the dense one.
        explain: print every candidate projection and why it was taken or rejected.
        progress: show calibration progress on stderr (default: when stderr is a terminal).

    Returns the converted model: the same class as ``model`` with its FFN modules swapped.
    When an FFN runs inline in a larger forward with no module to swap, the smallest module
    that runs it becomes a ``GraphModule`` of its exported graph with the FFN replaced by a
    call of its MoE (graph mode; it keeps that module's attributes); only an FFN inline in the
    model's own forward makes the whole result a ``GraphModule``.

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
    if calibration_data is None and config.fit_steps and config.method == "split":
        raise ConversionError(f"fit_steps={config.fit_steps} trains each layer on calibration "
                              "tokens: pass calibration_data, or fit_steps=0")
    if calibration_data is None and config.peer_fit_steps:
        raise ConversionError(f"peer_fit_steps={config.peer_fit_steps} fits PEER's keys and query "
                              "on calibration tokens: pass calibration_data, or peer_fit_steps=0")
    if config.minutes is not None and calibration_data is None:
        raise ConversionError(f"minutes={config.minutes} spends the time left after building "
                              "on distillation over calibration batches: pass "
                              "calibration_data, or minutes=None")
    if config.minutes is not None and inplace:
        raise ConversionError("minutes= distils the converted model towards the dense one, "
                              "which inplace=True would overwrite: convert a copy "
                              "(inplace=False), or minutes=None")
    if (_fits_with_gradients(config, calibration_data) or config.minutes is not None) and (
            torch.is_inference_mode_enabled()
            or any(p.is_inference() for p in model.parameters())):
        where = ("convert was called under torch.inference_mode()"
                 if torch.is_inference_mode_enabled() else
                 "the model's weights are inference tensors (made under torch.inference_mode())")
        raise ConversionError(
            f"{where}, and this conversion fits routers or keys with gradients on the "
            "calibration data, which inference mode forbids: call convert under "
            "torch.no_grad() instead (and build the model outside inference_mode), or set "
            "fit_steps=0 with router_init other than 'fit' (split) / peer_fit_steps=0 (peer)")
    existing = [name for name, m in model.named_modules() if isinstance(m, (MoE, PEER))]
    if existing:
        raise AlreadyConvertedError(
            f"the model already holds {len(existing)} moefy MoE layer(s) ({', '.join(existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}): every FFN is already converted. Convert "
            "the original dense model instead.")

    if example_inputs is None and calibration_data is not None:
        # trace with inputs shaped like the calibration batches (same keys and dtypes), not
        # with ones made up from the config
        calibration_data, example_inputs = _peek(calibration_data)
    with _CONVERTING:  # torch.export is not thread-safe: one conversion at a time
        started = time.perf_counter()  # the budget (config.minutes) counts from here
        return _convert(model, config, example_inputs, calibration_data, inplace, verify,
                        explain, progress, started)


def _fits_with_gradients(config: MoEConfig, calibration_data) -> bool:
    if calibration_data is None:
        return False
    if config.method == "split":
        return config.fit_steps > 0 or config.router_init in (None, "fit")
    return config.method == "peer" and config.peer_fit_steps != 0


_CONVERTING = threading.RLock()  # re-entrant: a calibration generator may itself convert


def _peek(data) -> tuple[Iterable, object]:
    """(the same stream, its first batch as example inputs) without consuming a batch."""
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ConversionError("calibration_data yielded no batches")
    if isinstance(first, list):  # a DataLoader collates tuples into lists
        first = tuple(first)
    return itertools.chain([first], iterator), first


def _convert(model, config, example_inputs, calibration_data, inplace, verify, explain,
             progress, started) -> nn.Module:
    state = _State(model, config, *trace.split_inputs(model, example_inputs),
                   calibration_data=calibration_data, inplace=inplace, explain=explain,
                   progress=progress, started=started)
    pipeline = [
        RunDense(keep=verify),  # inputs that do not fit fail here, in the model's own words
        TraceUnits(),  # graphs first: everything after reads structure, not class names
        FindFFNs(),  # matches and the reason for every rejected candidate
        PlanRewrite(),  # needs the graph's module scopes; decides surgery or graph mode
        Select(),  # after planning, so only / skip see the final FFN names
        CheckBeforeChange(),  # every failure that input can cause, before anything changes
        Calibrate(),  # statistics the split builder reads
        BuildAndRewrite(),  # one FFN at a time: peak memory is the result plus one FFN
        Verify(enabled=verify),  # compares the finished model with the dense one
        DistillForBudget(),  # last: spends what is left of config.minutes
    ]
    try:
        for step in pipeline:
            step(state)
    except BaseException:
        _restore(state)  # in place, a failure after the swap leaves the model as it was
        raise
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
    reference: list | None = None  # the dense model's output tensors on the example inputs
    originals: dict = field(default_factory=dict)  # in place: module path -> the dense module
    target: nn.Module | None = None
    started: float = 0.0  # perf_counter at convert's start (config.minutes counts from it)
    batches: list = field(default_factory=list)  # calibration batches kept for distillation


class TraceUnits(Pass):
    """dense model ⇒ exported graph(s) (whole model, else its largest exportable modules)."""

    def call(self, s: _State) -> PassResult:
        # static shapes (2-4x faster to export) unless calibration batches of other sizes
        # will run through the graphs; graph-mode units are exported again, dynamic
        calibrating = s.calibration_data is not None and s.config.method in ("split", "peer")
        s.units = trace.trace_units(s.model, s.args, s.kwargs, dynamic=calibrating)
        return PassResult(False, {"graphs": len(s.units)})


class FindFFNs(Pass):
    """graphs ⇒ FFN matches, plus every rejected candidate and why."""

    def call(self, s: _State) -> PassResult:
        for unit in s.units:
            matches, rejected = find_ffn.find_ffns(unit.ep)
            s.found += [(unit, m) for m in matches]
            s.rejections += [find_ffn.Rejection(_join(unit.path, r.node), r.reason)
                             for r in rejected]
        return PassResult(False, {"ffns": len(s.found), "rejected": len(s.rejections)})


class PlanRewrite(Pass):
    """matches ⇒ one plan per FFN, however many sites call it: the modules to swap (surgery),
    else graph mode for the smallest module whose forward runs the whole FFN."""

    def call(self, s: _State) -> PassResult:
        untraced = _trace_hosts(s)  # before planning: hosts become units of their own
        for unit in s.units:
            scopes = rewrite.module_scopes(unit.ep.graph)
            for sites in _by_weights([m for u, m in s.found if u is unit]):
                match = sites[0]  # the representative: its key holds the FFN's statistics
                plan = rewrite.plan_surgery(match, unit.ep.graph, unit.module, scopes, sites)
                if isinstance(plan, str):  # no module boundary: graph mode for this unit
                    name = (_join(unit.path, match.name) if match.name
                            else unit.path or match.output.name)
                    why = untraced.get(_join(unit.path, rewrite.host_module(match)))
                    s.inline.setdefault(unit.path, []).append(
                        f"{name}: {plan}" + (f"; {why}" if why else ""))
                    plan = rewrite.SurgeryPlan(name, "", [], None)
                else:
                    plan = rewrite.SurgeryPlan(
                        _join(unit.path, plan.name), _join(unit.path, plan.replace),
                        [_join(unit.path, p) for p in plan.identities], plan.dropout)
                s.plans.append(_Planned(unit, match, plan, sites))
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


def _make_dynamic(s: _State, units: dict) -> None:
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


def _trace_hosts(s: _State) -> dict[str, str]:
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
                wanted[_join(unit.path, host)] = unit
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

    def call(self, s: _State) -> PassResult:
        before = len(s.plans)
        s.plans = _select(s.plans, s.config)
        s.graph_paths = {p.unit.path for p in s.plans if p.unit.path in s.inline}
        return PassResult(False, {"selected": len(s.plans), "left_dense": before - len(s.plans)})


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
            if s.config.method == "peer":
                peer.check_peer(p.plan.name, dense, s.config)
        return PassResult(False, {"checked": len(s.plans)})


class Calibrate(Pass):
    """calibration batches ⇒ per-FFN activation statistics (split and peer)."""

    def call(self, s: _State) -> PassResult:
        if s.calibration_data is None or s.config.method not in ("split", "peer"):
            return PassResult(False)
        batches = 0
        progress = Progress("calibration", s.progress)
        for batch in s.calibration_data:
            try:
                self._collect(s, batch)
            except ConversionError as exc:
                exc.args = (f"calibration batch {batches}: {exc}",)
                raise
            except Exception as exc:  # any failure here means the batch does not fit
                raise ConversionError(
                    f"calibration batch {batches} does not fit the model: "
                    f"{type(exc).__name__}: {first_line(exc)}\n"
                    f"Each batch must be inputs like example_inputs "
                    f"({describe(s.args, s.kwargs)}), with the same dtypes and the same "
                    f"sizes except batch and sequence; got {describe_batch(batch)}. Nothing "
                    "was changed.") from exc
            batches += 1
            if s.config.minutes is not None:
                s.batches.append(batch)  # distillation cycles through them after building
            tokens = min((st.tokens for st in s.stats.values()), default=0)
            progress.update(f"{batches} batches, {tokens:,} tokens")
            cap = s.config.calibration_tokens
            if cap is not None and tokens >= cap:
                _log.info("calibration: stopped after %d batches (%d tokens per FFN, "
                          "MoEConfig.calibration_tokens)", batches, tokens)
                break
        progress.close()
        if not batches:
            raise ConversionError("calibration_data yielded no batches")
        keys = {f"{p.unit.path}:{p.match.output.name}": p.plan.name for p in s.plans}
        empty = [name for key, name in keys.items()
                 if key not in s.stats or s.stats[key].tokens == 0]
        if empty:
            raise ConversionError(
                f"calibration_data gave no usable token to {', '.join(empty[:4])}: "
                "every token was padding, or non-finite / an extreme outlier (skipped). Check "
                "the data, or convert without calibration_data. Nothing was changed.")
        skipped = sum(st.skipped for st in s.stats.values())
        if skipped:
            _log.warning("calibration: skipped %d token(s) whose FFN input or activation was "
                         "non-finite or an extreme outlier", skipped)
        return PassResult(False, {"batches": batches, "ffns": len(s.stats), "skipped": skipped})

    @staticmethod
    def _collect(s: _State, batch) -> None:
        args, kwargs = trace.batch_inputs(s.model, batch, "it", ConversionError)
        _check_like_example(args, kwargs, s.args, s.kwargs)
        if [u.path for u in s.units] == [""]:  # the whole model is one graph: no hooks
            calls = {"": (args, kwargs)}
        else:
            calls = trace.record_calls(s.model, args, kwargs, paths={u.path for u in s.units})
        mask = token_mask(kwargs)
        for unit in s.units:
            plans = [p for p in s.plans if p.unit is unit]
            sites = [site for p in plans for site in (p.sites or [p.match])]
            same_as = {site.output.name: p.match.output.name
                       for p in plans for site in (p.sites or [p.match])}
            if sites:
                collect_stats(unit.ep, sites, [calls[unit.path]], s.stats, unit.path,
                              mask=mask, same_as=same_as)


class BuildAndRewrite(Pass):
    """dense weights ⇒ MoEs, swapped into a copy (or the model, in place) one at a time;
    graph-mode units become their exported graph with each FFN replaced by its MoE. In place,
    a failure puts every swapped module back before it propagates."""

    def call(self, s: _State) -> PassResult:
        if s.inplace:  # what ``_restore`` puts back if anything fails from here on
            paths = {path for p in s.plans for path in [p.plan.replace, *p.plan.identities]}
            paths |= {p.unit.path for p in s.plans if p.unit.path in s.graph_paths}
            s.originals = {path: s.model.get_submodule(path) for path in paths if path}
        return self._build(s)

    def _build(self, s: _State) -> PassResult:
        generator = torch.Generator().manual_seed(s.config.seed)
        graph_units = [u for u in s.units if u.path in s.graph_paths]
        swapped = [p.plan for p in s.plans if p.unit.path not in s.graph_paths]
        swapped += [rewrite.SurgeryPlan(u.path, u.path, [], None) for u in graph_units if u.path]
        if "" not in s.graph_paths:
            s.target = s.model if s.inplace else _copy_without(s.model, swapped)
        for unit in graph_units:
            gm = copy.deepcopy(unit.ep.module())  # ep.module() shares the caller's parameters
            swaps = []
            for p in s.plans:
                if p.unit is unit:
                    # one MoE (wrapped once) for all the FFN's call sites
                    moe = rewrite.wrap_for(p.match, self._moe(s, p, generator))
                    swaps += [(site, moe) for site in p.sites]
            gm = rewrite.keep_attributes(rewrite.rewrite_graph(gm, swaps), unit.module)
            gm.register_forward_pre_hook(rewrite.TracedCallCheck(gm), with_kwargs=True)
            if unit.path:
                s.target.set_submodule(unit.path, gm.train(unit.module.training))
            else:
                s.target = gm
                if hasattr(s.model, "generate"):
                    _log.warning(
                        "%s runs an FFN inline in its own forward, so the result is a "
                        "GraphModule: it keeps the model's config but not generate(), which "
                        "calls the model with caches that the traced graph cannot take",
                        type(s.model).__name__)
        for unit in s.units:
            unit.ep = None  # it holds references to every dense parameter: let swapped ones go
        for p in s.plans:
            if p.unit.path not in s.graph_paths:
                moe = rewrite.wrap_for(p.match, self._moe(s, p, generator))
                rewrite.apply_surgery(s.target, p.plan, moe)
        if s.config.router == "hash":
            install_token_hooks(s.target)
        return PassResult(True, {"moe": len(s.plans), "graph_units": len(graph_units)})

    @staticmethod
    def _moe(s: _State, p: _Planned, generator: torch.Generator) -> MoE | PEER:
        dense = build.dense_weights(p.unit.module, p.match)
        stats = s.stats.get(f"{p.unit.path}:{p.match.output.name}")
        if s.config.method == "split":
            moe = build.split(dense, s.config, generator, stats)
        elif s.config.method == "peer":
            moe = peer.build_peer(dense, s.config, generator, stats)
        else:
            moe = build.upcycle(dense, s.config, generator)
        check_finite(moe, p.plan.name)  # before it goes anywhere near the model
        moe.train(s.model.training)
        moe.conversion = {"name": p.plan.name, "method": s.config.method,
                          "dense_ffn_size": dense.ffn_size, **getattr(moe, "conversion", {})}
        return moe


class DistillForBudget(Pass):
    """converted model ⇒ the same, distilled towards the dense model on the calibration
    batches for what is left of ``config.minutes``. Each MoE's ``conversion`` records it."""

    def call(self, s: _State) -> PassResult:
        if s.config.minutes is None:
            return PassResult(False)
        left = s.config.minutes * 60.0 - (time.perf_counter() - s.started)
        moes = [m for m in s.target.modules() if isinstance(m, MoE)]
        exact = all(m.top_k >= m.num_experts for m in moes) or s.config.method == "upcycle"
        if exact or left <= 1.0 or not s.batches:
            why = ("the conversion is exact: nothing to distil" if exact else
                   "no calibration batch was kept" if not s.batches else
                   f"building took {s.config.minutes * 60.0 - left:.0f} s, the whole budget "
                   f"of {s.config.minutes:g} min")
            (_log.info if exact else _log.warning)(
                "minutes=%g: no distillation (%s)", s.config.minutes, why)
            info = {"steps": 0, "why": why}
        else:
            try:
                info = distill_for(s.target, s.model, s.batches, left, progress=s.progress)
            except NonFiniteLossError as exc:
                # distill keeps the weights of the last good step: the conversion stands
                _log.warning("minutes=%g: distillation stopped: %s", s.config.minutes,
                             first_line(exc))
                info = {"steps": len(exc.log), "why": f"stopped: {first_line(exc)}"}
            if info.get("steps") and "loss_first" in info:
                _log.info("minutes=%g: distilled %d steps in %.0f s, loss %.4g -> %.4g",
                          s.config.minutes, info["steps"], info["seconds"],
                          info["loss_first"], info["loss_last"])
        for m in moes:
            m.conversion = {**getattr(m, "conversion", {}), "distill": info}
        s.batches = []
        return PassResult(bool(info.get("steps")), info)


def _restore(s: _State) -> None:
    """Put the dense modules back into a model converted in place (deepest paths last, so a
    restored parent is not overwritten by its child's old module), and drop the hash hooks."""
    for path, module in sorted(s.originals.items(), key=lambda kv: kv[0].count(".")):
        s.model.set_submodule(path, module)
    if s.originals:
        remove_token_hooks(s.model)


def _check_like_example(args: tuple, kwargs: dict, ex_args: tuple, ex_kwargs: dict) -> None:
    """A calibration batch must be the traced example's kind of inputs: the same keywords
    and positions (an input the graph was not traced with would be dropped silently, one it
    was traced with would be missing), the same dtypes and ranks."""
    extra, missing = sorted(set(kwargs) - set(ex_kwargs)), sorted(set(ex_kwargs) - set(kwargs))
    if extra or missing or len(args) != len(ex_args):
        raise ConversionError(
            f"its inputs ({describe(args, kwargs)}) are not those the model was traced with "
            f"({describe(ex_args, ex_kwargs)}): every batch must have the same positional "
            "inputs and keywords as example_inputs (when example_inputs is not given, as the "
            "first calibration batch)")
    pairs = list(zip(args, ex_args, strict=True)) + [(kwargs[k], ex_kwargs[k])
                                                     for k in ex_kwargs]
    for got, want in pairs:
        if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or (
                got.dtype != want.dtype or got.dim() != want.dim())):
            raise ConversionError(
                f"its inputs ({describe(args, kwargs)}) differ in dtype or rank from those the "
                f"model was traced with ({describe(ex_args, ex_kwargs)}); convert the batch's "
                "tensors to the example's dtypes")


@dataclass
class _Planned:
    unit: trace.TracedUnit
    match: find_ffn.FFNMatch  # the representative call site (the first in graph order)
    plan: rewrite.SurgeryPlan
    sites: list = field(default_factory=list)  # every call site's FFNMatch, ``match`` first


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
