"""Building and swapping: dense weights ⇒ MoE (or PEER) layers, swapped into a copy of the
model (or the model itself, in place) one FFN at a time.

    plans + statistics → build.upcycle | build.split | peer.build_peer → check finite
      → the layer's ConversionRecord → rewrite.apply_surgery (a module swapped)
        | graph mode: the unit's exported graph with each FFN replaced by a call of its MoE

In place, a failure puts every swapped module back (``restore``) before it propagates.
"""

from __future__ import annotations

import copy
import logging

import torch
import torch.nn as nn

from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN
from moefy.layers.peer import PEER
from moefy.layers.record import ConversionRecord
from moefy.layers.tokens import install_token_hooks, remove_token_hooks
from moefy.passes import build, neuron, peer, rewrite
from moefy.passes.base import Pass, PassResult
from moefy.passes.fit import check_finite
from moefy.passes.stages import Converted, Plan, Plans, Request, Statistics

_log = logging.getLogger("moefy.convert")


class BuildAndRewrite(Pass):
    """dense weights ⇒ MoEs, swapped into a copy (or the model, in place) one at a time;
    graph-mode units become their exported graph with each FFN replaced by its MoE. In place,
    a failure puts every swapped module back before it propagates."""

    needs = (Plans, Statistics)

    def call(self, r: Request, plans: Plans, stats: Statistics) -> PassResult:
        originals = {}
        if r.inplace:  # what ``restore`` puts back if anything fails from here on
            paths = {alias for p in plans.plans for path in [p.plan.replace, *p.plan.identities]
                     for alias in rewrite.module_paths(r.model, path)}
            paths |= {p.unit.path for p in plans.plans if p.unit.path in plans.graph_paths}
            originals = {path: r.model.get_submodule(path) for path in paths if path}
        try:
            target, graph_units = self._build(r, plans, stats)
        except BaseException:
            restore(r.model, originals)
            raise
        return PassResult(True, {"moe": len(plans.plans), "graph_units": graph_units},
                          Converted(target, originals))

    def _build(self, r: Request, plans: Plans, stats: Statistics) -> tuple[nn.Module, int]:
        generator = torch.Generator().manual_seed(r.config.seed)
        graph_units = [u for u in plans.units if u.path in plans.graph_paths]
        swapped = [p.plan for p in plans.plans if p.unit.path not in plans.graph_paths]
        swapped += [rewrite.SurgeryPlan(u.path, u.path, [], None) for u in graph_units if u.path]
        target = None
        if "" not in plans.graph_paths:
            target = r.model if r.inplace else copy_without(r.model, swapped)
        for unit in graph_units:
            gm = copy.deepcopy(unit.ep.module())  # ep.module() shares the caller's parameters
            swaps = []
            for p in plans.plans:
                if p.unit is unit:
                    # one MoE (wrapped once) for all the FFN's call sites
                    moe = rewrite.wrap_for(p.match, self._moe(r, p, stats, generator))
                    swaps += [(site, moe) for site in p.sites]
            gm = rewrite.keep_attributes(rewrite.rewrite_graph(gm, swaps), unit.module)
            gm.register_forward_pre_hook(rewrite.TracedCallCheck(gm), with_kwargs=True)
            if unit.path:
                target.set_submodule(unit.path, gm.train(unit.module.training))
            else:
                target = gm
                if hasattr(r.model, "generate"):
                    _log.warning(
                        "%s runs an FFN inline in its own forward, so the result is a "
                        "GraphModule: it keeps the model's config but not generate(), which "
                        "calls the model with caches that the traced graph cannot take",
                        type(r.model).__name__)
        for p in plans.plans:
            if p.unit.path not in plans.graph_paths:
                moe = rewrite.wrap_for(p.match, self._moe(r, p, stats, generator))
                rewrite.apply_surgery(target, p.plan, moe)
        if r.config.router == "hash":
            install_token_hooks(target)
        return target, len(graph_units)

    @staticmethod
    def _moe(r: Request, p: Plan, stats: Statistics, generator: torch.Generator
             ) -> MoE | PEER | NeuronFFN:
        dense = build.dense_weights(p.unit.module, p.match)
        ffn_stats = stats.stats.get(p.key)
        if r.config.method == "split":
            moe = build.split(dense, r.config, generator, ffn_stats)
        elif r.config.method == "peer":
            moe = peer.build_peer(dense, r.config, generator, ffn_stats)
        elif r.config.method == "neuron":
            moe = neuron.build_neuron(dense, r.config.selection, p.plan.name)
        else:
            moe = build.upcycle(dense, r.config, generator)
        check_finite(moe, p.plan.name)  # before it goes anywhere near the model
        moe.train(r.model.training)
        moe.conversion = ConversionRecord.of(moe.conversion).with_(
            name=p.plan.name, method=r.config.method, dense_ffn_size=dense.ffn_size)
        return moe


def restore(model: nn.Module, originals: dict) -> None:
    """Put the dense modules back into a model converted in place (deepest paths last, so a
    restored parent is not overwritten by its child's old module), and drop the hash hooks."""
    for path, module in sorted(originals.items(), key=lambda kv: kv[0].count(".")):
        model.set_submodule(path, module)
    if originals:
        remove_token_hooks(model)


def copy_without(model: nn.Module, plans) -> nn.Module:
    """deepcopy of ``model``, except the modules about to be swapped out: the copy shares
    them for the moment instead of duplicating weights that are dropped right after."""
    memo: dict[int, object] = {}
    for plan in plans:
        for path in [plan.replace, *plan.identities]:
            module = model.get_submodule(path)
            memo[id(module)] = module
    return copy.deepcopy(model, memo)
