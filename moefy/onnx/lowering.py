"""Lowering of ``moefy::expert_ffn`` for the ONNX exporter, one translation per target/kernel.

    "ort", "loop":      per expert e: NonZero(indices == e) → Gather rows → MatMul → activation
    (the default)       → × routing weight → MatMul; Concat all experts' rows, Gather them back
                        per (token, slot) by the inverse permutation, ReduceSum the k slots,
                        + dense_weights @ b_out
    "ort", "moe_op":    expert_ffn(x, w, i, experts)  ⇒  logits = scatter(log w at i, −1e30)
                        → com.microsoft.MoE(x, logits, fc1, fc2; k, normalize=1) · Σ_j w_j
    "standard":         OneHot → CumSum (slot of each assignment in its expert) → ScatterND
                        into (E, C + 1, H) buffers → batched MatMul, activation, MatMul
                        → GatherND back → weighted sum

Outputs are (T, O), O = w_out's rows: H, or another width for a block that changes it (a
classifier head). The loop and the standard target take any O; ONNX Runtime's MoE op returns
its input's width, so export refuses kernel="moe_op" for such a layer (``moe_op_expressible``).

The loop does only the routed work, with row counts known at run time (ONNX Runtime allows
that); on ONNX Runtime's CPU EP it beats the fused MoE kernel on batches of thousands of
tokens, while a few tokens through 16 experts pay ~11 nodes per expert
(benchmarks/bench_onnx.py). GELUs there use ONNX Runtime's BiasGelu / FastGelu kernels.

ONNX Runtime's MoE weights the experts it picks by a softmax of the logits it is given,
renormalised over its top-k. Handing it log(w) at the chosen experts (and −1e30 elsewhere)
makes it pick exactly moefy's experts with weights w / Σw; multiplying by Σw afterwards gives
any weights moefy's router produced (softmax, unweighted sums, sigmoid, top-p, dropped
assignments), so one translation covers every combine mode.

The standard target has only static shapes: each expert gets a buffer of C rows, C = T
(dropless) or ceil(T·k/E·capacity_factor); a spare row C takes what the router dropped, and
its results are selected away (Where), never multiplied by 0, so no token's NaN or inf
reaches another token (the loop gathers a zero row instead; the fused op selects 0 for a
token whose every assignment was dropped).
"""

from __future__ import annotations

import math

import onnx
import torch
from onnxscript import FLOAT, INT64
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

_NEG = -1e30  # "not chosen" logit: exp(_NEG − max) is exactly 0 in float32


def _moe_schema() -> onnx.defs.OpSchema:
    P = onnx.defs.OpSchema.FormalParameter
    Opt = onnx.defs.OpSchema.FormalParameterOption.Optional
    A = onnx.defs.OpSchema.Attribute
    AT = onnx.defs.OpSchema.AttrType
    inputs = [P("input", "T"), P("router_probs", "T"), P("fc1_experts_weights", "T"),
              P("fc1_experts_bias", "T", param_option=Opt), P("fc2_experts_weights", "T"),
              P("fc2_experts_bias", "T", param_option=Opt),
              P("fc3_experts_weights", "T", param_option=Opt),
              P("fc3_experts_bias", "T", param_option=Opt)]
    attrs = [A("activation_type", AT.STRING, "relu | gelu | silu | swiglu | identity"),
             A("k", AT.INT, "experts per token"),
             A("normalize_routing_weights", AT.INT, "renormalise over the top-k"),
             A("swiglu_fusion", AT.INT, "1: fc1 rows interleaved gate/up"),
             A("activation_alpha", AT.FLOAT, "swiglu alpha"),
             A("activation_beta", AT.FLOAT, "swiglu beta"),
             A("use_sparse_mixer", AT.INT, "sparse mixer routing")]
    return onnx.defs.OpSchema(
        "MoE", "com.microsoft", 1, inputs=inputs, outputs=[P("output", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "float types")],
        attributes=attrs)


def _unary_schema(name: str, with_bias: bool) -> onnx.defs.OpSchema:
    P = onnx.defs.OpSchema.FormalParameter
    inputs = [P("X", "T")] + ([P("bias", "T")] if with_bias else [])
    return onnx.defs.OpSchema(
        name, "com.microsoft", 1, inputs=inputs, outputs=[P("Y", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"],
                           "float types")])


MSFT = Opset("com.microsoft", 1)
ORT_MOE = Op(MSFT, "MoE", _moe_schema())
# ONNX Runtime's fused GELUs: BiasGelu = erf-GELU(X + bias), FastGelu = tanh-GELU(X + bias)
ORT_BIAS_GELU = Op(MSFT, "BiasGelu", _unary_schema("BiasGelu", True))
ORT_FAST_GELU = Op(MSFT, "FastGelu", _unary_schema("FastGelu", True))

