"""moefy.export_onnx on PEER layers: standard ONNX ops only, ONNX Runtime equals PyTorch at
other token counts, TensorRT's op table, BatchNorm folded, TopK's k static, big tables."""

import os

import onnx
import pytest
import torch
import torch.nn as nn

import moefy
from moefy.errors import ExportInputError
from moefy.onnx import check_tensorrt_ops
from tests.passes.models import PreNormResidual as Block

# (target, layer options): the paper's layer, sigmoid + gated + biases, a converted FFN's
# unweighted sum, no BatchNorm; top_k 6 above a half's 4 sub-keys (k' = min(k, n) per half)
LAYERS = (
    ("standard", dict(activation="gelu", score="softmax")),
    ("standard", dict(activation="silu", score="sigmoid", gated=True, bias=True)),
    ("standard", dict(activation="relu", score="none", bias=True, top_k=6)),
    ("ort", dict(activation="gelu", score="softmax")),
    ("ort", dict(activation="gelu_tanh", score="softmax", gated=True, query_norm=None)),
)
# what the retrieval must be made of (the experts: gathers, MatMul or ReduceSum)
RETRIEVAL_OPS = {"TopK", "Add", "Div", "Mod", "GatherElements"}


def peer(**cfg):
    """A PEER whose BatchNorm has non-trivial running statistics and affine terms (the
    folding into plain ops must carry them) and whose parameters are all non-zero."""
    cfg = {"heads": 2, "top_k": 4, **cfg}
    torch.manual_seed(0)
    layer = moefy.PEER(16, (4, 8), **cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        if layer.query_norm is not None:
            layer.query_norm.running_mean.copy_(torch.randn(layer.query_norm.num_features) * .1)
            layer.query_norm.running_var.uniform_(0.5, 2.0)
    return layer.eval()


def ops(path):
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path)).graph.node}


def first_output(session, x):
    return next(iter(session.run({session.input_names[0]: x}).values()))


@pytest.mark.parametrize("target,cfg", LAYERS)
def test_peer_layer_exports_with_standard_ops_and_matches(tmp_path, target, cfg):
    layer = peer(**cfg)
    out = moefy.export_onnx(layer, tmp_path / "p.onnx", (torch.randn(7, 16),), target=target)
    # validated at the example's 7 tokens and at another token count (the axis is dynamic)
    assert len(out.max_diff) == 2 and max(out.max_diff) <= out.tolerance
    assert out.moe_layers == 1 and out.peer_layers == 1
    assert any("1 PEER layer(s)" in n for n in out.notes)
    found = ops(out.path)
    assert {d for d, _ in found} == {"ai.onnx"}  # no custom domain
    names = {t for _, t in found}
    assert RETRIEVAL_OPS <= names and "BatchNormalization" not in names  # BatchNorm folded
    assert names & {"Softmax", "Sigmoid"} == ({"Softmax"} if cfg["score"] == "softmax" else
                                               {"Sigmoid"} if cfg["score"] == "sigmoid"
                                               else set())
    assert check_tensorrt_ops(out.path) == []
    session = moefy.runtime.Session(out.path)
    for t in (1, 13):  # one token, and a third token count
        x = torch.randn(t, 16)
        with torch.no_grad():
            torch.testing.assert_close(first_output(session, x), layer(x), rtol=1e-4,
                                       atol=1e-5)


def test_topk_is_static(tmp_path):
    """TensorRT needs TopK's k as a constant: every TopK's k is an initializer or a
    Constant node, never computed from the input's shape."""
    out = moefy.export_onnx(peer(), tmp_path / "p.onnx", (torch.randn(5, 16),),
                            target="standard")
    graph = onnx.load(str(out.path)).graph
    constants = {i.name for i in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output}
    topks = [n for n in graph.node if n.op_type == "TopK"]
    assert len(topks) == 3  # half A, half B, the k² candidates
    assert all(n.input[1] in constants for n in topks)


def small_model():
    torch.manual_seed(0)
    mlp = lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))  # noqa: E731
    return nn.Sequential(Block(mlp()), Block(peer(score="sigmoid", gated=True,
                                                  activation="silu")), Block(mlp()))


@pytest.mark.parametrize("target", ("standard", "ort"))
def test_model_with_peer_in_the_middle_block(tmp_path, target):
    """(batch, sequence, hidden) input, both dynamic; exported from training mode, which
    exports the eval function (BatchNorm with running statistics), says so, and restores
    the flags. The file loaded back with moefy.runtime.Session gives PyTorch's outputs."""
    model = small_model().train()
    out = moefy.export_onnx(model, tmp_path / "m.onnx", (torch.randn(2, 5, 16),),
                            target=target)
    assert all(m.training for m in model.modules())
    assert any("1.ffn: in training mode; exported in eval mode" in n for n in out.notes)
    assert len(out.max_diff) == 2 and max(out.max_diff) <= out.tolerance
    assert out.moe_layers == out.peer_layers == 1
    if target == "standard":
        assert check_tensorrt_ops(out.path) == []
    dims = onnx.load(str(out.path)).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and dims[1].dim_param and dims[2].dim_value == 16
    session = moefy.runtime.Session(out.path)
    x = torch.randn(3, 9, 16)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(first_output(session, x), model(x), rtol=1e-4, atol=1e-5)


