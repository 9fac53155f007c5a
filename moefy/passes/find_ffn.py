"""FFN matching over an exported graph: what the graph computes, not how it is spelled.

    x → Proj_up → ε(h) → Proj_down                                   (plain: ε = act)
    x → Proj_gate ─┐
    x → Proj_up ───┴→ ε(g, u) = act(g) · u → Proj_down               (gated: SwiGLU, GeGLU)
    x → Proj_gate_up → two halves (chunk / split / slice) → ε → Proj_down     (fused gate_up)

    x → Proj_up → ε → Norm over the hidden width → Proj_down         (sub-LN, EVA-02: upcycle only)

  ⇒ one ``FFNMatch`` per block: its nodes, activation (a name, or the subgraph), parameters.

    Proj → per-feature affine (eval-mode BatchNorm, x · s + t)  ⇒  one Proj, folded when built

Not token FFNs, each rejected with its reason: a block whose input does not depend on the model's
inputs (Swin V2's position-bias MLP over a fixed table) or is pooled over the tokens (a
squeeze-excitation gate); one with a token-mixing convolution between its projections
(SegFormer's Mix-FFN); one whose output width differs from its input (a MoE maps H → H).

``Proj`` is any matmul of the hidden state with a parameter, optionally followed by ``+ b``
with a 1-D parameter ``b``: ``aten.linear``; ``addmm`` (GPT-2's Conv1D); ``matmul`` / ``mm`` /
``bmm`` with the weight as stored (``x @ W``, weight (in, out)) or transposed (``x @ W.T``); a
two-operand ``einsum`` contracting x's last dimension with a 2-D weight; a 1×1 convolution
(stride 1, no padding, one group), whose features are on dim 1 (``channels_dim=1``). A first
projection may be followed by per-feature affine maps (``Projection.affine``): an eval-mode
BatchNorm (LeViT's ``Linear + BatchNorm1d``), a multiply / add by tensors of one value per
feature, and views that keep the features last; building folds them into its weight and bias.
An affine map after the second projection stays outside the block: it maps the MoE's output.

``ε`` is any element-wise subgraph: ATen ops tagged pointwise (and their in-place variants),
with scalar constants as their only other inputs; dropout, clones and dtype casts count as
identities. It is identified numerically, not by its spelling: evaluated on a probe and
compared with every entry of ``moefy.activations.ACTIVATIONS``. A match takes that name (fast
kernels and ONNX lowerings exist for names); when none matches, ``activation="custom"`` and
``activation_fn`` is the subgraph itself as a ``GraphModule`` h ↦ act(h), run by the experts.

Every projection is a candidate second layer, taken in graph order; each rejected candidate
keeps its reason. A projection belongs to one FFN at most, and a weight plays one role.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace

import torch
import torch.nn as nn
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

from moefy.activations import ACTIVATIONS

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
# Identities for what the experts compute: no dropout at inference, and the experts run in
# their own dtype (a cast inside the activation only changes the precision it is computed in).
_PASS_THROUGH = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
                 aten.feature_alpha_dropout.default, aten.clone.default, aten.alias.default,
                 aten.detach.default, aten.detach_.default, aten.contiguous.default,
                 aten.lift_fresh_copy.default,
                 aten._to_copy.default, aten.to.dtype, aten.type_as.default}
# Element-wise ops that ATen does not tag pointwise.
_ELEMENTWISE = {aten.hardswish.default, aten.where.ScalarOther, aten.where.ScalarSelf,
                aten.where.Scalar, aten.rsub.Tensor, aten.zeros_like.default,
                aten.ones_like.default, aten.full_like.default}
_ASSERTS = {aten._assert_tensor_metadata.default}
_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default}
_CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
          aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
          aten.convolution.default}
_TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default}
# Views a per-feature affine map may sit behind (LeViT flattens the tokens for BatchNorm1d).
_AFFINE_VIEWS = _VIEWS | {aten.flatten.using_ints, aten.unflatten.int, aten.reshape_as.default,
                          aten.view_as.default}
_AFFINE_OPS = {aten.mul.Tensor: "mul", aten.div.Tensor: "div", aten.add.Tensor: "add",
               aten.sub.Tensor: "sub"}
# Ops that only move a tensor's elements around (a token-mixing convolution hides behind them).
_LAYOUT = _AFFINE_VIEWS | _TRANSPOSES | {aten.transpose.int, aten.permute.default,
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
_MAX_REGION = 128  # element-wise ops between two projections; real activations use < 30
# Where activations are compared: a dense grid over their interesting range, the origin's
# neighbourhood, and large values (relu vs leaky relu, clamps).
_PROBE = torch.cat([
    torch.linspace(-10.0, 10.0, 4001, dtype=torch.float64),
    torch.tensor([1e-7, 1e-4, 20.0, 50.0, 100.0, 1e3, 1e6], dtype=torch.float64),
    -torch.tensor([1e-7, 1e-4, 20.0, 50.0, 100.0, 1e3, 1e6], dtype=torch.float64),
])
_TOL = 1e-6  # relative and absolute, in float64


@dataclass
class Projection:
    """A linear map of ``input`` by a parameter: ``output = input @ W^T + b``."""

    input: Node
    output: Node
    nodes: list[Node]
    weight: str  # parameter name
    bias: str | None
    transposed: bool  # weight stored (in, out): GPT-2's Conv1D, ``x @ W``, einsum "hf"
    shape: tuple[int, int] | None = None  # (out, in) features, nn.Linear layout
    channels_dim: int = -1  # dim of input/output holding the features; 1 for 1×1 convs
    # per-feature affine maps after the product (and bias), in order: folded when built
    affine: list[Affine] = field(default_factory=list)


@dataclass(eq=False)  # operands may be tensors
class Affine:
    """A per-feature affine map ``y = x · scale + shift`` after a projection: ``op``
    "batch_norm" (eval mode; operands weight, bias, running_mean, running_var; ``eps``), or
    "mul" / "div" / "add" / "sub" by one tensor (``flipped``: it is the left operand,
    ``c + α·x`` / ``c − α·x``). Operands are parameter or buffer names (read from the model
    when building), lifted constants (their values), or None (BatchNorm without affine)."""

    op: str
    operands: tuple
    alpha: float = 1.0
    eps: float = 0.0
    flipped: bool = False

    def scale_shift(self, read) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, shift), each (features,) in float64; ``read`` maps a name to its tensor."""
        vals = [None if r is None else (read(r) if isinstance(r, str) else r).detach()
                .double().reshape(-1) for r in self.operands]
        if self.op == "batch_norm":
            w, b, mean, var = vals
            scale = (var + self.eps).rsqrt() * (1.0 if w is None else w)
            return scale, (0.0 if b is None else b) - mean * scale
        (c,) = vals
        ones, zeros = torch.ones_like(c), torch.zeros_like(c)
        if self.op == "mul":
            return c, zeros
        if self.op == "div":
            return 1.0 / c, zeros
        sign = 1.0 if self.op == "add" else -1.0
        if self.flipped:
            return sign * self.alpha * ones, c
        return ones, sign * self.alpha * c


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


