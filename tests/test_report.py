"""moefy.report: the static table, and with data: load, usage, unevenness, error, heatmap."""

import math
import struct

import pytest
import torch
import torch.nn as nn

import moefy


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


def test_heatmap_is_a_png_of_layers_by_experts(tmp_path):
    _, moe_model = converted(2)
    path = tmp_path / "load.png"
    moefy.report(moe_model, [(torch.randn(40, 16),)], heatmap=path)
    blob = path.read_bytes()
    assert blob[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", blob[16:24])
    assert (width, height) == (8 * 12, 2 * 12)
    with pytest.raises(ValueError, match="heatmap needs data"):
        moefy.report(moe_model, heatmap=path)