# moefy activation → ONNX Runtime MoE activation_type (plain experts)
ORT_ACTIVATIONS = {"relu": "relu", "gelu_tanh": "gelu", "gelu": "gelu", "silu": "silu"}


def moe_op_expressible(hidden_size: int, output_size: int) -> str | None:
    """None when ONNX Runtime's MoE op can map H → O, else why not: its output has its
    input's width (fc2_experts_weights must be (E, H, I))."""
    if output_size == hidden_size:
        return None
    return (f"an output width {output_size} other than the input width {hidden_size} (ONNX "
            "Runtime's MoE returns its input's width)")


def ort_expressible(activation: str, gated: bool) -> str | None:
    """None when ONNX Runtime's MoE op can run these experts, else why not."""
    if activation == "custom":
        return ("a custom activation module (ONNX Runtime's MoE has relu, gelu (tanh form), "
                "silu and SwiGLU only)")
    if gated:
        return None if activation == "silu" else (
            f"gated {activation} experts (ONNX Runtime's MoE has only SwiGLU among gated "
            "activations)")
    return None if activation in ORT_ACTIVATIONS else (
        f"activation {activation!r} (ONNX Runtime's MoE has relu, gelu (tanh form), silu)")


def _interleave(gate, up, experts: int, rows: int, *tail: int):
    """[g0, u0, g1, u1, ...] along the row axis: ONNX Runtime's fused SwiGLU layout."""
    both = op.Concat(op.Unsqueeze(gate, [2]), op.Unsqueeze(up, [2]), axis=2)
    return op.Reshape(both, op.Constant(value_ints=[experts, 2 * rows, *tail]))


def ort_expert_ffn(x, weights, indices, w_in, w_out, w_gate, b_in, b_gate, b_out,
                   activation: str, capacity_factor: float = 0.0):
    E, I, H = (int(d) for d in w_in.shape)
    k = int(weights.shape[1])
    logw = op.Max(op.Log(weights), op.Constant(value_float=_NEG))  # log 0 = −inf → −1e30
    rows = op.Shape(x, start=0, end=1)
    base = op.Expand(op.Constant(value_float=_NEG),
                     op.Concat(rows, op.Constant(value_ints=[E]), axis=0))  # (T, E)
    logits = op.ScatterElements(base, indices, logw, axis=1)
    attrs = dict(k=k, normalize_routing_weights=1)
    if w_gate is not None:
        fc1 = _interleave(w_gate, w_in, E, I, H)
        fc1_bias = None if b_in is None else _interleave(b_gate, b_in, E, I)
        attrs.update(activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                     activation_beta=0.0)
    else:
        fc1, fc1_bias = w_in, b_in
        attrs.update(activation_type=ORT_ACTIVATIONS[activation])
    y = ORT_MOE(x, logits, fc1, fc1_bias, w_out, b_out, **attrs)
    total = op.ReduceSum(weights, op.Constant(value_ints=[1]), keepdims=1)  # (T, 1)
    # a token whose every assignment was dropped has Σw = 0 but still went through the
    # experts (uniform logits): select 0, since an inf there times 0 would be NaN
    zero = op.Equal(total, op.Constant(value_float=0.0))
    return op.Where(zero, op.Constant(value_float=0.0), op.Mul(y, total))


def _activate(h, activation: str):
    if activation == "relu":
        return op.Relu(h)
    if activation == "squared_relu":
        r = op.Relu(h)
        return op.Mul(r, r)
    if activation == "gelu":  # exact: x · Φ(x) = x/2 · (1 + erf(x/√2))
        half = op.Mul(h, op.Constant(value_float=0.5))
        return op.Mul(half, op.Add(op.Constant(value_float=1.0),
                                   op.Erf(op.Mul(h, op.Constant(value_float=2 ** -0.5)))))
    if activation == "gelu_tanh":
        inner = op.Mul(op.Constant(value_float=math.sqrt(2 / math.pi)),
                       op.Add(h, op.Mul(op.Constant(value_float=0.044715),
                                        op.Mul(h, op.Mul(h, h)))))
        return op.Mul(op.Mul(h, op.Constant(value_float=0.5)),
                      op.Add(op.Constant(value_float=1.0), op.Tanh(inner)))
    if activation == "silu":
        return op.Mul(h, op.Sigmoid(h))
    if activation == "quick_gelu":
        return op.Mul(h, op.Sigmoid(op.Mul(h, op.Constant(value_float=1.702))))
    if activation == "hardswish":  # x · relu6(x + 3) / 6
        return op.HardSwish(h)
    raise ValueError(f"no standard-ops lowering for activation {activation!r}")


