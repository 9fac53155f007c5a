"""moefy.passes.calibrate: streamed statistics equal brute force; the reservoir stays bounded."""

import math

import pytest
import torch

import moefy
from moefy.passes.calibrate import MARKER_FRACTION, FFNStats, token_mask


def test_stats_equal_brute_force_over_batches():
    h = torch.randn(300, 40)
    x = torch.randn(300, 8)
    s = FFNStats(40, 8)
    for rows in torch.arange(300).split(70):
        s.add(x[rows], h[rows])
    m = math.ceil(40 * MARKER_FRACTION)
    markers = torch.zeros_like(h).scatter_(1, h.abs().topk(m, dim=1).indices, 1.0)
    assert s.tokens == 300
    torch.testing.assert_close(s.active, (h > 0).float().sum(0))
    torch.testing.assert_close(s.marked, markers.sum(0))
    torch.testing.assert_close(s.comarked, markers.t() @ markers)
    torch.testing.assert_close(s.mean_h, h.mean(0))
    torch.testing.assert_close(s.mean_abs, h.abs().mean(0))
    torch.testing.assert_close(s.inputs, x)  # under capacity: every token, in order


def test_reservoir_is_bounded_and_uniform():
    s = FFNStats(4, 1, capacity=500)
    n = 20000
    ids = torch.arange(n, dtype=torch.float32).unsqueeze(1)
    for rows in ids.split(1000):
        s.add(rows, torch.randn(rows.shape[0], 4))
    kept = s.inputs.squeeze(1)
    assert kept.shape == (500,) and s.reservoir.shape == (500, 1)
    assert len(set(kept.tolist())) == 500  # distinct tokens of the stream
    # uniform over the stream: each quarter holds about a quarter of the sample
    quarters = torch.bincount((kept / (n / 4)).long(), minlength=4).float() / 500
    assert (quarters - 0.25).abs().max() < 0.08


def test_padding_is_not_data():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    keep = token_mask({"attention_mask": mask})
    assert keep.tolist() == [True, True, False, True, False, False]
    assert token_mask({"attention_mask": mask[0]}) is None and token_mask({}) is None


@pytest.mark.parametrize("form", ["dict without attention_mask", "tuple", "bare tensor"])
def test_causal_lm_calibration_without_attention_mask(smollm2_slice, form):
    """A causal LM's calibration text is often just token ids: every form calibrates (real
    SmolLM2 layers, batches of different lengths) and compensates from the statistics."""
    model, tokenizer = smollm2_slice(2)
    texts = [moefy.convert.__doc__, moefy.MoE.__doc__, moefy.report.__doc__]
    ids = [tokenizer(t, return_tensors="pt", truncation=True, max_length=48 + 8 * i).input_ids
           for i, t in enumerate(texts)]
    data = {"dict without attention_mask": [{"input_ids": t} for t in ids],
            "tuple": [(t,) for t in ids], "bare tensor": ids}[form]
    moe = moefy.convert(model, moefy.MoEConfig(method="split", num_experts=8, top_k=4,
                                               compensate="mean"), calibration_data=data)
    layer = moe.model.layers[1].mlp
    assert isinstance(layer, moefy.MoE) and layer.conversion["compensation"] == "mean"
    assert layer.shared.bias is not None and torch.isfinite(layer.shared.bias).all()
