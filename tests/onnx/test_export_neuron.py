"""moefy.export_onnx on method="neuron" models: NeuronFFN / SparseLinear export as their masked
dense expression in standard ops (thresholds as initializers) under every target, ONNX Runtime
equals PyTorch on a prefill batch, a token with a score at a threshold is excused (counted),
and a wrong graph still fails."""

import copy
import math
import re

import numpy as np
import onnx
import pytest
import torch
import transformers

import moefy
from moefy.errors import ExportToleranceError
from moefy.layers.neuron import NeuronFFN
from moefy.onnx import check_tensorrt_ops, validate

# (target, kernel, selection, ffn_only)
EXPORTS = (
    ("ort", None, "input", False),
    ("ort", "moe_op", "gate", False),
    ("standard", None, "gate", True),
)
MASK_OPS = {"Abs", "Mul", "LessOrEqual", "Not", "Where", "MatMul"}


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg).eval()


def neuron_llama(selection="input", ffn_only=False):
    g = torch.Generator().manual_seed(1)
    data = [{"input_ids": torch.randint(0, 96, (4, 24), generator=g)} for _ in range(3)]
    return moefy.convert(tiny_llama(), moefy.MoEConfig(method="neuron", active=0.5,
                                                       selection=selection,
                                                       ffn_only=ffn_only),
                         calibration_data=data)


def assert_session_matches(model, out) -> None:
    """A prefill batch of another size than the export's, through an ONNX Runtime session:
    it equals PyTorch within the export's tolerance."""
    x = torch.randint(0, 96, (3, 28), generator=torch.Generator().manual_seed(3))
    session = moefy.runtime.Session(out.path)
    got = next(iter(session.run({"input_ids": x}, ignore_extra=True).values()))
    with torch.no_grad():
        ref = model(input_ids=x).logits
    assert float((got - ref).abs().max() / ref.abs().max()) <= out.tolerance


def excused(out) -> int:
    counts = [int(m[1]) for n in out.notes if (m := re.search(r"excused (\d+) token", n))]
    assert len(counts) <= 1, out.notes
    return sum(counts)


@pytest.mark.parametrize("target, kernel, selection, ffn_only", EXPORTS)
def test_a_neuron_llama_exports_validates_and_matches_a_prefill(tmp_path, target, kernel,
                                                                 selection, ffn_only):
    model = neuron_llama(selection, ffn_only)
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    out = moefy.export_onnx(model, tmp_path / "m.onnx", {"input_ids": ids}, target=target,
                            kernel=kernel)
    assert len(out.max_diff) == 2 and max(out.max_diff) <= out.tolerance
    assert out.moe_layers == out.neuron_layers == 2
    assert out.sparse_projections == (0 if ffn_only else 8)
    assert any("threshold selection exported as standard ONNX ops" in n for n in out.notes)
    assert any("moe_op" in n for n in out.notes) == (kernel == "moe_op")
    graph = onnx.load(str(out.path)).graph
    assert MASK_OPS <= {n.op_type for n in graph.node}
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)  # no com.microsoft op
    # the thresholds travel as weights of the graph, not as constants folded into it
    assert any(i.name.endswith("mlp.h_threshold") for i in graph.initializer)
    if target == "standard":
        assert check_tensorrt_ops(out.path) == []
    assert_session_matches(model, out)


def at_a_threshold():
    """A NeuronFFN whose input threshold sits one float above token 0's score on channel 3
    (dropped in PyTorch), and its copy one float below it (kept), as rounding in ONNX
    Runtime may do; the dropped channel changes token 0's output far above the tolerance."""
    torch.manual_seed(0)
    layer = NeuronFFN(16, 32, activation="silu", gated=True)
    layer.load_dense(torch.randn(32, 16), torch.randn(16, 32), torch.randn(32, 16))
    x = torch.randn(32, 16)
    score = (x[0, 3].abs() * layer.in_scale[3]).float()
    pair = []
    for toward in (math.inf, -math.inf):
        m = copy.deepcopy(layer).eval()
        m.in_threshold.fill_(float(np.nextafter(score.numpy(), np.float32(toward))))
        pair.append(m)
    return pair, (x,)


def export_other_graph(monkeypatch, tmp_path, model, inputs):
    """export_onnx's validation runs the graph exported from ``model`` from now on."""
    (tmp_path / "other").mkdir()
    other = moefy.export_onnx(model, tmp_path / "other" / "m.onnx", inputs, validate=False)
    monkeypatch.setattr(validate, "Session", lambda path, device: moefy.runtime.Session(
        other.path, device=device))


def test_a_score_at_a_threshold_kept_otherwise_exports_with_a_note(tmp_path, monkeypatch):
    (model, flipped), x = at_a_threshold()
    with torch.no_grad():
        rows = (model(*x) - flipped(*x)).abs().amax(-1) / model(*x).abs().max()
    assert rows[0] > 1e-3 and (rows[1:] == 0).all()  # the flip is real, and token 0's only
    export_other_graph(monkeypatch, tmp_path, flipped, x)
    out = moefy.export_onnx(model, tmp_path / "m.onnx", x)
    assert max(out.max_diff) <= out.tolerance and excused(out) >= 1
    assert any("of a neuron layer's threshold" in n for n in out.notes)
    assert not model._forward_hooks  # the hooks that read the scores are gone
    monkeypatch.setattr(validate, "NEAR_THRESHOLD", 0.0)  # no excuse: the same export fails
    with pytest.raises(ExportToleranceError):
        moefy.export_onnx(model, tmp_path / "n.onnx", x)


def test_a_graph_with_other_weights_still_fails(tmp_path, monkeypatch):
    """The flipped graph with one down-projection row 1% off: tokens far from any threshold
    differ, and excusing the one at the threshold does not hide it."""
    (model, flipped), x = at_a_threshold()
    with torch.no_grad():
        flipped.w_out_t[5] *= 1.01
    export_other_graph(monkeypatch, tmp_path, flipped, x)
    with pytest.raises(ExportToleranceError, match="differs from PyTorch"):
        moefy.export_onnx(model, tmp_path / "m.onnx", x)
    assert not (tmp_path / "m.onnx").exists()


def test_a_sequence_selection_is_refused_before_anything_is_written(tmp_path):
    from moefy.errors import ExportInputError

    model = neuron_llama("sequence", ffn_only=True)
    with pytest.raises(ExportInputError, match="selection='sequence' picks its neurons from "
                                               "the prompt"):
        moefy.export_onnx(model, tmp_path / "m.onnx",
                          example_inputs={"input_ids": torch.randint(0, 96, (1, 8))})
    assert not any(tmp_path.iterdir())


def test_a_static_set_exports_as_plain_smaller_matrix_products(tmp_path):
    model = neuron_llama("static")
    ids = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    out = moefy.export_onnx(model, tmp_path / "m.onnx", {"input_ids": ids}, target="standard")
    assert max(out.max_diff) <= out.tolerance and out.neuron_layers == 2
    graph = onnx.load(str(out.path)).graph
    # no selection: no threshold reaches the graph, no comparison or select touches an FFN
    assert not any("threshold" in i.name for i in graph.initializer)
    uses = sorted(n.op_type for n in graph.node for i in n.input if ".mlp." in i)
    assert uses == ["Add"] * 4 + ["MatMul"] * 4  # per FFN: [gate; up] and down, two biases
    assert_session_matches(model, out)
