"""FFN matching over an exported graph: what the graph computes, not how it is spelled.

    x → Proj_up → ε(h) → Proj_down                                   (plain: ε = act)
    x → Proj_gate ─┐
    x → Proj_up ───┴→ ε(g, u) = act(g) · u → Proj_down               (gated: SwiGLU, GeGLU)
    x → Proj_gate_up → two halves (chunk / split / slice) → ε → Proj_down     (fused gate_up)

    x → Proj_up → ε → Norm over the hidden width → Proj_down         (sub-LN, EVA-02: upcycle only)

  ⇒ one ``FFNMatch`` per block: its nodes, activation (a name, or the subgraph), parameters.

Not token FFNs, each rejected with its reason: a block whose input does not depend on the model's
inputs (Swin V2's position-bias MLP over a fixed table) or is pooled over the tokens (a
squeeze-excitation gate); one with a token-mixing convolution between its projections
(SegFormer's Mix-FFN). A block whose output width differs from its input (H → F → O: the last
block of a tabular MLP, a classifier head) is an FFN like any other (a MoE with
``output_size``), except for method="peer", whose layer maps H → H: rejected with that reason.

What counts as ``Proj`` (and the affine maps folded into it) is ``moefy.passes.projection``;
how ``ε`` is delimited and identified is ``moefy.passes.elementwise``.

Every projection is a candidate second layer, taken in graph order; each rejected candidate
keeps its reason. A projection belongs to one FFN at most, and a weight plays one role.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.fx import Node

from moefy.activations import ACTIVATIONS
from moefy.passes.elementwise import (
    PASS_THROUGH,
    activation_problem,
    activation_subgraph,
    elementwise_region,
    gated_factors,
    identify_activation,
    is_affine,
    is_elementwise,
    projection_half,
    strip_identities,
)
from moefy.passes.projection import (
    AFFINE_VIEWS,
    CONVS,
    MAX_REGION,
    TRANSPOSES,
    ExportedGraph,
    Projection,
    as_projection,
    param_name,
    shape_of,
)

aten = torch.ops.aten

_ASSERTS = {aten._assert_tensor_metadata.default}
# Ops that only move a tensor's elements around (a token-mixing convolution hides behind them).
_LAYOUT = AFFINE_VIEWS | TRANSPOSES | {aten.transpose.int, aten.permute.default,
                                       aten.squeeze.dim, aten.squeeze.dims,
                                       aten.squeeze.default, aten.unsqueeze.default}
# Reductions over tokens / positions: a block reading one is fed one vector per sample.
_POOLS = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.max.dim,
          aten.adaptive_avg_pool1d.default, aten.adaptive_avg_pool2d.default,
          aten.adaptive_avg_pool3d.default, aten._adaptive_avg_pool2d.default,
          aten.adaptive_max_pool1d.default, aten.adaptive_max_pool2d.default,
          aten.avg_pool1d.default, aten.avg_pool2d.default, aten.avg_pool3d.default,
          aten.max_pool1d.default, aten.max_pool2d.default, aten.max_pool3d.default}
_NORMS = {aten.layer_norm.default: "layer_norm", aten.rms_norm.default: "rms_norm"}


@dataclass
class HiddenNorm:
    """A normalisation over the FFN's whole hidden width between ``ε`` and the second
    projection (EVA-02's sub-LN SwiGLU: ``down(norm(silu(gate(x)) * up(x)))``). It reads every
    neuron of the hidden at once, so the neurons cannot be split into experts; a whole copy
    of the FFN per expert (upcycling, granularity 1) computes it exactly."""

    kind: str  # "layer_norm" | "rms_norm"
    input: Node  # ε's output
    nodes: list[Node]  # the norm and the identities between it and the second projection
    weight: str | None  # parameter names
    bias: str | None
    eps: float | None  # None: rms_norm's default (the dtype's machine epsilon)

    def hidden_fn(self, activation: str | nn.Module, gated: bool, width: int) -> NormedHidden:
        """What each expert runs between its projections: ε, then this norm over its
        ``width`` hidden features (``NormedHidden``)."""
        return NormedHidden(activation, gated, width, self.kind, self.eps)


class NormedHidden(nn.Module):
    """An FFN's hidden function with a normalisation over its hidden width, as the element-
    wise activation slot of a plain (ungated) MoE expects it: rows of ``width`` features,
    one expert's hidden (the layer may pass several experts' side by side), each

        plain:  h       ↦  norm(act(h))                  (I = width)
        gated:  [g; u]  ↦  [norm(act(g) · u); 0]          (I = 2 · width: w_in = [W_gate; W_up],
                                                          w_out = [W_down, 0])

    The norm's weight and bias are folded into the second projection, so this module holds no
    tensors (a MoE built on the meta device keeps nothing it would lose). A layer runs it on
    its generic paths, as any custom activation."""

    def __init__(self, activation: str | nn.Module, gated: bool, width: int, kind: str,
                 eps: float | None):
        super().__init__()
        self.activation = activation if isinstance(activation, str) else "custom"
        self.activation_fn = activation if isinstance(activation, nn.Module) else None
        self.gated, self.width, self.kind, self.eps = gated, width, kind, eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        act = self.activation_fn or ACTIVATIONS[self.activation].fn
        size = 2 * self.width if self.gated else self.width
        rows = h.unflatten(-1, (-1, size))  # (..., experts side by side, size)
        if self.gated:
            g, u = rows.chunk(2, dim=-1)
            z = act(g) * u
        else:
            z = act(rows)
        if self.kind == "layer_norm":
            z = torch.nn.functional.layer_norm(z, (self.width,), eps=self.eps)
        else:
            z = torch.nn.functional.rms_norm(z, (self.width,), eps=self.eps)
        if self.gated:
            z = torch.cat([z, torch.zeros_like(z)], dim=-1)
        return z.flatten(-2)

    def extra_repr(self) -> str:
        return (f"{self.kind}({self.width}) after {self.activation}"
                f"{', gated' if self.gated else ''}")


@dataclass
class FFNMatch:
    """One feed-forward block found in the graph."""

    name: str  # longest common module path of its projections
    input: Node
    output: Node  # the second projection's output
    nodes: list[Node]  # every node of the block after ``input``, graph order
    activation: str  # a name in moefy.activations.ACTIVATIONS, or "custom"
    up: Projection  # the "in" projection (up_proj / fc1 / intermediate.dense)
    down: Projection
    gate: Projection | None = None
    # fused gate_up: the single projection's output rows are [gate; up] (True) or [up; gate]
    fused_gate_first: bool | None = None
    # The dim of input and output holding the features: -1 (tokens × features), or 1 for
    # channels-first 1×1 convolutions (the MoE then needs its input moved to the last dim).
    channels_dim: int = -1
    # activation == "custom": the element-wise subgraph h ↦ act(h) the experts run.
    activation_fn: torch.fx.GraphModule | None = None
    hidden_norm: HiddenNorm | None = None  # a norm between ε and the second projection

    @property
    def widths(self) -> tuple[int, int] | None:
        """(input, output) width, H and O (O != H: a block that changes the width, such as a
        classifier head); None where the graph does not say."""
        if self.up.shape is None or self.down.shape is None:
            return None
        return self.up.shape[1], self.down.shape[0]


@dataclass
class Rejection:
    node: str
    reason: str


def _match_at(down: Projection, g: ExportedGraph, claimed: dict[Node, FFNMatch]
              ) -> FFNMatch | Rejection:
    reject = lambda why: Rejection(down.output.name, why)  # noqa: E731
    norm = _hidden_norm(down, g)
    if isinstance(norm, str):
        return reject(norm)
    end = down.input if norm is None else norm.input  # ε's output
    region = elementwise_region(end, g)
    if isinstance(region, str):
        return reject(_token_mixer(down, g) or region)
    gate = fused_first = None
    extra: list[Node] = []  # splitters and halves of a fused gate_up
    if len(region.leaves) == 1:
        (leaf,) = region.leaves
        up = as_projection(leaf, g)
        if up is None:
            return reject("it reads only one half of a projection")
        if all(n.target in PASS_THROUGH for n in region.nodes):
            return reject(f"no activation between projections {up.weight} and {down.weight}")
        fn = activation_subgraph(end, leaf, region, g)
        why = activation_problem(fn)
        if why is None and is_affine(fn):
            why = (f"the element-wise part between {up.weight} and {down.weight} is affine: "
                   "no activation (a factored linear map, not an FFN)")
    elif len(region.leaves) == 2:
        factors = gated_factors(strip_identities(end)[0], region)
        if isinstance(factors, str):
            return reject(factors)
        act_factor, g_leaf, u_leaf = factors
        gate, up = as_projection(g_leaf, g), as_projection(u_leaf, g)
        if gate is None or up is None:
            g_half, u_half = projection_half(g_leaf, g), projection_half(u_leaf, g)
            if g_half is None or u_half is None or g_half[0].output is not u_half[0].output:
                return reject("gated product whose factors are not projections (or halves "
                              "of one projection)")
            if g_half[1] == u_half[1]:
                return reject("gated product of one half of a projection with itself")
            up, gate, fused_first = g_half[0], None, g_half[1] == 0
            extra = [n for n in (g_half[2], u_half[2]) if n is not None] + [g_leaf, u_leaf]
        elif gate.input is not up.input:
            return reject("gate and up projections read different inputs")
        fn = activation_subgraph(act_factor, g_leaf, region, g)
        why = activation_problem(fn)
    else:
        return reject(f"its element-wise input reads {len(region.leaves)} projections "
                      "(an FFN reads one, or two when gated)")
    if why is not None:
        return reject(why)
    why = _input_problem(up.input, g)
    if why is not None:
        return reject(why)
    projections = [p for p in (up, gate, down) if p is not None]
    for p in projections:
        other = next((claimed[n] for n in p.nodes if n in claimed), None)
        if other is not None:
            return reject(f"shares projection {p.weight} with FFN "
                          f"{other.name or other.output.name}")
    if len({p.channels_dim for p in projections}) != 1:
        return reject("it mixes 1×1 convolutions with matmuls")
    why = _width_problem(up, gate, down, fused_first is not None)
    if why is not None:
        return reject(why)

    hidden = set(n for p in (up, gate) if p is not None for n in p.nodes)
    hidden |= set(extra) | region.nodes | set(down.nodes)
    hidden |= set(norm.nodes) if norm is not None else set()
    # dtype casts leave metadata asserts behind: they check FFN values and go with them
    hidden |= {u for n in hidden for u in n.users if u.target in _ASSERTS}
    nodes = sorted(hidden, key=g.order.__getitem__)
    inside = set(nodes)
    for n in nodes:
        if n is down.output:
            continue
        outside = [u for u in n.users if u not in inside]
        if outside:
            return reject(f"hidden value {n.name} is also used by "
                          f"{', '.join(u.name for u in outside)} outside the FFN")
    name = identify_activation(fn)
    return FFNMatch(name=_common_module([p.weight for p in projections]), input=up.input,
                    output=down.output, nodes=nodes, activation=name or "custom", up=up,
                    down=down, gate=gate, fused_gate_first=fused_first,
                    channels_dim=down.channels_dim,
                    activation_fn=fn if name is None else None, hidden_norm=norm)


def _width_problem(up: Projection, gate: Projection | None, down: Projection,
                   fused: bool) -> str | None:
    """Why the MoE (H → F → O) cannot hold these projections, or None."""
    if up.shape is None or down.shape is None:
        return None
    f = up.shape[0] // 2 if fused else up.shape[0]
    if gate is not None and gate.shape != up.shape:
        return f"gate {gate.shape} and up {up.shape} projections differ in shape"
    if down.shape[1] != f:
        return f"the second projection reads {down.shape[1]} features but the first gives {f}"
    return None


def _hidden_norm(down: Projection, g: ExportedGraph) -> HiddenNorm | str | None:
    """The normalisation over the whole hidden width that ``down`` reads, if it reads one
    (EVA-02's sub-LN); why it cannot be taken as one, or None when there is none."""
    node, skipped = strip_identities(down.input)
    if not isinstance(node, Node) or node.target not in _NORMS or down.channels_dim != -1:
        return None
    kind = _NORMS[node.target]
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    if kind == "rms_norm":
        names = ("input", "normalized_shape", "weight", "eps")
    bound = dict(zip(names, node.args, strict=False)) | dict(node.kwargs)
    x, width = bound["input"], shape_of(bound["input"])
    if not width or list(bound["normalized_shape"]) != [width[-1]]:
        return None  # not over the hidden width alone: an ordinary non-element-wise op
    weight, bias = bound.get("weight"), bound.get("bias")
    params = [param_name(t, g.params) for t in (weight, bias)]
    if any(t is not None and p is None for t, p in zip((weight, bias), params, strict=True)):
        return (f"the {kind.replace('_', ' ')} {node.name} before it has a computed weight "
                "or bias (a normalisation over the hidden width takes parameters)")
    eps = bound.get("eps", 1e-5 if kind == "layer_norm" else None)
    return HiddenNorm(kind, x, skipped + [node], *params, eps)


def _token_mixer(down: Projection, g: ExportedGraph) -> str | None:
    """Why the block before ``down`` is a Mix-FFN: a convolution that mixes neighbouring
    tokens (a kernel over positions, or a stride) between a projection and ``down``, seen
    through element-wise ops, layout changes and BatchNorms (EfficientNet's conv → BN → act),
    not through a LayerNorm (which starts a block). None when there is none."""
    stack: list[tuple[Node, Node | None]] = [(down.input, None)]  # (node, mixing conv seen)
    seen: set[tuple[Node, Node | None]] = set()
    while stack and len(seen) < 4 * MAX_REGION:
        n, mixer = stack.pop()
        if not isinstance(n, Node) or n.op != "call_function" or (n, mixer) in seen:
            continue
        seen.add((n, mixer))
        first = as_projection(n, g)
        if first is not None:
            if mixer is None:
                continue
            return (f"a token-mixing convolution between the projections ({_describe_conv(mixer)}"
                    f" after {first.weight}, before {down.weight}) mixes each token with its "
                    "neighbours (a Mix-FFN, as in SegFormer): projection → convolution → act → "
                    "projection cannot become per-token experts")
        if n.target in CONVS:
            if _mixes_tokens(n):
                stack.append((n.args[0], n))
            continue
        if (n.target in PASS_THROUGH or n.target in _LAYOUT or is_elementwise(n.target)
                or n.target == aten.batch_norm.default):
            stack.extend((a, mixer) for a in n.all_input_nodes)
    return None


def _mixes_tokens(conv: Node) -> bool:
    """A convolution whose output at a position reads other positions (or skips some)."""
    w = shape_of(conv.args[1]) if len(conv.args) > 1 else None
    stride = conv.args[3] if len(conv.args) > 3 else conv.kwargs.get("stride", 1)
    strides = stride if isinstance(stride, (list, tuple)) else [stride]
    return bool(w) and (any(k != 1 for k in w[2:]) or any(s != 1 for s in strides))


def _describe_conv(conv: Node) -> str:
    w = shape_of(conv.args[1])
    groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
    if conv.target == aten.convolution.default:
        groups = conv.args[8] if len(conv.args) > 8 else 1
    depthwise = isinstance(groups, int) and groups > 1 and w[1] == 1
    kernel = "×".join(str(k) for k in w[2:])
    return f"{conv.name}: a {kernel} {'depthwise ' if depthwise else ''}convolution"


def _input_problem(x: Node, g: ExportedGraph) -> str | None:
    """Why the block's input is not one hidden state per token, or None: a value that no
    model input reaches (a fixed table), or one pooled over the tokens / positions."""
    if x not in g.varying:
        what = g.buffers.get(x.name) or g.params.get(x.name) or x.name
        return (f"its input {what} does not depend on any model input (it is computed from "
                "parameters, buffers and constants alone: a fixed table, such as Swin V2's "
                "continuous position-bias MLP over its coordinate table): not a token FFN; "
                "it gives the same result on every call")
    n = x
    while isinstance(n, Node) and n.op == "call_function" and (
            n.target in PASS_THROUGH or n.target in _LAYOUT):
        n = n.args[0]
    if n.target is operator.getitem and isinstance(n.args[0], Node):
        n = n.args[0]  # max.dim, adaptive_max_pool2d: (values, indices)
    if isinstance(n, Node) and n.target in _POOLS:
        return (f"its input is pooled over the tokens / positions ({n.name}, "
                f"{n.target}): one vector per sample, not one per token (a squeeze-"
                "excitation gate, as in EfficientNet and MaxViT): not a token FFN")
    return None


def _common_module(param_names: list[str]) -> str:
    """The deepest module holding every projection: a projection module's parent (``fc1``
    of ``mlp.fc1.weight``), or the owner of a raw parameter (``ffn`` of ``ffn.w1``)."""
    owners = [p.split(".")[:-2] if p.split(".")[-1] == "weight" else p.split(".")[:-1]
              for p in param_names]
    common = []
    for level in zip(*owners, strict=False):
        if len(set(level)) != 1:
            break
        common.append(level[0])
    return ".".join(common)


def find_ffns(ep: torch.export.ExportedProgram, method: str | None = None
              ) -> tuple[list[FFNMatch], list[Rejection]]:
    """All FFN blocks of an exported program in graph order, and every rejected candidate;
    with ``method``, also the blocks that method cannot hold (``method_problem``).

    Candidates are taken in graph order: a candidate that shares a projection with an FFN
    already taken (the middle Linear of Linear → act → Linear → act → Linear), or that uses
    a weight of one in another role, is rejected with that reason.
    """
    g = ExportedGraph.of(ep)
    matches, rejections = [], []
    claimed: dict[Node, FFNMatch] = {}
    weight_roles: dict[str, tuple[tuple, FFNMatch]] = {}
    for node in ep.graph.nodes:
        down = as_projection(node, g)
        # an affine map after the second projection stays outside: the bare one is the
        # candidate (it comes first in graph order)
        if down is None or down.affine or any(n in claimed for n in down.nodes):
            continue
        result = _match_at(down, g, claimed)
        if isinstance(result, FFNMatch):
            result = _conflict(result, weight_roles) or result
        if isinstance(result, FFNMatch) and (why := method_problem(result, method)):
            result = Rejection(result.output.name, why)
        if isinstance(result, Rejection):
            rejections.append(result)
            continue
        matches.append(result)
        claimed.update(dict.fromkeys(result.nodes, result))
        roles = _roles(result)
        for w in roles:
            weight_roles.setdefault(w, (roles, result))
    claimed_names = {n.name for n in claimed}
    return matches, [r for r in rejections if r.node not in claimed_names]


def method_problem(m: FFNMatch, method: str | None) -> str | None:
    """Why ``method`` cannot convert the FFN ``m``, or None: a PEER layer maps H → H (each
    expert's output vector has its input's width), so it holds no block H → F → O."""
    if method != "peer" or m.widths is None or m.widths[0] == m.widths[1]:
        return None
    h, o = m.widths
    return (f"output width {o} differs from input width {h}: method='peer' maps H → H (a "
            "PEER layer's experts write vectors of the input's width), so it cannot hold a "
            "block that changes the width; method='split' or 'upcycle' convert it")


def _roles(m: FFNMatch) -> tuple:
    return (m.up.weight, m.gate.weight if m.gate else None, m.down.weight)


def _conflict(m: FFNMatch, weight_roles: dict[str, tuple[tuple, FFNMatch]]
              ) -> Rejection | None:
    """Why ``m`` cannot be taken next to the FFNs already taken (its nodes are free: checked
    in ``_match_at``), or None. Call sites of one shared FFN module (same weights in the same
    roles) are no conflict."""
    roles = _roles(m)
    for w in roles:
        if w is not None and w in weight_roles and weight_roles[w][0] != roles:
            other = weight_roles[w][1]
            return Rejection(m.output.name, f"shares weight {w} with FFN "
                             f"{other.name or other.output.name} in another role")
    return None