@dataclass
class Rejection:
    node: str
    reason: str


@dataclass
class _Graph:
    """What matching needs to know about an exported program's placeholders."""

    params: dict[str, str]  # placeholder name -> parameter name
    constants: dict[str, torch.Tensor]  # placeholder name -> lifted tensor constant
    order: dict[Node, int]
    buffers: dict[str, str] = field(default_factory=dict)  # placeholder name -> buffer name
    varying: set[Node] = field(default_factory=set)  # nodes that depend on a model input

    @classmethod
    def of(cls, ep: torch.export.ExportedProgram) -> _Graph:
        sig = ep.graph_signature
        constants = {ph: ep.constants[name]
                     for ph, name in sig.inputs_to_lifted_tensor_constants.items()
                     if isinstance(ep.constants.get(name), torch.Tensor)}
        user, varying = set(sig.user_inputs), set()
        for n in ep.graph.nodes:
            inputs = [n.name in user] if n.op == "placeholder" else [
                a in varying for a in n.all_input_nodes]
            if any(inputs):
                varying.add(n)
        return cls(dict(sig.inputs_to_parameters), constants,
                   {n: i for i, n in enumerate(ep.graph.nodes)}, dict(sig.inputs_to_buffers),
                   varying)


def _param_name(node, params: dict[str, str]) -> str | None:
    if isinstance(node, Node) and node.op == "placeholder":
        return params.get(node.name)
    return None


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


