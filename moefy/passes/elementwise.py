"""The element-wise part of an FFN, and which activation it computes.

    Proj_up → ε(h) → Proj_down  ⇒  ElementwiseRegion(nodes of ε, leaves=[Proj_up's output])
    Proj_gate_up → chunk / split / slice → two halves  ⇒  two leaves of one projection
    ε(g, u) = act(g) · u  ⇒  (act's factor, gate leaf, up leaf)
    ε  ⇒  a name in ``moefy.activations.ACTIVATIONS``, or the subgraph h ↦ act(h) itself

``ε`` is any element-wise subgraph: ATen ops tagged pointwise (and their in-place variants),
with scalar constants as their only other inputs; dropout, clones and dtype casts count as
identities. It is identified numerically, not by its spelling: evaluated on a probe and
compared with every entry of ``moefy.activations.ACTIVATIONS``. A match takes that name (fast
kernels and ONNX lowerings exist for names); when none matches, ``activation="custom"`` and
``activation_fn`` is the subgraph itself as a ``GraphModule`` h ↦ act(h), run by the experts.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import Node

from moefy.activations import ACTIVATIONS
from moefy.passes.projection import (
    AFFINE_VIEWS,
    MAX_REGION,
    ExportedGraph,
    Projection,
    as_projection,
)

aten = torch.ops.aten

# Identities for what the experts compute: no dropout at inference, and the experts run in
# their own dtype (a cast inside the activation only changes the precision it is computed in).
PASS_THROUGH = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                aten.feature_alpha_dropout.default, aten.clone.default, aten.alias.default,
                aten.detach.default, aten.detach_.default, aten.contiguous.default,
                aten.lift_fresh_copy.default,
                aten._to_copy.default, aten.to.dtype, aten.type_as.default}
# Element-wise ops that ATen does not tag pointwise.
_ELEMENTWISE = {aten.hardswish.default, aten.where.ScalarOther, aten.where.ScalarSelf,
                aten.where.Scalar, aten.rsub.Tensor, aten.zeros_like.default,
                aten.ones_like.default, aten.full_like.default}
# Where activations are compared: a dense grid over their interesting range, the origin's
# neighbourhood, and large values (relu vs leaky relu, clamps).
_PROBE = torch.cat([
    torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64),
    torch.tensor([1e-7, 1e-4, 20.0, 50.0, 100.0, 1e3, 1e6], dtype=torch.float64),
    -torch.tensor([1e-7, 1e-4, 20.0, 50.0, 100.0, 1e3, 1e6], dtype=torch.float64),
])
_TOL = 1e-6  # relative and absolute, in float64


def strip_identities(node) -> tuple[Node, list[Node]]:
    """Walk back through dropout / clone / alias; return the first real node and the skipped."""
    skipped = []
    while isinstance(node, Node) and node.op == "call_function" and node.target in PASS_THROUGH:
        skipped.append(node)
        node = node.args[0]
    return node, skipped


def _functional(target):
    """The out-of-place op of an in-place ATen op (``relu_`` → ``relu``), else ``target``."""
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
        if name.endswith("_") and not name.endswith("__"):
            packet = getattr(aten, name[:-1], None)
            if packet is not None and target._overloadname in packet.overloads():
                return getattr(packet, target._overloadname)
    return target


def is_elementwise(target) -> bool:
    op = _functional(target)
    if not isinstance(op, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in op.tags:  # rrelu while training: random
        return False
    return torch.Tag.pointwise in op.tags or op in _ELEMENTWISE


def _inputs(node: Node) -> list[Node]:
    if node.target in PASS_THROUGH:  # type_as(x, other) reads only other's dtype
        return [node.args[0]] if isinstance(node.args[0], Node) else []
    return node.all_input_nodes


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


def projection_half(node, g: ExportedGraph) -> tuple[Projection, int, Node | None] | None:
    part = _fused_part(node)
    if part is None:
        return None
    proj = as_projection(part[0], g)
    return None if proj is None else (proj, part[1], part[2])


@dataclass
class ElementwiseRegion:
    """The element-wise subgraph feeding the second projection."""

    nodes: set[Node]
    leaves: list[Node]  # projection outputs (or halves of one) it reads, graph order
    constants: dict[Node, torch.Tensor]  # one-element lifted tensor constants it reads


def elementwise_region(root: Node, g: ExportedGraph) -> ElementwiseRegion | str:
    """Everything element-wise between ``root`` and the projections it reads, or why not."""
    nodes: set[Node] = set()
    leaves: set[Node] = set()
    constants: dict[Node, torch.Tensor] = {}
    stack = [root]
    while stack:
        n = stack.pop()
        if n in nodes or n in leaves or n in constants:
            continue
        if as_projection(n, g) is not None or projection_half(n, g):
            leaves.add(n)
            continue
        if n.op == "placeholder":
            value = g.constants.get(n.name)
            if value is not None and value.numel() == 1:
                constants[n] = value
                continue
            what = (f"parameter {g.params[n.name]}" if n.name in g.params
                    else f"buffer {g.buffers[n.name]}" if n.name in g.buffers
                    else f"{n.name}, an input of the graph")
            return (f"its input is not an activation of a projection: it reads {what} (an "
                    "activation may read only its projections and scalar constants)")
        if n.op != "call_function" or not (n.target in PASS_THROUGH
                                           or is_elementwise(n.target)):
            bn = _batch_statistics_norm(n)
            if bn is not None:
                return (f"{bn.name} is a BatchNorm that normalises with the batch's statistics "
                        "(training mode, or no running statistics): not a fixed affine map to "
                        "fold into the projection; convert the model in eval mode "
                        "(model.eval())")
            what = n.target if n.op == "call_function" else n.op
            return (f"its input is not an activation of a projection: {n.name} ({what}) is "
                    "neither element-wise nor a projection of a parameter")
        nodes.add(n)
        if len(nodes) > MAX_REGION:
            return f"more than {MAX_REGION} element-wise ops before it: not an activation"
        stack.extend(_inputs(n))
    return ElementwiseRegion(nodes, sorted(leaves, key=g.order.__getitem__), constants)


def _batch_statistics_norm(node: Node) -> Node | None:
    """The BatchNorm at ``node`` or behind the views before it, if it uses batch statistics."""
    while isinstance(node, Node) and node.target in AFFINE_VIEWS:
        node = node.args[0]
    if isinstance(node, Node) and node.target == aten.batch_norm.default and (
            node.args[5] or None in node.args[3:5]):
        return node
    return None


def _ancestors(node: Node, region: ElementwiseRegion) -> tuple[set[Node], set[Node]]:
    """(region nodes, leaves) that ``node`` depends on."""
    seen, leaves, stack = set(), set(), [node]
    while stack:
        n = stack.pop()
        if n in region.leaves:
            leaves.add(n)
        elif n in region.nodes and n not in seen:
            seen.add(n)
            stack.extend(_inputs(n))
    return seen, leaves


def activation_subgraph(out: Node, leaf: Node, region: ElementwiseRegion, g: ExportedGraph
                        ) -> torch.fx.GraphModule:
    """The element-wise function leaf ↦ out as a standalone GraphModule h ↦ act(h)."""
    nodes, _ = _ancestors(out, region)
    graph = torch.fx.Graph()
    env: dict[Node, Node] = {leaf: graph.placeholder("h")}
    for node, value in region.constants.items():
        # A value in the graph, not a buffer: a MoE built on the meta device and moved with
        # to_empty() would drop a buffer's contents. 0-dim CPU tensors mix with any device.
        env[node] = graph.call_function(aten.scalar_tensor.default, (value.item(),),
                                        {"dtype": value.dtype})
    for n in sorted(nodes, key=g.order.__getitem__):
        if n.target in PASS_THROUGH:
            env[n] = env[n.args[0]]
            continue
        kwargs = dict(n.kwargs)
        if n.target in (aten.zeros_like.default, aten.ones_like.default, aten.full_like.default):
            kwargs.pop("device", None)  # follow the input's device, not the traced one
        env[n] = graph.call_function(_functional(n.target),
                                     torch.fx.map_arg(n.args, env.__getitem__),
                                     torch.fx.map_arg(kwargs, env.__getitem__))
    graph.output(env[out])
    graph.eliminate_dead_code()  # constants of the region that this part does not read
    return torch.fx.GraphModule(nn.Module(), graph, class_name="ElementwiseActivation")


def identify_activation(fn) -> str | None:
    """The name in ``ACTIVATIONS`` of the element-wise function ``fn``, compared numerically
    on a probe (float64, tolerance 1e-6 relative and absolute), or None.

    >>> identify_activation(lambda h: h * torch.sigmoid(h))
    'silu'
    """
    with torch.no_grad():
        y = fn(_PROBE.clone())
        for name, act in ACTIVATIONS.items():
            if torch.allclose(y, act.fn(_PROBE), rtol=_TOL, atol=_TOL, equal_nan=True):
                return name
    return None


def is_affine(fn) -> bool:
    with torch.no_grad():
        y0, y1 = fn(torch.zeros(1, dtype=torch.float64)), fn(torch.ones(1, dtype=torch.float64))
        y = fn(_PROBE.clone())
    return bool(torch.allclose(y, (y1 - y0) * _PROBE + y0, rtol=_TOL, atol=_TOL))


def activation_problem(fn: torch.fx.GraphModule) -> str | None:
    """Why ``fn`` cannot serve as an activation (None when it can)."""
    try:
        with torch.no_grad():
            y = fn(_PROBE.clone())
    except (RuntimeError, TypeError, ValueError) as exc:  # reported as the rejection reason
        return f"its element-wise part does not evaluate on its own: {type(exc).__name__}: {exc}"
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape or not y.is_floating_point():
        return "its element-wise part does not map a tensor to one of the same shape"
    return None


def gated_factors(root: Node, region: ElementwiseRegion) -> tuple[Node, Node, Node] | str:
    """(gate factor, gate leaf, up leaf) of ``act(g) * u``, or why it is not that."""
    if root.target != aten.mul.Tensor or not all(isinstance(a, Node) for a in root.args[:2]):
        return (f"it reads two projections, but combines them with {root.target}, not as "
                "act(gate) * up")
    a, b = root.args[:2]
    for act_factor, up_factor in ((a, b), (b, a)):
        up_leaf, _ = strip_identities(up_factor)
        _, act_leaves = _ancestors(act_factor, region)
        if up_leaf in region.leaves and len(act_leaves) == 1 and up_leaf not in act_leaves:
            return act_factor, next(iter(act_leaves)), up_leaf
    return "it reads two projections, but not as act(gate) * up with a bare up factor"