def standard_expert_ffn(x, weights, indices, w_in, w_out, w_gate, b_in, b_gate, b_out,
                        activation: str, capacity_factor: float = 0.0):
    E, I, H = (int(d) for d in w_in.shape)
    O = int(w_out.shape[1])
    k = int(weights.shape[1])
    c = lambda v: op.Constant(value_ints=v)  # noqa: E731
    t = op.Shape(x, start=0, end=1)  # (1,) tokens, int64
    # a slot is used unless its weight is exactly 0 (a NaN weight is used: its NaN shows)
    used = op.Cast(op.Not(op.Equal(weights, op.Constant(value_float=0.0))),
                   to=FLOAT.dtype)  # (T, k)
    flat_idx = op.Reshape(indices, c([-1]))  # (T·k,) token-major: earlier tokens first
    onehot = op.OneHot(flat_idx, op.Constant(value_int=E),
                       op.Constant(value_floats=[0.0, 1.0]), axis=-1)  # (T·k, E)
    onehot = op.Mul(onehot, op.Reshape(used, c([-1, 1])))
    # slot of each assignment inside its expert: running count (CumSum in float: TensorRT)
    slot = op.ReduceSum(op.Mul(op.CumSum(onehot, op.Constant(value_int=0)), onehot), c([1]),
                        keepdims=0)  # (T·k,) 1-based, 0 when unused
    slot = op.Sub(slot, op.Constant(value_float=1.0))
    if capacity_factor > 0:  # C = ceil(T·k/E·cf)
        cap = op.Ceil(op.Mul(op.Cast(t, to=FLOAT.dtype),
                             op.Constant(value_float=k / E * capacity_factor)))
    else:
        cap = op.Cast(t, to=FLOAT.dtype)  # dropless: an expert can get every token
    cap_i = op.Cast(cap, to=INT64.dtype)  # (1,)
    fits = op.And(op.GreaterOrEqual(slot, op.Constant(value_float=0.0)), op.Less(slot, cap))
    slot_i = op.Where(fits, op.Cast(slot, to=INT64.dtype), op.Squeeze(cap_i))  # spare
    where = op.Concat(op.Unsqueeze(flat_idx, c([1])), op.Unsqueeze(slot_i, c([1])), axis=1)
    token = op.Div(op.Range(op.Constant(value_int=0), op.Mul(op.Squeeze(t),
                                                             op.Constant(value_int=k)),
                            op.Constant(value_int=1)), op.Constant(value_int=k))  # (T·k,)
    rows = op.Gather(x, token, axis=0)  # (T·k, H)
    buf_shape = op.Concat(c([E]), op.Add(cap_i, c([1])), c([H]), axis=0)
    buf = op.ScatterND(op.Expand(op.Constant(value_float=0.0), buf_shape), where, rows)
    # batched expert FFN on (E, C + 1, H)
    h = op.MatMul(buf, op.Transpose(w_in, perm=[0, 2, 1]))  # (E, C + 1, I)
    if b_in is not None:
        h = op.Add(h, op.Unsqueeze(b_in, c([1])))
    if w_gate is not None:
        g = op.MatMul(buf, op.Transpose(w_gate, perm=[0, 2, 1]))
        if b_gate is not None:
            g = op.Add(g, op.Unsqueeze(b_gate, c([1])))
        h = op.Mul(_activate(g, activation), h)
    else:
        h = _activate(h, activation)
    y = op.MatMul(h, op.Transpose(w_out, perm=[0, 2, 1]))  # (E, C + 1, O)
    if b_out is not None:
        y = op.Add(y, op.Unsqueeze(b_out, c([1])))
    back = op.GatherND(y, where)  # (T·k, O)
    # Dropped and unused assignments all read the spare row C, which holds whichever of them
    # was scattered last: one token's NaN or inf there, multiplied by 0, would reach every
    # other token that lost an assignment. Select instead of multiplying; w · 0 keeps a
    # token's own NaN weight (a NaN input) on that token alone.
    w = op.Reshape(weights, c([-1, 1]))  # (T·k, 1)
    mine = op.Where(op.Reshape(fits, c([-1, 1])), op.Mul(back, w),
                    op.Mul(w, op.Constant(value_float=0.0)))  # (T·k, O)
    out = op.Reshape(mine, op.Concat(op.Reshape(t, c([1])), c([k, O]), axis=0))
    return op.ReduceSum(out, c([1]), keepdims=0)


