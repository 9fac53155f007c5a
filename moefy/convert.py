"""``moefy.convert``: dense model ⇒ MoE model, as one explicit pipeline of passes."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from moefy.calibrate import collect_stats
from moefy.config import MoEConfig
from moefy.errors import (
    AlreadyConvertedError,
    ConversionError,
    NoFFNFoundError,
    VerificationError,
)
from moefy.layers.moe import MoE
from moefy.passes import build, find_ffn, rewrite, trace


def convert(model: nn.Module, config: MoEConfig, *, example_inputs=None, calibration_data=None,
            inplace: bool = False, verify: bool = True, explain: bool = False) -> nn.Module:
    """Rewrite every feed-forward block of ``model`` into a ``moefy.MoE``.

    Args:
        model: a dense model (Hugging Face models need no example inputs).
        config: a ``MoEConfig``.
        example_inputs: a tuple of positional tensors or a dict of keyword tensors.
        calibration_data: an iterable of inputs like ``example_inputs`` (a DataLoader works);
            split conversions then choose shared experts by activation frequency and, with
            ``partition="coactivation"``, group neurons that fire together.
        inplace: change ``model`` itself instead of a copy.
        verify: where the method preserves the function (upcycle; split with
            top_k == num_experts), check the converted model's outputs against the dense one.
        explain: print every candidate projection and why it was taken or rejected.

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
    existing = [name for name, m in model.named_modules() if isinstance(m, MoE)]
    if existing:
        raise AlreadyConvertedError(
            f"the model already holds {len(existing)} moefy MoE layer(s) ({', '.join(existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}): every FFN is already converted. Convert "
            "the original dense model instead.")

    # 1. trace: dense model → exported graph(s), module and parameter names on every node
    args, kwargs = trace.split_inputs(model, example_inputs)
    units = trace.trace_units(model, args, kwargs)
    # 2. find: graph → FFN matches (structure, not class names), plus rejected candidates
    # 3. plan: each match → the modules to swap, or graph mode for its unit
    plans: list[_Planned] = []
    rejections: list[find_ffn.Rejection] = []
    inline: dict[str, list[str]] = {}  # unit path -> why it needs graph mode
    for unit in units:
        matches, rejected = find_ffn.find_ffns(unit.ep)
        rejections += [find_ffn.Rejection(_join(unit.path, r.node), r.reason) for r in rejected]
        scopes = rewrite._scopes(unit.ep.graph)
        for match in matches:
            plan = rewrite.plan_surgery(match, unit.ep.graph, unit.module, scopes)
            name = _join(unit.path, match.name or match.output.name)
            if isinstance(plan, str):  # no module boundary: graph mode for this unit
                inline.setdefault(unit.path, []).append(f"{name}: {plan}")
                plan = rewrite.SurgeryPlan(name, "", [], None)
            else:
                plan = rewrite.SurgeryPlan(
                    _join(unit.path, plan.name), _join(unit.path, plan.replace),
                    [_join(unit.path, p) for p in plan.identities], plan.dropout)
            plans.append(_Planned(unit, match, plan))
    if explain:
        _print_explanation(plans, rejections, inline)
    if not plans:
        raise NoFFNFoundError(_no_ffn_message(model, rejections))
    # 4. select: only / skip / keep_first / keep_last
    plans = _select(plans, config)
    graph_paths = {p.unit.path for p in plans if p.unit.path in inline}
    if inplace and "" in graph_paths:
        raise ConversionError(
            "these FFNs run inline in the model's own forward and can only be converted in "
            "graph mode, which returns a new GraphModule; call convert with inplace=False:\n  "
            + "\n  ".join(inline[""]))
    for p in plans:  # every check that can fail, before anything changes
        build.check_divisible(p.plan.name, build.dense_weights(p.unit.module, p.match), config)
    # 4'. calibrate: stream the data through each unit's graph; per-FFN statistics
    stats: dict = {}
    if calibration_data is not None and config.method == "split":
        for batch in calibration_data:
            calls = trace.record_calls(model, *trace.split_inputs(model, batch),
                                       paths={u.path for u in units})
            for unit in units:
                matches = [p.match for p in plans if p.unit is unit]
                if matches:
                    collect_stats(unit.ep, matches, [calls[unit.path]], stats, unit.path)
        if not stats:
            raise ConversionError("calibration_data yielded no batches")
    generator = torch.Generator().manual_seed(config.seed)

    def make_moe(p: _Planned) -> MoE:
        dense = build.dense_weights(p.unit.module, p.match)
        if config.method == "split":
            key = f"{p.unit.path}:{p.match.output.name}"
            moe = build.split(dense, config, generator, stats.get(key))
        else:
            moe = build.upcycle(dense, config, generator)
        moe.train(model.training)
        moe.conversion = {"name": p.plan.name, "method": config.method,
                          "dense_ffn_size": dense.ffn_size}
        return moe

    # 5. build + rewrite, one FFN at a time (peak memory: the result plus one FFN). Units in
    # graph mode become their exported graph with each FFN's nodes replaced by its MoE.
    graph_units = [u for u in units if u.path in graph_paths]
    swapped = [p.plan for p in plans if p.unit.path not in graph_paths]
    swapped += [rewrite.SurgeryPlan(u.path, u.path, [], None) for u in graph_units if u.path]
    if "" in graph_paths:
        target = None
    else:
        target = model if inplace else _copy_without(model, swapped)
    for unit in graph_units:
        gm = copy.deepcopy(unit.ep.module())  # ep.module() shares the caller's parameters
        gm = rewrite.rewrite_graph(gm, [(p.match, make_moe(p)) for p in plans if p.unit is unit])
        if unit.path:
            target.set_submodule(unit.path, gm)
        else:
            target = gm
    for unit in units:
        unit.ep = None  # it holds references to every dense parameter: let swapped ones go
    for p in plans:
        if p.unit.path not in graph_paths:
            rewrite.apply_surgery(target, p.plan, make_moe(p))
    # 6. verify: outputs equal where the method preserves the function
    if verify and (config.method == "upcycle" or config.top_k == config.num_experts):
        _verify(model, target, args, kwargs)
    return target


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
    with torch.no_grad():
        ref = [t for t in tree_leaves(dense(*args, **kwargs)) if isinstance(t, torch.Tensor)]
        got = [t for t in tree_leaves(moe_model(*args, **kwargs)) if isinstance(t, torch.Tensor)]
    if len(ref) != len(got):
        raise VerificationError(f"the converted model returns {len(got)} tensors, the dense "
                                f"model {len(ref)}")
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if not r.is_floating_point():
            continue
        scale = r.abs().max().clamp_min(1e-12)
        err = ((g - r).abs().max() / scale).item()
        if not err <= rtol * 10:  # relative to the output's largest magnitude
            raise VerificationError(
                f"output {i} differs from the dense model: max difference {err:.2e} relative "
                f"to its largest value (tolerance {rtol * 10:.0e})")


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


def report(model: nn.Module) -> str:
    """One row per MoE layer: name, method, E, k, shared, parameters total / active per token,
    FFN FLOP fraction (active FFN work per token relative to the dense FFN)."""
    rows = [("name", "method", "E", "k", "shared", "params", "active", "FFN FLOPs")]
    for name, m in model.named_modules():
        if not isinstance(m, MoE):
            continue
        info = getattr(m, "conversion", {})
        per_neuron = m.hidden_size * (3 if m.gated else 2)  # weights touched per hidden neuron
        shared_size = 0 if m.shared.ffn is None else m.shared.ffn.fc_in.out_features
        active = (m.top_k * m.expert_size + shared_size) * per_neuron
        total = sum(p.numel() for p in m.parameters())
        dense_size = info.get("dense_ffn_size")
        frac = ("—" if dense_size is None else
                f"{(m.top_k * m.expert_size + shared_size) / dense_size:.0%}")
        rows.append((info.get("name", name), info.get("method", "—"), str(m.num_experts),
                     str(m.top_k), str(shared_size), f"{total / 1e6:.2f}M",
                     f"{(active + m.router.weight.numel()) / 1e6:.2f}M", frac))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)
