"""Projections: a matmul of the hidden state with a parameter, however the graph spells it.

    linear(x, W, b) │ addmm(b, x, W) │ x @ W │ x @ W.T │ einsum(x, W) │ conv1×1(x, W)
        ⇒  Projection(input=x, weight=W, bias=b)
    Proj → + b (a 1-D parameter)  ⇒  one Proj, with its bias
    Proj → per-feature affine (eval-mode BatchNorm, x · s + t)  ⇒  one Proj, folded when built

``Proj`` is any matmul of the hidden state with a parameter, optionally followed by ``+ b``
with a 1-D parameter ``b``: ``aten.linear``; ``addmm`` (GPT-2's Conv1D); ``matmul`` / ``mm`` /
``bmm`` with the weight as stored (``x @ W``, weight (in, out)) or transposed (``x @ W.T``); a
two-operand ``einsum`` contracting x's last dimension with a 2-D weight; a 1×1 convolution
(stride 1, no padding, one group), whose features are on dim 1 (``channels_dim=1``). A first
projection may be followed by per-feature affine maps (``Projection.affine``): an eval-mode
BatchNorm (LeViT's ``Linear + BatchNorm1d``), a multiply / add by tensors of one value per
feature, and views that keep the features last; building folds them into its weight and bias.
An affine map after the second projection stays outside the block: it maps the MoE's output.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch.fx import Node
from torch.fx.operator_schemas import normalize_function

aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_MATMULS = {aten.matmul.default, aten.mm.default, aten.bmm.default, aten.addmm.default}
CONVS = {aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
         aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding,
         aten.convolution.default}
TRANSPOSES = {aten.t.default, aten.numpy_T.default, aten.mT.default, aten.adjoint.default}
# Views a per-feature affine map may sit behind (LeViT flattens the tokens for BatchNorm1d).
AFFINE_VIEWS = _VIEWS | {aten.flatten.using_ints, aten.unflatten.int, aten.reshape_as.default,
                         aten.view_as.default}
_AFFINE_OPS = {aten.mul.Tensor: "mul", aten.div.Tensor: "div", aten.add.Tensor: "add",
               aten.sub.Tensor: "sub"}
MAX_REGION = 128  # element-wise ops between two projections; real activations use < 30


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
class ExportedGraph:
    """What matching needs to know about an exported program's placeholders."""

    params: dict[str, str]  # placeholder name -> parameter name
    constants: dict[str, torch.Tensor]  # placeholder name -> lifted tensor constant
    order: dict[Node, int]
    buffers: dict[str, str] = field(default_factory=dict)  # placeholder name -> buffer name
    varying: set[Node] = field(default_factory=set)  # nodes that depend on a model input

    @classmethod
    def of(cls, ep: torch.export.ExportedProgram) -> ExportedGraph:
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


def param_name(node, params: dict[str, str]) -> str | None:
    if isinstance(node, Node) and node.op == "placeholder":
        return params.get(node.name)
    return None


def shape_of(node) -> tuple | None:
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
        shape, src_shape = shape_of(node), shape_of(src)
        if shape is None or src_shape is None or len(shape) < 2 or len(src_shape) < 2:
            return None
        nd = len(src_shape)
        if t in TRANSPOSES:
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
    name, shape = param_name(node, params), shape_of(node)
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
    a, b = shape_of(view.args[0]), shape_of(view)
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
    w_name, w_shape = param_name(a["weight"], params), shape_of(a["weight"])
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
    b_name = param_name(bias, params)
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
        weight, b_name = _weight_of(w, params), param_name(b, params)
        if weight is None or (b is not None and b_name is None):
            return None
        transposed = weight.swapped  # linear reads (out, in): swapped means stored (in, out)
        return Projection(x, node, weight.nodes + [node], weight.name, b_name, transposed,
                          _out_in(weight.shape, transposed))
    if t == aten.einsum.default:
        return _einsum_projection(node, params)
    if t in CONVS:
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
    weight, b_name = _weight_of(w, params), param_name(b, params)
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
        b_name = param_name(b, params)
        if core is None or core.bias is not None or core.channels_dim != -1 or b_name is None:
            continue
        if core.shape is None or shape_of(b) != (core.shape[0],):
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


def _operand(node, g: ExportedGraph):
    """A tensor operand that building can read again: a parameter or buffer name, a lifted
    constant's value, or None; ``_COMPUTED`` for anything computed in the graph."""
    if node is None:
        return None
    if not isinstance(node, Node) or node.op != "placeholder":
        return _COMPUTED
    name = g.params.get(node.name) or g.buffers.get(node.name)
    return name if name is not None else g.constants.get(node.name, _COMPUTED)


def _affine_step(node, g: ExportedGraph) -> tuple[Node, Affine | None, Node | None] | None:
    """(input, step, tensor operand) when ``node`` is an affine map of its input by fixed
    tensors (step None: a view), else None. Shapes are checked by ``_with_affine``."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    t, args = node.target, node.args
    if t in AFFINE_VIEWS:
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


def _with_affine(node, g: ExportedGraph) -> Projection | None:
    """A projection followed by per-feature affine maps that end at ``node``: an eval-mode
    BatchNorm over its features, ``x · s + t`` with one value of ``s`` / ``t`` per feature,
    views that keep the features last (LeViT: flatten → BatchNorm1d → reshape back). Still
    one projection; building folds the maps into its weight and bias."""
    chain: list[tuple[Node, Node, Affine | None, Node | None]] = []  # (node, input, step, c)
    n = node
    while (proj := _biased_projection(n, g.params)) is None:
        step = _affine_step(n, g)
        if step is None or len(chain) >= MAX_REGION:
            return None
        chain.append((n, *step))
        n = step[0]
    if not any(step is not None for _, _, step, _ in chain) or proj.shape is None:
        return None
    features, dim = proj.shape[0], proj.channels_dim
    inside = {proj.output} | {c[0] for c in chain}
    for n, src, step, operand in chain:
        shape, src_shape = shape_of(n), shape_of(src)
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
                shape_of(operand), len(shape), len(shape) - 1 if dim == -1 else 1, features):
            return None  # (a per-feature operand of no higher rank broadcasts nothing)
    if any(u not in inside for u in proj.output.users):
        return None
    steps = [step for _, _, step, _ in reversed(chain) if step is not None]
    nodes = proj.nodes + [c[0] for c in reversed(chain)]
    return replace(proj, output=node, nodes=nodes, affine=steps)


def as_projection(node: Node, g: ExportedGraph) -> Projection | None:
    """The projection whose output is ``node``, if it is one: with its bias, if added, and
    the per-feature affine maps after it that end at ``node``, if any."""
    return _biased_projection(node, g.params) or _with_affine(node, g)
