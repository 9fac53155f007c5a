"""Which ONNX ops TensorRT's parser takes: a checker for exported graphs.

The table lists the ai.onnx ops TensorRT's ONNX parser supports that a transformer with a
static-capacity MoE needs (TopK sorted with K < 3840, OneHot with constant depth, CumSum,
ScatterND without reduction, batched MatMul / Einsum; FACTS.md). Data-dependent shapes
(NonZero, Unique, Compress, Loop) and custom domains (com.microsoft) are outside it.
"""

from __future__ import annotations

import onnx

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


def check_tensorrt_ops(model: onnx.ModelProto | str) -> list[str]:
    """The ops of ``model`` (a ModelProto or a path) outside TensorRT's supported table, as
    "domain::Op (node name)" strings; empty when TensorRT's parser takes every node
    (subgraphs and local functions included)."""
    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    bad: list[str] = []

    def visit(nodes):
        for node in nodes:
            if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_OPS:
                if not (node.domain not in ("", "ai.onnx") and node.op_type in local):
                    bad.append(f"{node.domain or 'ai.onnx'}::{node.op_type} ({node.name})")
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g.node)

    local = {f.name for f in model.functions}
    visit(model.graph.node)
    for f in model.functions:  # a local function is fine when its body is
        visit(f.node)
    return bad