def test_a_non_finite_token_stays_on_its_token(tmp_path):
    layer = peer()
    out = moefy.export_onnx(layer, tmp_path / "p.onnx", (torch.randn(6, 16),),
                            target="standard", validate=False)
    session = moefy.runtime.Session(out.path)
    x = torch.randn(20, 16)
    dirty = x.clone()
    dirty[3], dirty[11] = float("nan"), 1e30
    clean, got = first_output(session, x), first_output(session, dirty)
    keep = [i for i in range(20) if i not in (3, 11)]
    torch.testing.assert_close(got[keep], clean[keep], rtol=0, atol=0)


def test_a_slot_of_weight_zero_is_not_computed(tmp_path):
    """Softmax over scores 2000 and 1250 gives the second slot a weight of exactly 0; that
    expert's rows hold inf, which 0 · inf would turn into NaN. The graph masks such slots
    (Where), as PyTorch skips them."""
    layer = moefy.PEER(4, (2, 3), heads=1, top_k=2, key_dim=2, query_norm=None).eval()
    with torch.no_grad():
        layer.query.weight.copy_(torch.eye(2, 4) * 1000)
        layer.query.bias.zero_()
        layer.keys_a.copy_(torch.tensor([[1.0], [-1.0]]))
        layer.keys_b.copy_(torch.tensor([[1.0], [0.25], [-1.0]]))
        layer.up[1] = float("inf")
    x = torch.tensor([[1.0, 1.0, 0.5, -0.5]]).repeat(3, 1)
    route = layer.route(x)
    assert route.ids[0, 0].tolist() == [0, 1] and route.weights[0, 0, 1] == 0
    out = moefy.export_onnx(layer, tmp_path / "p.onnx", (x,), target="standard")
    got = first_output(moefy.runtime.Session(out.path), x)
    with torch.no_grad():
        ref = layer(x)
    assert torch.isfinite(ref).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got, ref)


def test_half_precision_is_refused_before_anything_is_written(tmp_path):
    layer = peer().half()
    with pytest.raises(ExportInputError, match="float32 PEER.*model.float()"):
        moefy.export_onnx(layer, tmp_path / "p.onnx", (torch.randn(5, 16).half(),))
    assert list(tmp_path.iterdir()) == []


def test_large_expert_tables_are_stored_once(tmp_path):
    """N = 256² experts, H = 64: the two (N, H) tables are initializers, stored once each
    (no constant-folded copies), and the file is about the parameters' size (33.7 MB)."""
    layer = moefy.PEER(64, 256 * 256, heads=2, top_k=4, key_dim=32).eval()
    out = moefy.export_onnx(layer, tmp_path / "big.onnx", (torch.randn(6, 64),),
                            target="standard")
    assert max(out.max_diff) <= out.tolerance
    params = sum(p.numel() * p.element_size() for p in layer.parameters())
    assert params < os.path.getsize(out.path) < params * 1.01
    graph = onnx.load(str(out.path), load_external_data=False).graph
    tables = [i for i in graph.initializer if list(i.dims) == [256 * 256, 64]]
    assert len(tables) == 2


def topk_graph(k_input):
    """x (1, 8) → TopK(x, K) where K is a Constant (static) or the input's width (computed)."""
    h = onnx.helper
    if isinstance(k_input, int):
        k_node = h.make_node("Constant", [], ["k"], value=h.make_tensor(
            "k", onnx.TensorProto.INT64, [1], [k_input]))
    else:
        k_node = h.make_node("Shape", ["x"], ["k"], start=1, end=2)
    top = h.make_node("TopK", ["x", "k"], ["v", "i"], name="top")
    graph = h.make_graph(
        [k_node, top], "g", [h.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 8])],
        [h.make_tensor_value_info("v", onnx.TensorProto.FLOAT, None),
         h.make_tensor_value_info("i", onnx.TensorProto.INT64, None)])
    return h.make_model(graph)


def test_tensorrt_check_reads_topk_k():
    """TensorRT takes TopK with a constant K below 3840: a PEER's top_k must be one."""
    assert check_tensorrt_ops(topk_graph(16)) == []
    assert check_tensorrt_ops(topk_graph(4000)) == [
        "ai.onnx::TopK (top): K=4000, TensorRT takes K < 3840"]
    assert "K is computed at run time" in check_tensorrt_ops(topk_graph("shape"))[0]


def test_converted_model_exports(tmp_path):
    """MoEConfig(method="peer"): d_ff = 53 neurons on a 6×9 grid (one inert pad expert),
    unweighted sum ("none" scores); exports and validates like a PEER built by hand."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 53), nn.GELU(), nn.Linear(53, 16)).eval()
    converted = moefy.convert(dense, moefy.MoEConfig(method="peer", top_k=8),
                              example_inputs=(torch.randn(8, 16),))
    assert sum(isinstance(m, moefy.PEER) for m in converted.modules()) == 1
    out = moefy.export_onnx(converted, tmp_path / "c.onnx", (torch.randn(2, 7, 16),),
                            target="standard")
    assert out.moe_layers == out.peer_layers == 1 and len(out.max_diff) == 2
    assert max(out.max_diff) <= out.tolerance and check_tensorrt_ops(out.path) == []
    session = moefy.runtime.Session(out.path)
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        torch.testing.assert_close(first_output(session, x), converted(x), rtol=1e-4,
                                   atol=1e-5)