@dataclass
class _Weight:
    name: str
    swapped: bool  # the operand is the stored weight with its last two dims swapped
    shape: tuple[int, int]  # as stored
    nodes: list[Node]  # transposes / broadcasts between the parameter and the operand


def _weight_of(node, params: dict[str, str]) -> _Weight | None:
    """The 2-D parameter that ``node`` is, seen through transposes and leading-dim broadcasts
    (``W.T``, ``W.expand(B, -1, -1)``)."""
    swapped, chain = False, []
    while isinstance(node, Node) and node.op == "call_function":
        src, t = node.args[0], node.target
        shape, src_shape = _shape(node), _shape(src)
        if shape is None or src_shape is None or len(shape) < 2 or len(src_shape) < 2:
            return None
        nd = len(src_shape)
        if t in _TRANSPOSES:
            swapped = not swapped
        elif t == aten.transpose.int:
            if {node.args[1] % nd, node.args[2] % nd} != {nd - 2, nd - 1}:
                return None
            swapped = not swapped
        elif t == aten.permute.default:
            dims = [d % nd for d in node.args[1]]
            if dims == [*range(nd - 2), nd - 1, nd - 2]:
                swapped = not swapped
            elif dims != list(range(nd)):
                return None
        elif t not in (aten.unsqueeze.default, aten.expand.default) or not _same_sizes(
                shape[-2:], src_shape[-2:]):
            return None
        chain.append(node)
        node = src
    name, shape = _param_name(node, params), _shape(node)
    if name is None or shape is None or len(shape) != 2:
        return None
    # The weight-side ops belong to the projection unless something else reads them too.
    own = [n for n in reversed(chain) if len(n.users) == 1]
    return _Weight(name, swapped, shape, own)


def _out_in(stored: tuple[int, int], transposed: bool) -> tuple[int, int]:
    return (stored[1], stored[0]) if transposed else (stored[0], stored[1])


def _same_sizes(a, b) -> bool:
    # Only static sizes count: comparing symbolic ones would add guards to a finished graph.
    return len(a) == len(b) and all(
        isinstance(x, int) and isinstance(y, int) and x == y for x, y in zip(a, b, strict=True))


def _last_dim_kept(view: Node) -> bool:
    """A view that only merges or splits leading dims (features stay the last dim)."""
    a, b = _shape(view.args[0]), _shape(view)
    return bool(a) and bool(b) and _same_sizes(a[-1:], b[-1:])


def _einsum_projection(node: Node, params: dict[str, str]) -> Projection | None:
    """``einsum("...h,fh->...f", x, W)`` (or ``"...h,hf->...f"``): a projection of x's last
    dimension by a 2-D weight."""
    equation, operands = node.args[0], node.args[1]
    if not isinstance(equation, str) or len(operands) != 2 or "->" not in equation:
        return None
    inputs, out = equation.replace(" ", "").split("->")
    subs = inputs.split(",")
    if len(subs) != 2:
        return None
    for i in (0, 1):
        x, w, xs, ws = operands[i], operands[1 - i], subs[i], subs[1 - i]
        weight = _weight_of(w, params)
        if weight is None or len(ws) != 2 or "." in ws or not xs:
            continue
        c, prefix = xs[-1], xs[:-1]
        if c not in ws or ws[0] == ws[1]:
            continue
        o = ws[1] if ws[0] == c else ws[0]
        if out != prefix + o or c in prefix or o in prefix:
            continue
        transposed = (ws == c + o) != weight.swapped  # stored (in, out)
        return Projection(x, node, weight.nodes + [node], weight.name, None, transposed,
                          _out_in(weight.shape, transposed))
    return None


