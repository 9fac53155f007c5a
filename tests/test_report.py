"""moefy.report: the static table, and with data: load, usage, unevenness, error, heatmap."""

import math
import re
import sys

import pytest
import torch
import torch.nn as nn

import moefy
from moefy.report import heatmap_size


def converted(top_k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16),
                          nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)).eval()
    x = torch.randn(32, 16)
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=top_k, partition="random")
    return model, moefy.convert(model, cfg, example_inputs=(x,))


def test_static_rows():
    _, moe_model = converted(2)
    text = moefy.report(moe_model)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["name", "method", "E", "k"]
    assert len(lines) == 3 and len(text.layers) == 2
    assert text.layers[0]["FFN FLOPs"] == "25%"


def test_with_data_measures_load_usage_and_error():
    _, moe_model = converted(2)
    data = [(torch.randn(50, 16),) for _ in range(3)]
    rep = moefy.report(moe_model, data)
    for row in rep.layers:
        assert row["tokens"] == 150
        assert math.isclose(float(row["load"].sum()), 1.0, rel_tol=1e-6)
        z = row["load"][row["load"] > 0]
        assert math.isclose(row["uneven"], math.log(8) + float((z * z.log()).sum()),
                            rel_tol=1e-5)
        assert 0 < row["usage"] <= 1 and 0 < row["rel err"] < 1
    # first layer's load, by hand
    w, i = moe_model[0].route(torch.cat([x for (x,) in data]))
    load = torch.bincount(i.reshape(-1), minlength=8).float()
    torch.testing.assert_close(rep.layers[0]["load"], load / load.sum())


def test_every_expert_active_has_no_error():
    _, moe_model = converted(8)
    rep = moefy.report(moe_model, [(torch.randn(40, 16),)])
    assert all(row["rel err"] < 1e-5 and row["usage"] == 1.0 for row in rep.layers)
    assert all(row["uneven"] < 1e-6 for row in rep.layers)  # every expert, every token


@pytest.mark.parametrize("top_k", (2, 8))
def test_a_layer_whose_output_width_differs(top_k):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)).eval()  # 16 → 3
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=top_k, partition="random")
    moe_model = moefy.convert(model, cfg, example_inputs=(torch.randn(32, 16),))
    [row] = moefy.report(moe_model, [(torch.randn(50, 16),)]).layers
    assert row["tokens"] == 50 and row["FFN FLOPs"] == f"{top_k / 8:.0%}"
    assert (row["rel err"] < 1e-5) == (top_k == 8)  # error only where experts are skipped


def test_heatmap_is_a_png_of_layers_by_experts(tmp_path):
    image = pytest.importorskip("matplotlib.image")  # `make test` installs moefy[plot]
    _, moe_model = converted(2)
    path = tmp_path / "load.png"
    moefy.report(moe_model, [(torch.randn(40, 16),)], heatmap=path)
    pixels = image.imread(path)
    width, height = heatmap_size(2, 8)  # 2 layers × 8 experts, in inches
    assert pixels.shape[:2] == (round(height * 100), round(width * 100))
    assert pixels[..., :3].std() > 0.05  # something is drawn
    # more layers, taller figure: rows, not a fixed strip
    assert heatmap_size(24, 8)[1] > heatmap_size(2, 8)[1]


def test_heatmap_without_matplotlib_is_a_typed_error_naming_the_extra(tmp_path, monkeypatch):
    _, moe_model = converted(2)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import raises ImportError
    path = tmp_path / "load.png"
    with pytest.raises(moefy.errors.MissingDependencyError, match=r"moefy\[plot\]"):
        moefy.report(moe_model, [(torch.randn(40, 16),)], heatmap=path)
    assert not path.exists()


def layer():
    return nn.Sequential(moefy.MoE(16, 8, num_experts=4, top_k=2))


