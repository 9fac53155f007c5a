"""Which ONNX ops TensorRT's parser takes: a checker for exported graphs.

The table lists the ai.onnx ops TensorRT's ONNX parser supports that a transformer with a
static-capacity MoE needs (TopK sorted with K < 3840, OneHot with constant depth, CumSum,
ScatterND without reduction, batched MatMul / Einsum; FACTS.md). Data-dependent shapes
(NonZero, Unique, Compress, Loop) and custom domains (com.microsoft) are outside it, and so
is a TopK whose K is computed at run time or is 3840 or more.
"""

from __future__ import annotations

import math

import onnx
from onnx import numpy_helper

TENSORRT_OPS = frozenset("""
Abs Acos Add And ArgMax ArgMin Asin Atan BatchNormalization Cast Ceil Clip Concat Constant
ConstantOfShape Conv Cos CumSum Div Dropout Einsum Elu Equal Erf Exp Expand Flatten Floor
Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual HardSigmoid HardSwish
Identity
InstanceNormalization IsInf IsNaN LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax
MatMul Max
Mean Min Mod Mul Neg Not OneHot Or Pad Pow PRelu Range Reciprocal ReduceL2 ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum Relu Reshape Resize ScatterElements
ScatterND Selu Shape Sigmoid Sign Sin Slice Softmax Softplus Softsign Split Sqrt Squeeze Sub
Round Size Sum Tan Tanh Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())
TOPK_MAX_K = 3839  # TensorRT's TopK takes K < 3840, given as a constant


def check_tensorrt_ops(model: onnx.ModelProto | str) -> list[str]:
    """The ops of ``model`` (a ModelProto or a path) outside TensorRT's supported table, as
    "domain::Op (node name)" strings; empty when TensorRT's parser takes every node
    (subgraphs and local functions included). A TopK whose K is not a constant below 3840
    is listed with the reason (a PEER layer's TopKs take its top_k)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    bad: list[str] = []
    constants = _constant_ints(model)

    def visit(nodes):
        for node in nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
                if not (node.domain not in ("", "ai.onnx") and node.op_type in local):
                    bad.append(f"{node.domain or 'ai.onnx'}::{node.op_type} ({node.name})")
            elif node.op_type == "TopK":
                k = constants.get(node.input[1]) if len(node.input) > 1 else None
                if k is None:
                    bad.append(f"ai.onnx::TopK ({node.name}): K is computed at run time; "
                               "TensorRT needs a constant K")
                elif k > TOPK_MAX_K:
                    bad.append(f"ai.onnx::TopK ({node.name}): K={k}, TensorRT takes "
                               f"K < {TOPK_MAX_K + 1}")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)

    local = {f.name for f in model.functions}
    visit(model.graph.node)
    for f in model.functions:  # a local function is fine when its body is
        visit(f.node)
    return bad


def _constant_ints(model: onnx.ModelProto) -> dict[str, int]:
    """Names of the one-element integer initializers and Constant outputs, with their value
    (TopK's K arrives as one of them when it is static)."""
    tensors = {t.name: t for t in model.graph.initializer}

    def collect(nodes):
        for node in nodes:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value":
                        tensors[node.output[0]] = attr.t
                    elif attr.name == "value_int":
                        tensors[node.output[0]] = onnx.helper.make_tensor(
                            "k", onnx.TensorProto.INT64, [], [attr.i])
                    elif attr.name == "value_ints":
                        tensors[node.output[0]] = onnx.helper.make_tensor(
                            "k", onnx.TensorProto.INT64, [len(attr.ints)], list(attr.ints))
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    collect(attr.g.node)

    collect(model.graph.node)
    for f in model.functions:
        collect(f.node)
    return {name: int(numpy_helper.to_array(t).reshape(-1)[0]) for name, t in tensors.items()
            if t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)
            and math.prod(t.dims) == 1 and t.data_location != onnx.TensorProto.EXTERNAL}
