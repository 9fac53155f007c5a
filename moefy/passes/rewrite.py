"""Module surgery: an FFN match ⇒ which modules to swap so the model class keeps working.

    modules covering the FFN, in order: [m_1, ..., m_n] (each call holds only FFN nodes)
      ⇒ m_1 := MoE (the whole FFN), m_2..m_n := Identity

One module holding the whole block (LlamaMLP, GPT2MLP) is the case n = 1; BERT's
``BertIntermediate`` + ``BertOutput.dense`` is n = 2; ``nn.Sequential(Linear, GELU, Linear)``
is n = 3; BART's ``fc1``, ``activation_fn``, ``fc2`` is n = 3 with an inline dropout of
p = 0 between them, which stays in place (it is the identity in every mode). A module that
also holds a dropout after the block is kept as ``Sequential(MoE, Dropout)``. A module
called at several sites (ALBERT's one layer, run by every layer) is swapped once: one MoE,
shared by every site, as the dense FFN was. A 1x1-convolution FFN becomes
``ChannelsLast(MoE)``.

Blocks whose pieces sit inline in a larger forward (``nn.TransformerEncoderLayer`` calls
``F.relu`` between its two linears) have no module boundary to swap; graph mode then
rewrites the exported graph of the smallest module whose forward runs the whole FFN (that
layer), and swaps the result in for it:

    x → [FFN nodes] → y   ⇒   x → call_module(MoE) → y       (a GraphModule)

Only an FFN inline in the model's own forward makes the whole model a GraphModule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import Node
from torch.utils._pytree import tree_unflatten

from moefy.errors import InputError
from moefy.passes.find_ffn import FFNMatch

aten = torch.ops.aten


@dataclass
class SurgeryPlan:
    name: str
    replace: str  # module path that becomes the MoE
    identities: list[str]  # module paths that become Identity
    dropout: float | None  # trailing dropout inside ``replace`` (kept after the MoE)


@dataclass
class Scope:
    """One call of a module: its path and the call_function nodes it executed."""

    path: str
    nodes: list[Node]


def _stack(node: Node) -> list[tuple[str, str]]:
    """(call key, module path) of every module call enclosing ``node``, outermost first.
    A module called twice has one key per call ("...ffn" and "...ffn@1"), one path."""
    stack = node.meta.get("nn_module_stack") or {}
    return [(key, path) for key, (path, _) in stack.items()]


def module_scopes(graph: torch.fx.Graph) -> dict[str, Scope]:
    """Call key -> the module call's path and the call_function nodes executed inside it.
    Keyed by call, not by path: a module shared by several call sites (ALBERT's one layer)
    holds only its FFN in each call, though all calls together hold several FFN instances."""
    scopes: dict[str, Scope] = {}
    for node in graph.nodes:
        if node.op == "call_function":
            for key, path in _stack(node):
                scopes.setdefault(key, Scope(path, [])).nodes.append(node)
    return scopes


def _is_identity(node: Node) -> bool:
    """A node that returns its input in every mode (train or eval): it may stay where it is,
    outside the swapped modules, and then passes the MoE's output through unchanged.
    Dropout with p > 0 is not one: in training it would drop the MoE's output instead of
    the hidden activation."""
    if node.target in (aten.clone.default, aten.alias.default, aten.detach.default,
                       aten.contiguous.default):
        return True
    if node.target == aten._assert_tensor_metadata.default:
        return True  # a dtype / device check with no output; the MoE's output passes it too
    if node.target == aten.dropout.default:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
        return isinstance(p, (int, float)) and p == 0
    return False


def _trailing_dropout(match: FFNMatch, scope_nodes: list[Node]) -> list[Node]:
    chain, node = [], match.output
    while len(node.users) == 1:
        (user,) = node.users
        if user.target != aten.dropout.default or user not in scope_nodes:
            break
        chain.append(user)
        node = user
    return chain


def _only_ffn(nodes: list[Node], sites: list[FFNMatch]) -> bool:
    """True when a module call's nodes belong to one of ``sites`` (plus its trailing
    dropout inside that call)."""
    for site in sites:
        inside = set(site.nodes)
        extra = [n for n in nodes if n not in inside]
        if not extra or extra == _trailing_dropout(site, nodes):
            return True
    return False


def plan_surgery(match: FFNMatch, graph: torch.fx.Graph, model: nn.Module,
                 scopes: dict[str, Scope] | None = None,
                 sites: list[FFNMatch] | None = None) -> SurgeryPlan | str:
    """How to swap ``match`` into ``model`` by modules, or the reason it cannot be done.

    ``sites``: every match of this same FFN (the same weights) in the graph, ``match``
    included — a module called at several sites is swapped once for all of them, so every
    call of a swapped module must be a call of this FFN."""
    scopes = scopes if scopes is not None else module_scopes(graph)
    sites = sites or [match]
    groups: list[tuple[str, list[Node]]] = []
    for node in match.nodes:
        stack = [(k, p) for k, p in _stack(node) if p]
        # the outermost module call whose nodes all belong to the FFN (+ a trailing dropout)
        best = next((k for k, _ in stack if _only_ffn(scopes[k].nodes, [match])), None)
        if best is None:
            if _is_identity(node):
                continue  # stays in place, between the swapped modules
            owner = stack[-1][1] if stack else "the traced module's own forward"
            return (f"node {node.name} runs inline in {owner}, which also does other work: "
                    "no module boundary to swap")
        if not groups or groups[-1][0] != best:
            groups.append((best, [node]))
        else:
            groups[-1][1].append(node)
    if not groups:
        return "the FFN has no module of its own"
    paths = [scopes[k].path for k, _ in groups]
    if len(set(paths)) != len(paths):
        return "the FFN's modules interleave; no module boundary to swap"
    _, first_nodes = groups[0]
    inside = set(match.nodes)
    module_inputs = {a for n in first_nodes for a in n.all_input_nodes
                     if a not in inside and a.op != "placeholder"
                     and isinstance(a.meta.get("val"), torch.Tensor)}  # not shape symbols
    if module_inputs - {match.input}:
        return f"module {paths[0]} takes inputs besides the FFN input"
    for path in paths:
        calls = [sc for sc in scopes.values() if sc.path == path]
        if not all(_only_ffn(sc.nodes, sites) for sc in calls):
            return f"module {path} is also called for other work than this FFN"
        try:
            model.get_submodule(path)
        except AttributeError:
            return f"module {path} cannot be addressed by its path"
    tail = _trailing_dropout(match, scopes[groups[-1][0]].nodes)
    dropout = float(tail[0].args[1]) if tail and len(paths) == 1 else None
    return SurgeryPlan(match.name or paths[0], paths[0], paths[1:], dropout)


def host_module(match: FFNMatch) -> str:
    """The path of the smallest module whose one call runs every node of ``match`` ("" for
    the top-level forward): the unit graph mode needs to convert."""
    stacks = [_stack(n) for n in match.nodes]
    common: list[tuple[str, str]] = []
    for level in zip(*stacks, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    paths = [p for _, p in common if p]
    return paths[-1] if paths else ""


class ChannelsLast(nn.Module):
    """A 1x1-convolution FFN as an MoE: (B, C, *spatial) ⇒ channels last ⇒ MoE ⇒ back.

    The MoE mixes the last dimension; a convolution's channels are dimension 1."""

    def __init__(self, moe: nn.Module, channels_dim: int = 1):
        super().__init__()
        self.moe = moe
        self.channels_dim = channels_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.moe(x.movedim(self.channels_dim, -1)).movedim(-1, self.channels_dim)