BAD_REPORT = (
    (lambda tmp: moefy.report("model"), "model must be a torch.nn.Module"),
    (lambda tmp: moefy.report(layer(), torch.randn(4, 16)), "data must be an iterable"),
    (lambda tmp: moefy.report(layer(), []), "data yielded no batches"),
    (lambda tmp: moefy.report(layer(), [None]), "batch 0 is a NoneType"),
    (lambda tmp: moefy.report(layer(), heatmap=tmp / "a.png"), "heatmap needs data"),
    (lambda tmp: moefy.report(nn.Linear(16, 16), [(torch.randn(4, 16),)],
                              heatmap=tmp / "a.png"), "holds no moefy.MoE layer"),
    (lambda tmp: moefy.report(layer(), [(torch.randn(4, 16),)], heatmap=tmp),
     "is a directory"),
    (lambda tmp: moefy.report(layer(), [(torch.randn(4, 16),)], heatmap=tmp / "no" / "a.png"),
     "does not exist"),
    (lambda tmp: moefy.report(layer(), [(torch.randn(4, 16),)], heatmap=3), "file path"),
)


@pytest.mark.parametrize(("call", "message"), BAD_REPORT)
def test_report_bad_input_is_a_typed_error(call, message, tmp_path):
    with pytest.raises(moefy.errors.ReportInputError, match=message):
        call(tmp_path)


def test_zero_token_batches_report_no_numbers_rather_than_made_up_ones():
    rep = moefy.report(layer(), [(torch.randn(0, 16),), [torch.randn(0, 16)]])
    row = rep.layers[0]
    assert row["tokens"] == 0 and row["usage"] is None and row["rel err"] is None
    assert "—" in rep.splitlines()[1]


def tiny_llama_and_data():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=64)
    dense = transformers.LlamaForCausalLM(cfg).eval()
    return dense, [{"input_ids": torch.randint(0, 64, (4, 32))} for _ in range(6)]


def test_report_lists_single_neuron_layers_with_their_budget_and_measured_reads():
    dense, data = tiny_llama_and_data()
    sparse = moefy.convert(dense, moefy.MoEConfig(method="neuron", active=0.5),
                           calibration_data=data)
    text = moefy.report(sparse)
    assert "model.layers.0.mlp" in text and "ffn (input)" in text and "projection" in text
    assert "weights read per token: " in text and "measured" not in text
    measured = moefy.report(sparse, data[:2])
    rows = [r for r in measured.layers if r["method"] == "neuron"]
    assert len(rows) == 10 and all(r["tokens"] == 256 for r in rows)
    share = re.search(r"([\d.]+)% measured on the data", measured)
    assert share and abs(float(share.group(1)) - 50) < 5, measured
    # a layer that keeps everything reads everything and is exact
    exact = moefy.convert(dense, moefy.MoEConfig(method="neuron"), example_inputs=data[0])
    rows = moefy.report(exact, data[:1]).layers
    assert all(r["read"] == "100%" and r["rel err"] == 0 for r in rows)


def test_report_measures_a_sequence_selection_as_it_decodes():
    """The prompt runs dense, so the error that matters is the continuation's: report measures
    each data sequence's second half through the set its first half picked."""
    from moefy.layers.neuron import NeuronFFN

    dense, data = tiny_llama_and_data()
    sparse = moefy.convert(dense, moefy.MoEConfig(method="neuron", active=0.5,
                                                  selection="sequence", ffn_only=True),
                           calibration_data=data)
    measured = moefy.report(sparse, data[:2])
    rows = measured.layers
    ffns = [m for m in sparse.modules() if isinstance(m, NeuronFFN)]
    assert [r["kind"] for r in rows] == ["ffn (sequence)"] * 2
    for row, m in zip(rows, ffns, strict=True):
        assert row["read_share"] == pytest.approx(m.kept_neurons() / m.ffn_size)
        errors = []  # the same measure by hand: prompt_then_decode on each batch
        for b in data[:2]:
            states = {}
            hook = m.register_forward_pre_hook(
                lambda mod, a, states=states: states.setdefault("x", a[0]))
            with torch.no_grad():
                sparse(**b)
            hook.remove()
            errors.append(m.prompt_then_decode(states["x"]))
        err = sum(float((s - d).pow(2).sum()) for s, d in errors)
        ref = sum(float(d.pow(2).sum()) for _, d in errors)
        assert 0 < row["rel err"] == pytest.approx(math.sqrt(err / ref), rel=1e-4)