def _conv_projection(node: Node, params: dict[str, str]) -> Projection | None:
    """A 1×1 convolution: a projection of the channels (dim 1) at every position."""
    bound = normalize_function(node.target, node.args, node.kwargs,
                               normalize_to_only_use_kwargs=True)
    if bound is None:
        return None
    a = bound.kwargs
    w_name, w_shape = _param_name(a["weight"], params), _shape(a["weight"])
    if w_name is None or w_shape is None or any(k != 1 for k in w_shape[2:]):
        return None
    ones = lambda v: all(s == 1 for s in (v if isinstance(v, (list, tuple)) else [v]))  # noqa: E731
    zeros = lambda v: v in ("valid", "same") or all(  # noqa: E731  (1×1: "same" pads nothing)
        s == 0 for s in (v if isinstance(v, (list, tuple)) else [v]))
    if not ones(a.get("stride", 1)) or not zeros(a.get("padding", 0)) or a.get("groups", 1) != 1:
        return None
    if a.get("transposed", False):
        return None
    bias = a.get("bias")
    b_name = _param_name(bias, params)
    if bias is not None and b_name is None:
        return None  # a computed bias is not part of a plain projection
    return Projection(a["input"], node, [node], w_name, b_name, False,
                      (w_shape[0], w_shape[1]), channels_dim=1)


def _core_projection(node, params: dict[str, str]) -> Projection | None:
    """The projection whose output is ``node``, not counting a bias added after it."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t = node.target
    if t == aten.linear.default:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        weight, b_name = _weight_of(w, params), _param_name(b, params)
        if weight is None or (b is not None and b_name is None):
            return None
        transposed = weight.swapped  # linear reads (out, in): swapped means stored (in, out)
        return Projection(x, node, weight.nodes + [node], weight.name, b_name, transposed,
                          _out_in(weight.shape, transposed))
    if t == aten.einsum.default:
        return _einsum_projection(node, params)
    if t in _CONVS:
        return _conv_projection(node, params)
    inner, outer = node, None
    if t in _VIEWS and isinstance(node.args[0], Node) and node.args[0].target in _MATMULS:
        if not _last_dim_kept(node):
            return None
        inner, outer = node.args[0], node
    if inner.target not in _MATMULS:
        return None
    if outer is None and len(inner.users) == 1:
        (user,) = inner.users
        if user.target in _VIEWS and _last_dim_kept(user):
            return None  # the view after it stands for the whole projection
    b = None
    if inner.target == aten.addmm.default:
        if inner.kwargs.get("beta", 1) != 1 or inner.kwargs.get("alpha", 1) != 1:
            return None
        b, x2, w = inner.args[:3]
    else:
        x2, w = inner.args[:2]
    weight, b_name = _weight_of(w, params), _param_name(b, params)
    if weight is None or (b is not None and b_name is None):
        return None
    transposed = not weight.swapped  # x @ W reads W as (in, out)
    nodes = weight.nodes + [inner] + ([outer] if outer is not None else [])
    x = x2
    if isinstance(x2, Node) and x2.target in _VIEWS and len(x2.users) == 1 and _last_dim_kept(
            x2):
        x, nodes = x2.args[0], [x2] + nodes
    return Projection(x, outer or inner, nodes, weight.name, b_name, transposed,
                      _out_in(weight.shape, transposed))


def _with_bias(node, params: dict[str, str]) -> Projection | None:
    """``core + b`` with ``b`` a 1-D parameter of the projection's output width (Falcon writes
    ``x @ W.T + b``)."""
    if not isinstance(node, Node) or node.target != aten.add.Tensor or node.kwargs.get(
            "alpha", 1) != 1:
        return None
    for core_node, b in (node.args[:2], node.args[1::-1]):
        if not isinstance(core_node, Node) or len(core_node.users) != 1:
            continue
        core = _core_projection(core_node, params)
        b_name = _param_name(b, params)
        if core is None or core.bias is not None or core.channels_dim != -1 or b_name is None:
            continue
        if core.shape is None or _shape(b) != (core.shape[0],):
            continue
        return replace(core, output=node, nodes=core.nodes + [node], bias=b_name)
    return None


def _biased_projection(node, params: dict[str, str]) -> Projection | None:
    """The projection whose output is ``node`` (with its bias, if added)."""
    proj = _with_bias(node, params) or _core_projection(node, params)
    if proj is None:
        return None
    if len(proj.output.users) == 1 and _with_bias(next(iter(proj.output.users)), params):
        return None  # the bias add after it stands for the whole projection
    return proj


_COMPUTED = object()  # an operand computed in the graph: no fixed per-feature value


def _operand(node, g: _Graph):
    """A tensor operand that building can read again: a parameter or buffer name, a lifted
    constant's value, or None; ``_COMPUTED`` for anything computed in the graph."""
    if node is None:
        return None
    if not isinstance(node, Node) or node.op != "placeholder":
        return _COMPUTED
    name = g.params.get(node.name) or g.buffers.get(node.name)
    return name if name is not None else g.constants.get(node.name, _COMPUTED)