def wrap_for(match: FFNMatch, moe: nn.Module) -> nn.Module:
    """``moe`` as the module that computes ``match``: an FFN whose features are not the last
    dimension (1x1 convolutions: ``channels_dim`` 1) gets them moved last around it."""
    dim = match.channels_dim
    return moe if dim in (-1, None) else ChannelsLast(moe, dim)


def apply_surgery(model: nn.Module, plan: SurgeryPlan, moe: nn.Module) -> None:
    """Swap the modules of ``plan`` in ``model`` (in place), at every path each of them is
    registered at (one module at two paths stays one module, now converted)."""
    old = model.get_submodule(plan.replace)
    replacement = moe if plan.dropout is None else nn.Sequential(moe, nn.Dropout(plan.dropout))
    replacement.train(old.training)
    for path in module_paths(model, plan.replace):
        model.set_submodule(path, replacement)
    for identity in plan.identities:
        for path in module_paths(model, identity):
            model.set_submodule(path, nn.Identity())


def module_paths(model: nn.Module, path: str) -> list[str]:
    """Every path at which the module at ``path`` is registered in ``model`` (``path``
    first): ``model.a is model.b`` is one module at two paths."""
    module = model.get_submodule(path)
    return [path] + [name for name, m in model.named_modules(remove_duplicate=False)
                     if m is module and name != path]