def loop_expert_ffn(x, weights, indices, w_in, w_out, w_gate, b_in, b_gate, b_out,
                    activation: str, capacity_factor: float = 0.0):
    """One block of ordinary nodes per expert, sized by the data: the assignments routed to
    expert e (NonZero), Gather of their token rows, MatMul → activation → × routing weight →
    MatMul; then all experts' rows are concatenated and gathered back per (token, slot)
    through the inverse permutation, and the k slots of each token summed.

    The routing weight multiplies the hidden rows (I wide, not H); the output biases of all
    experts are added at once as dense_weights (T, E) @ b_out (E, O). Assignments with weight
    0 (dropped by capacity) are not computed: their slots gather a zero row. One expert chosen
    twice for a token (hash routing) is two assignments like any other.
    """
    E, I = (int(d) for d in w_in.shape[:2])
    O = int(w_out.shape[1])
    k = int(weights.shape[1])
    c = lambda v: op.Constant(value_ints=v)  # noqa: E731
    flat_idx = op.Reshape(indices, c([-1]))  # (T·k,) slot p = token p // k, choice p % k
    flat_w = op.Reshape(weights, c([-1, 1]))
    live = op.Not(op.Equal(op.Reshape(weights, c([-1])), op.Constant(value_float=0.0)))
    fused_gelu = None if w_gate is not None else {"gelu": ORT_BIAS_GELU,
                                                  "gelu_tanh": ORT_FAST_GELU}.get(activation)
    ys, slots = [], []
    for e in range(E):
        pick = op.Constant(value_int=e)
        pos = op.Reshape(op.NonZero(op.And(op.Equal(flat_idx, pick), live)), c([-1]))
        rows = op.Gather(x, op.Div(pos, op.Constant(value_int=k)), axis=0)  # (n_e, H)
        h = op.MatMul(rows, op.Transpose(op.Gather(w_in, pick, axis=0), perm=[1, 0]))
        if fused_gelu is not None:  # ONNX Runtime's bias + GELU kernel
            bias = (op.Gather(b_in, pick, axis=0) if b_in is not None
                    else op.Expand(op.Constant(value_float=0.0), c([I])))
            h = fused_gelu(h, bias)
        else:
            if b_in is not None:
                h = op.Add(h, op.Gather(b_in, pick, axis=0))
            if w_gate is not None:
                g = op.MatMul(rows, op.Transpose(op.Gather(w_gate, pick, axis=0), perm=[1, 0]))
                if b_gate is not None:
                    g = op.Add(g, op.Gather(b_gate, pick, axis=0))
                h = op.Mul(_activate(g, activation), h)
            else:
                h = _activate(h, activation)
        h = op.Mul(h, op.Gather(flat_w, pos, axis=0))
        ys.append(op.MatMul(h, op.Transpose(op.Gather(w_out, pick, axis=0), perm=[1, 0])))
        slots.append(pos)
    slots = op.Concat(*slots, axis=0)  # (n,) the slot each computed row belongs to
    n = op.Shape(slots)  # (1,)
    ycat = op.Concat(*ys, op.Expand(op.Constant(value_float=0.0), c([1, O])), axis=0)
    # inverse permutation: row of ycat for each slot; slots not computed get row n (zeros)
    inv = op.ScatterElements(op.Expand(op.Squeeze(n), op.Shape(flat_idx)), slots,
                             op.Range(op.Constant(value_int=0), op.Squeeze(n),
                                      op.Constant(value_int=1)), axis=0)
    if k == 1:
        out = op.Gather(ycat, inv, axis=0)  # (T, O)
    else:
        out = op.ReduceSum(op.Gather(ycat, op.Reshape(inv, c([-1, k])), axis=0), c([1]),
                           keepdims=0)  # (T, O)
    if b_out is not None:  # Σ_j w_j · b_out[e_j]; OneHot sums an expert chosen twice
        onehot = op.OneHot(indices, op.Constant(value_int=E),
                           op.Constant(value_floats=[0.0, 1.0]), axis=-1)  # (T, k, E)
        dense_w = op.ReduceSum(op.Mul(onehot, op.Unsqueeze(weights, c([2]))), c([1]),
                               keepdims=0)  # (T, E)
        out = op.Add(out, op.MatMul(dense_w, b_out))
    return out


TRANSLATIONS = {("ort", "loop"): loop_expert_ffn, ("ort", "moe_op"): ort_expert_ffn,
                ("standard", "buffers"): standard_expert_ffn}


def translation_table(target: str, kernel: str) -> dict:
    return {torch.ops.moefy.expert_ffn.default: TRANSLATIONS[target, kernel]}
