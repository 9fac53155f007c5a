"""FFN matching over an exported graph.

    x → Proj → act → [dropout] → Proj                       (plain FFN)
    x → Proj_gate → act ─┐
    x → Proj_up ─────────┴→ mul → [dropout] → Proj          (gated: SwiGLU, GeGLU)
    x → Proj_gate_up → chunk/split → act(first) * second → Proj   (fused gate_up)

  ⇒ one ``FFNMatch`` per block: its nodes, activation, and parameter names.

``Proj`` is ``aten.linear`` on a parameter or GPT-2's Conv1D (``view → addmm → view`` with an
``(in, out)`` weight). Activations: relu, gelu (erf), gelu_tanh (``aten.gelu`` or the arithmetic
``0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`` expansion), silu, squared relu, quick-gelu.
The match is by graph structure, not module class names. Every projection is a candidate
second layer; each rejected candidate keeps the reason.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import Node

aten = torch.ops.aten

_PASS_THROUGH = {aten.dropout.default, aten.clone.default, aten.alias.default,
                 aten.detach.default, aten.contiguous.default}


@dataclass
class Projection:
    """A linear map of ``input`` by a parameter: ``output = input @ W^T + b``."""

    input: Node
    output: Node
    nodes: list[Node]
    weight: str  # parameter name
    bias: str | None
    transposed: bool  # weight stored (in, out), as GPT-2's Conv1D


@dataclass
class FFNMatch:
    """One feed-forward block found in the graph."""

    name: str  # longest common module path of its projections
    input: Node
    output: Node  # the second projection's output
    nodes: list[Node]  # every node of the block after ``input``, graph order
    activation: str
    up: Projection  # the "in" projection (up_proj / fc1 / intermediate.dense)
    down: Projection
    gate: Projection | None = None
    # fused gate_up: the single projection's output rows are [gate; up] (True) or [up; gate]
    fused_gate_first: bool | None = None
    skipped: list[Node] = field(default_factory=list)  # pass-through nodes before ``down``


@dataclass
class Rejection:
    node: str
    reason: str


def _param_name(node, params: dict[str, str]) -> str | None:
    if isinstance(node, Node) and node.op == "placeholder":
        return params.get(node.name)
    return None


def as_projection(node: Node, params: dict[str, str]) -> Projection | None:
    """The projection whose output is ``node``, if it is one."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    if node.target == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        w_name = _param_name(w, params)
        if w_name is None:
            return None
        return Projection(x, node, [node], w_name, _param_name(b, params), False)
    inner, outer = node, None
    if node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
        inner, outer = node.args[0], node
    if isinstance(inner, Node) and inner.target == aten.addmm.default:
        if outer is None and len(inner.users) == 1 and next(iter(inner.users)).target in (
                aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            return None  # the view after it stands for the whole projection
        b, x2, w = inner.args[:3]
        w_name = _param_name(w, params)
        if w_name is None:
            return None
        nodes = [inner] + ([outer] if outer is not None else [])
        x = x2
        if isinstance(x2, Node) and x2.target in (aten.view.default, aten.reshape.default):
            x, nodes = x2.args[0], [x2] + nodes
        return Projection(x, outer or inner, nodes, w_name, _param_name(b, params), True)
    return None


def _strip(node) -> tuple[Node, list[Node]]:
    """Walk back through dropout / clone / alias; return the first real node and the skipped."""
    skipped = []
    while isinstance(node, Node) and node.op == "call_function" and node.target in _PASS_THROUGH:
        skipped.append(node)
        node = node.args[0]
    return node, skipped


def _const(v, target: float, rel: float = 1e-4) -> bool:
    return isinstance(v, (int, float)) and math.isclose(float(v), target, rel_tol=rel)


def _with_const(node, op, constant: float) -> Node | None:
    """``x`` when ``node`` is ``op(x, constant)`` or ``op(constant, x)``, else None."""
    if isinstance(node, Node) and node.target == op:
        a, b = node.args[:2]
        if isinstance(a, Node) and _const(b, constant):
            return a
        if isinstance(b, Node) and _const(a, constant):
            return b
    return None


def _mul_by(node, constant: float) -> Node | None:
    """``x`` when ``node`` is ``x * constant`` (either order) or ``x / (1 / constant)``."""
    x = _with_const(node, aten.mul.Tensor, constant)
    if x is None and constant != 0 and isinstance(node, Node) and (
            node.target == aten.div.Tensor and isinstance(node.args[0], Node)
            and _const(node.args[1], 1.0 / constant)):
        x = node.args[0]
    return x


def _add_const(node, constant: float) -> Node | None:
    return _with_const(node, aten.add.Tensor, constant)


def _cube_of(node) -> Node | None:
    if isinstance(node, Node) and node.target == aten.pow.Tensor_Scalar and _const(
            node.args[1], 3.0):
        return node.args[0]
    return None


def _arithmetic_gelu(node: Node) -> tuple[str, Node, list[Node]] | None:
    """``0.5·x·(1 + tanh(c·(x + 0.044715·x³)))`` or ``0.5·x·(1 + erf(x/√2))``."""
    if node.target != aten.mul.Tensor or not all(isinstance(a, Node) for a in node.args[:2]):
        return None
    for half, rest in (node.args[:2], node.args[1::-1]):
        x = _mul_by(half, 0.5)
        inner = _add_const(rest, 1.0)
        if x is None or inner is None:
            continue
        if inner.target == aten.tanh.default:
            arg = _mul_by(inner.args[0], math.sqrt(2 / math.pi))
            if arg is None or arg.target != aten.add.Tensor:
                continue
            a, b = arg.args[:2]
            for lin, cubic in ((a, b), (b, a)):
                if lin is x and _cube_of(_mul_by(cubic, 0.044715)) is x:
                    nodes = [half, cubic, cubic.args[0], arg, inner.args[0], inner, rest, node]
                    return "gelu_tanh", x, nodes
        if inner.target == aten.erf.default and _mul_by(inner.args[0], 1 / math.sqrt(2)) is x:
            return "gelu", x, [half, inner.args[0], inner, rest, node]
    return None


def match_activation(node) -> tuple[str, Node, list[Node]] | None:
    """(activation name, its input, its nodes) when ``node`` computes a known activation."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t = node.target
    if t == aten.gelu.default:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return ("gelu_tanh" if approx == "tanh" else "gelu"), node.args[0], [node]
    if t == aten.relu.default:
        return "relu", node.args[0], [node]
    if t == aten.silu.default:
        return "silu", node.args[0], [node]
    squared = None
    if t == aten.pow.Tensor_Scalar and _const(node.args[1], 2.0):
        squared = node.args[0]
    elif t == aten.square.default:
        squared = node.args[0]
    elif t == aten.mul.Tensor and node.args[0] is node.args[1]:
        squared = node.args[0]
    if isinstance(squared, Node) and squared.target == aten.relu.default:
        return "squared_relu", squared.args[0], [squared, node]
    if t == aten.mul.Tensor and all(isinstance(a, Node) for a in node.args[:2]):
        for x, sig in (node.args[:2], node.args[1::-1]):
            if sig.target == aten.sigmoid.default and _mul_by(sig.args[0], 1.702) is x:
                return "quick_gelu", x, [sig.args[0], sig, node]
    return _arithmetic_gelu(node)


def _last_dim_half(src: Node, dim) -> int | None:
    """Half the size of ``src``'s last dimension when ``dim`` names that dimension."""
    val = src.meta.get("val") if isinstance(src, Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(dim, int):
        return None
    if dim not in (-1, val.dim() - 1):
        return None
    size = val.shape[-1]
    return size // 2 if isinstance(size, int) and size % 2 == 0 else None


def _fused_part(node) -> tuple[Node, int, Node | None] | None:
    """(source, half index, splitter) when ``node`` is one of two equal halves of its source's
    last dimension (chunk / split / slice)."""
    if not isinstance(node, Node):
        return None
    if node.target is operator.getitem:
        split, index = node.args
        if not isinstance(split, Node) or split.target not in (
                aten.chunk.default, aten.split.Tensor, aten.split_with_sizes.default):
            return None
        src = split.args[0]
        dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
        half = _last_dim_half(src, dim)
        if half is None:
            return None
        sizes = split.args[1]
        if split.target == aten.chunk.default and sizes != 2:
            return None
        if split.target == aten.split.Tensor and sizes != half:
            return None
        if split.target == aten.split_with_sizes.default and list(sizes) != [half, half]:
            return None
        return src, index, split
    if node.target == aten.slice.Tensor:
        src, dim = node.args[0], node.args[1]
        start = node.args[2] if len(node.args) > 2 else None
        end = node.args[3] if len(node.args) > 3 else None
        step = node.args[4] if len(node.args) > 4 else 1
        half = _last_dim_half(src, dim)
        if half is None or step != 1:
            return None
        if start in (0, None) and end == half:
            return src, 0, None
        if start == half and (end is None or end >= 2 * half):
            return src, 1, None
    return None


def _match_at(down: Projection, params: dict[str, str]) -> FFNMatch | Rejection:
    h, skipped = _strip(down.input)
    act = match_activation(h)
    gate = fused_first = None
    if act is not None:
        name, pre, act_nodes = act
        up = as_projection(pre, params)
        if up is None:
            return Rejection(down.output.name,
                             f"the activation's input {pre} is not a projection of a parameter")
        hidden_nodes = up.nodes + act_nodes
    elif isinstance(h, Node) and h.target == aten.mul.Tensor and all(
            isinstance(a, Node) for a in h.args[:2]):
        found = None
        for a, b in (h.args[:2], h.args[1::-1]):
            act = match_activation(a)
            if act is not None:
                found = (act, b)
                break
        if found is None:
            return Rejection(down.output.name, "its input is a product but neither factor is "
                             "a known activation")
        (name, pre, act_nodes), other = found
        gate, up = as_projection(pre, params), as_projection(other, params)
        if gate is not None and up is not None:
            if gate.input is not up.input:
                return Rejection(down.output.name,
                                 "gate and up projections read different inputs")
            hidden_nodes = gate.nodes + up.nodes + act_nodes + [h]
        else:
            g_part, u_part = _fused_part(pre), _fused_part(other)
            if g_part is None or u_part is None or g_part[0] is not u_part[0]:
                return Rejection(down.output.name, "gated product whose factors are not "
                                 "projections (or halves of one projection)")
            fused = as_projection(g_part[0], params)
            if fused is None or g_part[1] == u_part[1]:
                return Rejection(down.output.name,
                                 "gated product of a split that is not a projection")
            up, gate, fused_first = fused, None, g_part[1] == 0
            splitters = [n for n in (g_part[2], u_part[2]) if n is not None]
            hidden_nodes = (fused.nodes + list(dict.fromkeys(splitters)) + [pre, other]
                            + act_nodes + [h])
    else:
        what = h.target if isinstance(h, Node) and h.op == "call_function" else h
        return Rejection(down.output.name,
                         f"its input ({what}) is not an activation of a projection")

    nodes = list(dict.fromkeys(hidden_nodes + skipped + down.nodes))
    inside = set(nodes)
    for n in nodes:
        if n is down.output:
            continue
        outside = [u for u in n.users if u not in inside]
        if outside:
            return Rejection(down.output.name, f"hidden value {n.name} is also used by "
                             f"{', '.join(u.name for u in outside)} outside the FFN")
    weights = [p.weight for p in (up, gate, down) if p is not None]
    return FFNMatch(name=_common_module(weights), input=up.input, output=down.output,
                    nodes=nodes, activation=name, up=up, down=down, gate=gate,
                    fused_gate_first=fused_first, skipped=skipped)


def _common_module(param_names: list[str]) -> str:
    parts = [p.split(".")[:-2] for p in param_names]  # drop "<proj>.weight"
    common = []
    for level in zip(*parts, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def find_ffns(ep: torch.export.ExportedProgram) -> tuple[list[FFNMatch], list[Rejection]]:
    """All FFN blocks of an exported program in graph order, and every rejected candidate."""
    params = dict(ep.graph_signature.inputs_to_parameters)
    matches, rejections, claimed = [], [], set()
    for node in ep.graph.nodes:
        down = as_projection(node, params)
        if down is None or node in claimed:
            continue
        if any(n in claimed for n in down.nodes):
            continue
        result = _match_at(down, params)
        if isinstance(result, Rejection):
            rejections.append(result)
        else:
            matches.append(result)
            claimed.update(result.nodes)
    claimed_names = {n.name for n in claimed}
    return matches, [r for r in rejections if r.node not in claimed_names]
