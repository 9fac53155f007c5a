"""Module surgery: an FFN match ⇒ which modules to swap so the model class keeps working.

    modules covering the FFN, in order: [m_1, ..., m_n] (each holds only FFN nodes)
      ⇒ m_1 := MoE (the whole FFN), m_2..m_n := Identity

One module holding the whole block (LlamaMLP, GPT2MLP) is the case n = 1; BERT's
``BertIntermediate`` + ``BertOutput.dense`` is n = 2; ``nn.Sequential(Linear, GELU, Linear)``
is n = 3. A module that also holds a dropout after the block is kept as
``Sequential(MoE, Dropout)``. Blocks whose pieces sit inline in a larger forward
(``nn.TransformerEncoderLayer`` calls ``F.relu`` between its two linears) have no module
boundary to swap; for them graph mode rewrites the exported graph instead:

    x → [FFN nodes] → y   ⇒   x → call_module(MoE) → y       (returns a GraphModule)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import Node

from moefy.passes.find_ffn import FFNMatch

aten = torch.ops.aten


@dataclass
class SurgeryPlan:
    name: str
    replace: str  # module path that becomes the MoE
    identities: list[str]  # module paths that become Identity
    dropout: float | None  # trailing dropout inside ``replace`` (kept after the MoE)


def _stack(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values()]


def _scopes(graph: torch.fx.Graph) -> dict[str, list[Node]]:
    """Module path -> the call_function nodes executed inside it."""
    scopes: dict[str, list[Node]] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            for path in _stack(node):
                scopes.setdefault(path, []).append(node)
    return scopes


def _trailing_dropout(match: FFNMatch, scope_nodes: list[Node]) -> list[Node]:
    chain, node = [], match.output
    while len(node.users) == 1:
        (user,) = node.users
        if user.target != aten.dropout.default or user not in scope_nodes:
            break
        chain.append(user)
        node = user
    return chain


def plan_surgery(match: FFNMatch, graph: torch.fx.Graph, model: nn.Module,
                 scopes: dict[str, list[Node]] | None = None) -> SurgeryPlan | str:
    """How to swap ``match`` into ``model`` by modules, or the reason it cannot be done."""
    scopes = scopes if scopes is not None else _scopes(graph)
    inside = set(match.nodes)
    groups: list[tuple[str, list[Node]]] = []
    for node in match.nodes:
        # the outermost module whose nodes all belong to the FFN (plus a trailing dropout)
        best = None
        for path in _stack(node):
            if not path:
                continue
            nodes = scopes.get(path, [])
            extra = [n for n in nodes if n not in inside]
            if not extra or extra == _trailing_dropout(match, nodes):
                best = path
                break
        if best is None:
            owner = _stack(node)[-1] if _stack(node) else "the model"
            return (f"node {node.name} runs inline in {owner or 'the top-level forward'}, "
                    "which also does other work: no module boundary to swap")
        if not groups or groups[-1][0] != best:
            groups.append((best, [node]))
        else:
            groups[-1][1].append(node)
    paths = [p for p, _ in groups]
    if len(set(paths)) != len(paths):
        return "the FFN's modules interleave; no module boundary to swap"
    first_path, first_nodes = groups[0]
    module_inputs = {a for n in first_nodes for a in n.all_input_nodes
                     if a not in inside and a.op != "placeholder"
                     and isinstance(a.meta.get("val"), torch.Tensor)}  # not shape symbols
    if module_inputs - {match.input}:
        return f"module {first_path} takes inputs besides the FFN input"
    for path in paths:
        try:
            model.get_submodule(path)
        except AttributeError:
            return f"module {path} cannot be addressed by its path"
    tail = _trailing_dropout(match, scopes.get(paths[-1], []))
    dropout = float(tail[0].args[1]) if tail and len(paths) == 1 else None
    return SurgeryPlan(match.name or first_path, first_path, paths[1:], dropout)


def apply_surgery(model: nn.Module, plan: SurgeryPlan, moe: nn.Module) -> None:
    """Swap the modules of ``plan`` in ``model`` (in place)."""
    old = model.get_submodule(plan.replace)
    replacement = moe if plan.dropout is None else nn.Sequential(moe, nn.Dropout(plan.dropout))
    model.set_submodule(plan.replace, replacement.train(old.training))
    for path in plan.identities:
        model.set_submodule(path, nn.Identity())


def rewrite_graph(gm: torch.fx.GraphModule, swaps: list[tuple[FFNMatch, nn.Module]]
                  ) -> torch.fx.GraphModule:
    """Graph mode: replace each match's nodes in ``gm`` (``ExportedProgram.module()``, whose
    node names are the exported graph's) by one call of its MoE. Dense weights left unused
    are dropped from ``gm``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    for i, (match, moe) in enumerate(swaps):
        target = f"moefy_ffn_{i}"
        gm.add_submodule(target, moe)
        x, out = nodes[match.input.name], nodes[match.output.name]
        with gm.graph.inserting_after(out):
            call = gm.graph.call_module(target, (x,))
        out.replace_all_uses_with(call)
        for node in reversed([nodes[n.name] for n in match.nodes]):
            if not node.users:
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name, _ in list(gm.named_parameters()) + list(gm.named_buffers()):
        if name not in used and not name.startswith("moefy_ffn_"):
            owner, _, leaf = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, leaf)
    gm.graph.lint()
    gm.recompile()
    return gm