def _affine_step(node, g: _Graph) -> tuple[Node, Affine | None, Node | None] | None:
    """(input, step, tensor operand) when ``node`` is an affine map of its input by fixed
    tensors (step None: a view), else None. Shapes are checked by ``_with_affine``."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t, args = node.target, node.args
    if t in _AFFINE_VIEWS:
        return args[0], None, None
    if t == aten.batch_norm.default:
        x, w, b, mean, var, training = args[:6]
        eps = args[7] if len(args) > 7 else node.kwargs.get("eps", 1e-5)
        operands = tuple(_operand(a, g) for a in (w, b, mean, var))
        if training or mean is None or var is None or _COMPUTED in operands:
            return None  # batch statistics: not a fixed map (``_batch_norm_problem``)
        return x, Affine("batch_norm", operands, eps=float(eps)), None
    alpha = node.kwargs.get("alpha", 1)
    if t not in _AFFINE_OPS or len(args) != 2 or not isinstance(alpha, (int, float)):
        return None
    for x, c, flipped in ((args[0], args[1], False), (args[1], args[0], True)):
        operand = _operand(c, g)
        if not isinstance(x, Node) or operand is None or operand is _COMPUTED:
            continue
        if flipped and t == aten.div.Tensor:
            return None  # c / x is not affine in x
        return x, Affine(_AFFINE_OPS[t], (operand,), alpha=float(alpha), flipped=flipped), c
    return None


def _per_feature(shape, rank: int, axis: int, features: int) -> bool:
    """A tensor of ``shape`` holds one value per feature on ``axis`` of a rank-``rank`` one."""
    if not shape or len(shape) > rank:
        return False
    full = (1,) * (rank - len(shape)) + tuple(shape)
    return all(s == (features if i == axis else 1) for i, s in enumerate(full))


def _with_affine(node, g: _Graph) -> Projection | None:
    """A projection followed by per-feature affine maps that end at ``node``: an eval-mode
    BatchNorm over its features, ``x · s + t`` with one value of ``s`` / ``t`` per feature,
    views that keep the features last (LeViT: flatten → BatchNorm1d → reshape back). Still
    one projection; building folds the maps into its weight and bias."""
    chain: list[tuple[Node, Node, Affine | None, Node | None]] = []  # (node, input, step, c)
    n = node
    while (proj := _biased_projection(n, g.params)) is None:
        step = _affine_step(n, g)
        if step is None or len(chain) >= _MAX_REGION:
            return None
        chain.append((n, *step))
        n = step[0]
    if not any(step is not None for _, _, step, _ in chain) or proj.shape is None:
        return None
    features, dim = proj.shape[0], proj.channels_dim
    inside = {proj.output} | {c[0] for c in chain}
    for n, src, step, operand in chain:
        shape, src_shape = _shape(n), _shape(src)
        if shape is None or src_shape is None:
            return None
        if n is not node and any(u not in inside for u in n.users):
            return None  # an intermediate value read elsewhere: not one projection
        if step is None:
            if dim != -1 or not _last_dim_kept(n):
                return None
        elif step.op == "batch_norm":  # normalises dim 1: the features must be there
            if len(src_shape) < 2 or src_shape[1] != features or (
                    (dim == -1) != (len(src_shape) == 2)):
                return None
        elif len(shape) != len(src_shape) or not _per_feature(
                _shape(operand), len(shape), len(shape) - 1 if dim == -1 else 1, features):
            return None  # (a per-feature operand of no higher rank broadcasts nothing)
    if any(u not in inside for u in proj.output.users):
        return None
    steps = [step for _, _, step, _ in reversed(chain) if step is not None]
    nodes = proj.nodes + [c[0] for c in reversed(chain)]
    return replace(proj, output=node, nodes=nodes, affine=steps)


def as_projection(node: Node, g: _Graph) -> Projection | None:
    """The projection whose output is ``node``, if it is one: with its bias, if added, and
    the per-feature affine maps after it that end at ``node``, if any."""
    return _biased_projection(node, g.params) or _with_affine(node, g)


def strip_identities(node) -> tuple[Node, list[Node]]:
    """Walk back through dropout / clone / alias; return the first real node and the skipped."""
    skipped = []
    while isinstance(node, Node) and node.op == "call_function" and node.target in _PASS_THROUGH:
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


def _is_elementwise(target) -> bool:
    op = _functional(target)
    if not isinstance(op, torch._ops.OpOverload):
        return False
    if torch.Tag.nondeterministic_seeded in op.tags:  # rrelu while training: random
        return False
    return torch.Tag.pointwise in op.tags or op in _ELEMENTWISE


def _inputs(node: Node) -> list[Node]:
    if node.target in _PASS_THROUGH:  # type_as(x, other) reads only other's dtype
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


def _projection_half(node, g: _Graph) -> tuple[Projection, int, Node | None] | None:
    part = _fused_part(node)
    if part is None:
        return None
    proj = as_projection(part[0], g)
    return None if proj is None else (proj, part[1], part[2])


@dataclass
class _Region:
    """The element-wise subgraph feeding the second projection."""

    nodes: set[Node]
    leaves: list[Node]  # projection outputs (or halves of one) it reads, graph order
    constants: dict[Node, torch.Tensor]  # one-element lifted tensor constants it reads


def _elementwise_region(root: Node, g: _Graph) -> _Region | str:
    """Everything element-wise between ``root`` and the projections it reads, or why not."""
    nodes: set[Node] = set()
    leaves: set[Node] = set()
    constants: dict[Node, torch.Tensor] = {}
    stack = [root]
    while stack:
        n = stack.pop()
        if n in nodes or n in leaves or n in constants:
            continue
        if as_projection(n, g) is not None or _projection_half(n, g):
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
        if n.op != "call_function" or not (n.target in _PASS_THROUGH
                                           or _is_elementwise(n.target)):
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
        if len(nodes) > _MAX_REGION:
            return f"more than {_MAX_REGION} element-wise ops before it: not an activation"
        stack.extend(_inputs(n))
    return _Region(nodes, sorted(leaves, key=g.order.__getitem__), constants)


def _batch_statistics_norm(node: Node) -> Node | None:
    """The BatchNorm at ``node`` or behind the views before it, if it uses batch statistics."""
    while isinstance(node, Node) and node.target in _AFFINE_VIEWS:
        node = node.args[0]
    if isinstance(node, Node) and node.target == aten.batch_norm.default and (
            node.args[5] or None in node.args[3:5]):
        return node
    return None


def _ancestors(node: Node, region: _Region) -> tuple[set[Node], set[Node]]:
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


def _subgraph(out: Node, leaf: Node, region: _Region, g: _Graph) -> torch.fx.GraphModule:
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
        if n.target in _PASS_THROUGH:
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


def _is_affine(fn) -> bool:
    with torch.no_grad():
        y0, y1 = fn(torch.zeros(1, dtype=torch.float64)), fn(torch.ones(1, dtype=torch.float64))
        y = fn(_PROBE.clone())
    return bool(torch.allclose(y, (y1 - y0) * _PROBE + y0, rtol=_TOL, atol=_TOL))


def _evaluate(fn: torch.fx.GraphModule) -> str | None:
    """Why ``fn`` cannot serve as an activation (None when it can)."""
    try:
        with torch.no_grad():
            y = fn(_PROBE.clone())
    except (RuntimeError, TypeError, ValueError) as exc:  # reported as the rejection reason
        return f"its element-wise part does not evaluate on its own: {type(exc).__name__}: {exc}"
    if not isinstance(y, torch.Tensor) or y.shape != _PROBE.shape or not y.is_floating_point():
        return "its element-wise part does not map a tensor to one of the same shape"
    return None


def _gated_factors(root: Node, region: _Region) -> tuple[Node, Node, Node] | str:
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


def _match_at(down: Projection, g: _Graph, claimed: dict[Node, FFNMatch]
              ) -> FFNMatch | Rejection:
    reject = lambda why: Rejection(down.output.name, why)  # noqa: E731
    norm = _hidden_norm(down, g)
    if isinstance(norm, str):
        return reject(norm)
    end = down.input if norm is None else norm.input  # ε's output
    region = _elementwise_region(end, g)
    if isinstance(region, str):
        return reject(_token_mixer(down, g) or region)
    gate = fused_first = None
    extra: list[Node] = []  # splitters and halves of a fused gate_up
    if len(region.leaves) == 1:
        (leaf,) = region.leaves
        up = as_projection(leaf, g)
        if up is None:
            return reject("it reads only one half of a projection")
        if all(n.target in _PASS_THROUGH for n in region.nodes):
            return reject(f"no activation between projections {up.weight} and {down.weight}")
        fn = _subgraph(end, leaf, region, g)
        why = _evaluate(fn)
        if why is None and _is_affine(fn):
            why = (f"the element-wise part between {up.weight} and {down.weight} is affine: "
                   "no activation (a factored linear map, not an FFN)")
    elif len(region.leaves) == 2:
        factors = _gated_factors(strip_identities(end)[0], region)
        if isinstance(factors, str):
            return reject(factors)
        act_factor, g_leaf, u_leaf = factors
        gate, up = as_projection(g_leaf, g), as_projection(u_leaf, g)
        if gate is None or up is None:
            g_half, u_half = _projection_half(g_leaf, g), _projection_half(u_leaf, g)
            if g_half is None or u_half is None or g_half[0].output is not u_half[0].output:
                return reject("gated product whose factors are not projections (or halves "
                              "of one projection)")
            if g_half[1] == u_half[1]:
                return reject("gated product of one half of a projection with itself")
            up, gate, fused_first = g_half[0], None, g_half[1] == 0
            extra = [n for n in (g_half[2], u_half[2]) if n is not None] + [g_leaf, u_leaf]
        elif gate.input is not up.input:
            return reject("gate and up projections read different inputs")
        fn = _subgraph(act_factor, g_leaf, region, g)
        why = _evaluate(fn)
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
    """Why the MoE (H → F → H) cannot hold these projections, or None."""
    if up.shape is None or down.shape is None:
        return None
    f, h = up.shape
    f = f // 2 if fused else f
    if gate is not None and gate.shape != up.shape:
        return f"gate {gate.shape} and up {up.shape} projections differ in shape"
    if down.shape[1] != f:
        return f"the second projection reads {down.shape[1]} features but the first gives {f}"
    if down.shape[0] != h:
        return (f"output width {down.shape[0]} differs from input width {h}: moefy.MoE maps "
                "H → H (its experts' w_out is (E, H, I) and its output has its input's "
                "width), so a block that changes the width cannot become one")
    return None


def _hidden_norm(down: Projection, g: _Graph) -> HiddenNorm | str | None:
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
    x, width = bound["input"], _shape(bound["input"])
    if not width or list(bound["normalized_shape"]) != [width[-1]]:
        return None  # not over the hidden width alone: an ordinary non-element-wise op
    weight, bias = bound.get("weight"), bound.get("bias")
    params = [_param_name(t, g.params) for t in (weight, bias)]
    if any(t is not None and p is None for t, p in zip((weight, bias), params, strict=True)):
        return (f"the {kind.replace('_', ' ')} {node.name} before it has a computed weight "
                "or bias (a normalisation over the hidden width takes parameters)")
    eps = bound.get("eps", 1e-5 if kind == "layer_norm" else None)
    return HiddenNorm(kind, x, skipped + [node], *params, eps)


def _token_mixer(down: Projection, g: _Graph) -> str | None:
    """Why the block before ``down`` is a Mix-FFN: a convolution that mixes neighbouring
    tokens (a kernel over positions, or a stride) between a projection and ``down``, seen
    through element-wise ops, layout changes and BatchNorms (EfficientNet's conv → BN → act),
    not through a LayerNorm (which starts a block). None when there is none."""
    stack: list[tuple[Node, Node | None]] = [(down.input, None)]  # (node, mixing conv seen)
    seen: set[tuple[Node, Node | None]] = set()
    while stack and len(seen) < 4 * _MAX_REGION:
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
        if n.target in _CONVS:
            if _mixes_tokens(n):
                stack.append((n.args[0], n))
            continue
        if (n.target in _PASS_THROUGH or n.target in _LAYOUT or _is_elementwise(n.target)
                or n.target == aten.batch_norm.default):
            stack.extend((a, mixer) for a in n.all_input_nodes)
    return None


def _mixes_tokens(conv: Node) -> bool:
    """A convolution whose output at a position reads other positions (or skips some)."""
    w = _shape(conv.args[1]) if len(conv.args) > 1 else None
    stride = conv.args[3] if len(conv.args) > 3 else conv.kwargs.get("stride", 1)
    strides = stride if isinstance(stride, (list, tuple)) else [stride]
    return bool(w) and (any(k != 1 for k in w[2:]) or any(s != 1 for s in strides))


def _describe_conv(conv: Node) -> str:
    w = _shape(conv.args[1])
    groups = conv.args[6] if len(conv.args) > 6 else conv.kwargs.get("groups", 1)
    if conv.target == aten.convolution.default:
        groups = conv.args[8] if len(conv.args) > 8 else 1
    depthwise = isinstance(groups, int) and groups > 1 and w[1] == 1
    kernel = "×".join(str(k) for k in w[2:])
    return f"{conv.name}: a {kernel} {'depthwise ' if depthwise else ''}convolution"


def _input_problem(x: Node, g: _Graph) -> str | None:
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
            n.target in _PASS_THROUGH or n.target in _LAYOUT):
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


def find_ffns(ep: torch.export.ExportedProgram) -> tuple[list[FFNMatch], list[Rejection]]:
    """All FFN blocks of an exported program in graph order, and every rejected candidate.

    Candidates are taken in graph order: a candidate that shares a projection with an FFN
    already taken (the middle Linear of Linear → act → Linear → act → Linear), or that uses
    a weight of one in another role, is rejected with that reason.
    """
    g = _Graph.of(ep)
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