def rewrite_graph(gm: torch.fx.GraphModule, swaps: list[tuple[FFNMatch, nn.Module]]
                  ) -> torch.fx.GraphModule:
    """Graph mode: replace each match's nodes in ``gm`` (``ExportedProgram.module()``, whose
    node names are the exported graph's) by one call of its MoE. Several matches may share
    one MoE (a module called at several sites): it is added once and called at each. Dense
    weights left unused are dropped from ``gm``."""
    nodes = {n.name: n for n in gm.graph.nodes}
    targets: dict[int, str] = {}
    for match, moe in swaps:
        if id(moe) not in targets:
            targets[id(moe)] = f"moefy_ffn_{len(targets)}"
            gm.add_submodule(targets[id(moe)], moe)
        x, out = nodes[match.input.name], nodes[match.output.name]
        with gm.graph.inserting_after(out):
            call = gm.graph.call_module(targets[id(moe)], (x,))
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


# Class-level attributes of a model that a graph-mode result keeps besides the plain data
# in the module's own ``__dict__`` (a Hugging Face config, its generation settings). Methods
# such as ``generate`` are not carried over: they call the model with arguments (caches,
# ``use_cache=True``) that the exported graph, traced without them, cannot take.
KEPT_ATTRIBUTES = ("config", "generation_config", "main_input_name", "name_or_path")
_MODULE_INTERNALS = frozenset(nn.Module().__dict__) | {"forward"}


def keep_attributes(gm: torch.fx.GraphModule, module: nn.Module) -> torch.fx.GraphModule:
    """Copy onto ``gm`` (``module`` converted in graph mode) the plain attributes of
    ``module`` and of each of its submodules that ``gm`` still has: callers read them
    (``nn.TransformerEncoder`` reads ``layers[0].self_attn.batch_first``; Hugging Face code
    reads ``config``). Tensors and modules are not copied: the graph holds what it uses."""
    targets = dict(gm.named_modules())
    for path, sub in module.named_modules():
        target = targets.get(path)
        if target is None:
            continue
        for name, value in vars(sub).items():
            if name in _MODULE_INTERNALS or isinstance(value, (torch.Tensor, nn.Module)):
                continue
            if name not in vars(target) and not hasattr(type(target), name):
                setattr(target, name, value)
    for name in KEPT_ATTRIBUTES:
        value = getattr(module, name, None)
        if value is not None and not isinstance(value, nn.Module) and not hasattr(gm, name):
            setattr(gm, name, value)
    return gm


class TracedCallCheck:
    """Forward pre-hook of a module converted in graph mode: its graph was traced with some
    optional arguments None and drops them whatever they hold later (an attention or padding
    mask would be ignored silently). A call that passes a tensor where the trace had None,
    or None where it had a tensor, raises ``InputError`` instead."""

    def __init__(self, gm: torch.fx.GraphModule):
        spec = gm.graph._codegen.pytree_info.in_spec
        # one placeholder per input leaf, in order; a None input's placeholder holds None
        nones = [n.meta.get("val", _TENSOR) is None for n in gm.graph.nodes
                 if n.op == "placeholder"]
        args, kwargs = (tree_unflatten(nones, spec) if len(nones) == spec.num_leaves
                        else ((), {}))  # unknown layout: nothing to check
        self.args = [bool(a) if isinstance(a, bool) else False for a in args]
        self.kwargs = {k: bool(v) if isinstance(v, bool) else False for k, v in kwargs.items()}

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        wrong = [f"argument {i}" for i, a in enumerate(args)
                 if i < len(self.args) and (a is None) != self.args[i]]
        wrong += [f"{k}=" for k, v in kwargs.items()
                  if (v is None) != self.kwargs.get(k, True)]
        if wrong:
            raise InputError(
                f"this module was converted in graph mode from a call where "
                f"{', '.join(wrong)} {'was' if len(wrong) == 1 else 'were'} "
                f"{'None' if all(self._none_when_traced(w) for w in wrong) else 'set'}; its "
                "graph cannot take the other case (it would ignore the value). Convert with "
                "example_inputs that pass the same optional inputs as your calls.")

    def _none_when_traced(self, what: str) -> bool:
        if what.startswith("argument "):
            return self.args[int(what.split()[1])]
        return self.kwargs.get(what[:-1], True)


_TENSOR = object()  # a placeholder without a recorded value: not a None input
