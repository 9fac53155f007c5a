"""moefy.export_onnx: both targets equal PyTorch in ONNX Runtime; bad input fails cleanly."""

import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn

import moefy
from moefy.onnx import ExportError, check_tensorrt_ops

LAYERS = (
    dict(activation="relu"),
    dict(activation="silu", gated=True, bias=False),
    dict(activation="gelu", combine="sum", shared_expert_size=8),
    dict(activation="gelu_tanh", router="sigmoid"),
    dict(activation="relu", router="topp", top_p=0.4),
    dict(activation="silu", capacity_factor=1.0),
)
EXPORTS = (("ort", "loop"), ("ort", "moe_op"), ("standard", None))
NOT_FOR_MOE_OP = (
    dict(activation="squared_relu"),
    dict(activation="gelu", gated=True),
    dict(activation="quick_gelu"),
)


def layer(**cfg):
    torch.manual_seed(0)
    cfg = {"top_k": 2, "num_experts": 4, **cfg}
    moe = moefy.MoE(16, 8, **cfg).eval()
    nn.init.normal_(moe.router.weight, std=1.0)
    return moe


def op_types(path):
    return {(n.domain or "ai.onnx", n.op_type) for n in onnx.load(str(path)).graph.node}


@pytest.mark.parametrize("target,kernel", EXPORTS)
@pytest.mark.parametrize("cfg", LAYERS)
def test_layer_exports_and_matches(tmp_path, target, kernel, cfg):
    moe = layer(**cfg)
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(7, 16),), target=target,
                            kernel=kernel)
    assert len(out.max_diff) == 2 and max(out.max_diff) <= out.tolerance
    assert out.kernel == (kernel or "buffers")
    # only the fused op computes GELU in tanh form: its lowering is checked against tanh-GELU
    # and the drift from erf-GELU told; the others compute the model's own activation
    drift = any("drift from the erf-GELU model" in n for n in out.notes)
    assert drift == (kernel == "moe_op" and cfg["activation"] == "gelu")
    bad = check_tensorrt_ops(out.path)
    if target == "standard":
        assert bad == []
    elif kernel == "moe_op":
        assert any("com.microsoft::MoE" in b for b in bad)
    else:  # ordinary nodes per expert; ONNX Runtime's fused GELUs are the only contrib ops
        contrib = {t for d, t in op_types(out.path) if d != "ai.onnx"}
        assert contrib <= {"BiasGelu", "FastGelu"}
        assert ("ai.onnx", "NonZero") in op_types(out.path)
    x = torch.randn(11, 16)  # a third token count, through the session
    session = moefy.runtime.Session(out.path)
    got = next(iter(session.run({session.input_names[0]: x}).values()))
    with torch.no_grad():
        torch.testing.assert_close(got, moe(x), rtol=1e-4, atol=3e-4 if "gelu" == cfg[
            "activation"] and kernel == "moe_op" else 1e-5)


@pytest.mark.parametrize("kernel", ("loop", "moe_op"))
def test_ort_exports_at_an_older_opset(tmp_path, kernel):
    """Opset 23 is only the default: the lowerings are opset-18 ops."""
    moe = layer()
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(7, 16),), kernel=kernel,
                            opset=18)
    assert out.opset == 18 and max(out.max_diff) <= out.tolerance


@pytest.mark.parametrize("cfg", NOT_FOR_MOE_OP)
def test_moe_op_refuses_what_it_cannot_run_and_the_others_take_it(tmp_path, cfg):
    moe = layer(**cfg)
    x = torch.randn(6, 16)
    with pytest.raises(ExportError, match="kernel='loop' or target='standard'"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", (x,), target="ort", kernel="moe_op")
    assert list(tmp_path.iterdir()) == []
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (x,), target="standard")
    assert check_tensorrt_ops(out.path) == []
    out = moefy.export_onnx(moe, tmp_path / "l.onnx", (x,), target="ort")
    assert out.kernel == "loop" and max(out.max_diff) <= out.tolerance


