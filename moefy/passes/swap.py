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
from moefy.layers.peer import PEER
from moefy.layers.record import ConversionRecord
from moefy.layers.tokens import install_token_hooks, remove_token_hooks
from moefy.passes import build, peer, rewrite
from moefy.passes.base import Pass, PassResult
from moefy.passes.fit import check_finite
from moefy.passes.state import ConversionState, Planned

_log = logging.getLogger("moefy.convert")


class BuildAndRewrite(Pass):
    """dense weights ⇒ MoEs, swapped into a copy (or the model, in place) one at a time;
    graph-mode units become their exported graph with each FFN replaced by its MoE. In place,
    a failure puts every swapped module back before it propagates."""

    def call(self, s: ConversionState) -> PassResult:
        if s.inplace:  # what ``restore`` puts back if anything fails from here on
            paths = {alias for p in s.plans for path in [p.plan.replace, *p.plan.identities]
                     for alias in rewrite.module_paths(s.model, path)}
            paths |= {p.unit.path for p in s.plans if p.unit.path in s.graph_paths}
            s.originals = {path: s.model.get_submodule(path) for path in paths if path}
        return self._build(s)

    def _build(self, s: ConversionState) -> PassResult:
        generator = torch.Generator().manual_seed(s.config.seed)
        graph_units = [u for u in s.units if u.path in s.graph_paths]
        swapped = [p.plan for p in s.plans if p.unit.path not in s.graph_paths]
        swapped += [rewrite.SurgeryPlan(u.path, u.path, [], None) for u in graph_units if u.path]
        if "" not in s.graph_paths:
            s.target = s.model if s.inplace else copy_without(s.model, swapped)
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
    def _moe(s: ConversionState, p: Planned, generator: torch.Generator) -> MoE | PEER:
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
        moe.conversion = ConversionRecord.of(moe.conversion).with_(
            name=p.plan.name, method=s.config.method, dense_ffn_size=dense.ffn_size)
        return moe


def restore(s: ConversionState) -> None:
    """Put the dense modules back into a model converted in place (deepest paths last, so a
    restored parent is not overwritten by its child's old module), and drop the hash hooks."""
    for path, module in sorted(s.originals.items(), key=lambda kv: kv[0].count(".")):
        s.model.set_submodule(path, module)
    if s.originals:
        remove_token_hooks(s.model)


def copy_without(model: nn.Module, plans) -> nn.Module:
    """deepcopy of ``model``, except the modules about to be swapped out: the copy shares
    them for the moment instead of duplicating weights that are dropped right after."""
    memo: dict[int, object] = {}
    for plan in plans:
        for path in [plan.replace, *plan.identities]:
            module = model.get_submodule(path)
            memo[id(module)] = module
    return copy.deepcopy(model, memo)