def test_loop_kernel_on_unbalanced_and_tiny_inputs(tmp_path):
    """Experts that get no token, one token, or every token; single-token inputs; capacity
    drops (slots that gather the zero row) — against the eager layer."""
    moe = layer(activation="gelu", num_experts=8, top_k=3)
    with torch.no_grad():
        moe.router.weight[0] += 3.0  # expert 0 wins for most tokens, some get none
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(5, 16),))
    session = moefy.runtime.Session(out.path, threads=2)
    for t in (1, 2, 64, 300):
        x = torch.randn(t, 16)
        got = next(iter(session.run({session.input_names[0]: x}).values()))
        with torch.no_grad():
            torch.testing.assert_close(got, moe(x), rtol=1e-4, atol=1e-5)
    moe.capacity_factor = 0.5
    out = moefy.export_onnx(moe, tmp_path / "c.onnx", (torch.randn(40, 16),))
    session = moefy.runtime.Session(out.path)
    x = torch.randn(50, 16)
    got = next(iter(session.run({session.input_names[0]: x}).values()))
    with torch.no_grad():
        ref = moe(x)
    assert moe.last_dropped > 0
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_expert_choice_is_refused(tmp_path):
    moe = layer(router="expert_choice")
    with pytest.raises(ExportError, match="expert_choice"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(6, 16),), target="standard")


def test_failed_validation_leaves_no_file(tmp_path, monkeypatch):
    from moefy.onnx import export as export_mod
    monkeypatch.setitem(export_mod.TOLERANCE, "standard", 0.0)
    moe = layer(activation="silu")
    with pytest.raises(ExportError, match="differs from PyTorch"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(6, 16),), target="standard")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_and_bad_arguments(tmp_path):
    moe = layer()
    x = (torch.randn(6, 16),)
    with pytest.raises(ExportError, match="not a writable directory"):
        moefy.export_onnx(moe, tmp_path / "missing" / "m.onnx", x)
    with pytest.raises(ValueError, match="target must be one of"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", x, target="tensorrt")
    with pytest.raises(ValueError, match="end in .onnx"):
        moefy.export_onnx(moe, tmp_path / "m.txt", x)
    with pytest.raises(ValueError, match="has kernels"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", x, target="standard", kernel="loop")
    with pytest.raises(ValueError, match="opset must be an int >= 18"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", x, opset=17)
    with pytest.raises(ExportError, match="float32"):
        moefy.export_onnx(layer().half(), tmp_path / "m.onnx", (x[0].half(),))
    assert list(tmp_path.iterdir()) == []


def test_model_without_moe_exports_with_a_warning(tmp_path):
    mlp = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8)).eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = moefy.export_onnx(mlp, tmp_path / "m.onnx", (torch.randn(3, 8),))
    assert any("no moefy.MoE" in str(w.message) for w in caught)
    assert out.moe_layers == 0 and out.path.exists()


def test_static_shapes_when_not_dynamic(tmp_path):
    out = moefy.export_onnx(layer(), tmp_path / "m.onnx", (torch.randn(6, 16),),
                            target="standard", dynamic=False)
    dims = onnx.load(str(out.path)).graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_value for d in dims] == [6, 16] and len(out.max_diff) == 1


def test_session_inputs_and_errors(tmp_path):
    out = moefy.export_onnx(layer(), tmp_path / "m.onnx", (torch.randn(6, 16),))
    session = moefy.runtime.Session(out.path, threads=1)
    name = session.input_names[0]
    x = np.random.default_rng(0).standard_normal((4, 16)).astype(np.float32)
    res = session.run({name: x, "unused": 1})
    assert isinstance(next(iter(res.values())), np.ndarray)
    with pytest.raises(ValueError, match="missing inputs"):
        session.run({})
    quiet = moefy.runtime.Session(out.path, config={"session.intra_op.allow_spinning": "0"})
    np.testing.assert_allclose(next(iter(quiet.run({name: x}).values())),
                               next(iter(res.values())), rtol=1e-6, atol=1e-7)
    with pytest.raises(TypeError, match="string values"):
        moefy.runtime.Session(out.path, config={"session.intra_op.allow_spinning": 0})
    with pytest.raises(ValueError, match="device must be one of"):
        moefy.runtime.Session(out.path, device="tpu")
    with pytest.raises(FileNotFoundError):
        moefy.runtime.Session(tmp_path / "nothing.onnx")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA|onnxruntime-gpu"):
            moefy.runtime.Session(out.path, device="cuda")


def hf_models():
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM
    bert = BertModel(BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                num_attention_heads=2, intermediate_size=64)).eval()
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1,
                                         intermediate_size=64)).eval()
    return {"bert_split": (bert, moefy.MoEConfig(method="split", num_experts=8, top_k=2)),
            "llama_upcycle": (llama, moefy.MoEConfig(method="upcycle", num_experts=8,
                                                     top_k=2)),
            "bert_hash": (bert, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=1,
                                                router="hash"))}


@pytest.mark.parametrize("target,kernel", EXPORTS)
@pytest.mark.parametrize("name", ("bert_split", "llama_upcycle", "bert_hash"))
def test_hugging_face_models_export(tmp_path, name, target, kernel):
    pytest.importorskip("transformers")
    model, cfg = hf_models()[name]
    torch.manual_seed(0)
    moe_model = moefy.convert(model, cfg)
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0  # padding goes through the attention mask path too
    inputs = {"input_ids": ids, "attention_mask": mask}
    out = moefy.export_onnx(moe_model, tmp_path / "m.onnx", inputs, target=target,
                            kernel=kernel)
    assert out.moe_layers == 2 and max(out.max_diff) <= out.tolerance
    if target == "standard":
        assert out.opset < 23 and check_tensorrt_ops(out.path) == []
    else:  # opset 23: SDPA becomes ONNX's Attention op, which ONNX Runtime runs fused (and
        # LLaMA's batch-2 validation fails if onnxscript's RotaryEmbedding fusion runs)
        ops = {n.op_type for n in onnx.load(str(out.path)).graph.node}
        assert out.opset == 23 and "Attention" in ops


def test_image_model_validates_on_a_second_batch(tmp_path):
    """Validation grows only the dimensions the export kept dynamic: for ViT the batch, not
    the channels or the image size (specialised by the model)."""
    pytest.importorskip("transformers")
    from tests.passes.models import hf_configs
    config, cls, _ = hf_configs()["vit"]
    vit = cls(config).eval()
    moe_model = moefy.convert(vit, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    out = moefy.export_onnx(moe_model, tmp_path / "vit.onnx",
                            {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert len(out.max_diff) == 2 and max(out.max_diff) <= out.tolerance
    session = moefy.runtime.Session(out.path)
    got = session.run({"pixel_values": torch.randn(5, 3, 32, 32)})
    assert (5, 17, 32) in [tuple(v.shape) for v in got.values()]  # 16 patches + CLS


def test_hash_routing_with_two_choices(tmp_path):
    """Hash routing with top_k 2 can pick one expert twice for a token: the loop and the
    standard lowering count both assignments, the fused op refuses."""
    pytest.importorskip("transformers")
    model, _ = hf_models()["bert_hash"]
    with torch.no_grad():  # non-zero biases: a repeated expert adds its output bias twice
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.normal_(std=0.5)
    cfg = moefy.MoEConfig(method="upcycle", num_experts=3, top_k=2, router="hash")
    moe_model = moefy.convert(model, cfg)
    ids = torch.arange(60).reshape(2, 30) % 200
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    _, chosen = moe._hash(torch.zeros(60, 1), ids)
    assert (chosen[:, 0] == chosen[:, 1]).any()  # the case under test occurs
    for target in ("ort", "standard"):
        out = moefy.export_onnx(moe_model, tmp_path / f"{target}.onnx", inputs, target=target)
        assert max(out.max_diff) <= out.tolerance
    with pytest.raises(ExportError, match="twice"):
        moefy.export_onnx(moe_model, tmp_path / "m.onnx", inputs, kernel="moe_op")
