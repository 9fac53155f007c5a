"""moefy.export_onnx: both targets equal PyTorch in ONNX Runtime; bad input fails cleanly."""

import math
import os
import subprocess
import sys
import time
import warnings

import onnx
import pytest
import torch
import torch.nn as nn

import moefy
from moefy.errors import ExportInputError, ExportToleranceError, SessionShapeError
from moefy.onnx import ExportError, check_tensorrt_ops
from moefy.onnx import export as export_mod
from moefy.onnx.lowering import ort_expressible

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


OTHER_WIDTH = (  # layers 16 → 3 (a classifier head's block): every lowering but the fused op
    dict(activation="relu"),
    dict(activation="silu", gated=True, bias=False, shared_expert_size=8, combine="sum"),
    dict(activation="gelu", capacity_factor=1.0),
    dict(activation=nn.Tanh()),  # custom: plain ops, no lowering
)


@pytest.mark.parametrize("target,kernel", (("ort", "loop"), ("standard", None)))
@pytest.mark.parametrize("cfg", OTHER_WIDTH)
def test_other_output_width_exports_and_matches(tmp_path, target, kernel, cfg):
    moe = layer(output_size=3, **cfg)
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(7, 16),), target=target,
                            kernel=kernel)
    assert max(out.max_diff) <= out.tolerance
    if target == "standard":
        assert check_tensorrt_ops(out.path) == []
    x = torch.randn(11, 16)
    session = moefy.runtime.Session(out.path)
    got = next(iter(session.run({session.input_names[0]: x}).values()))
    assert got.shape == (11, 3)
    with torch.no_grad():
        torch.testing.assert_close(got, moe(x), rtol=1e-4, atol=1e-5)


def test_the_fused_op_refuses_another_output_width(tmp_path):
    moe = layer(output_size=3)
    with pytest.raises(ExportError, match="output width 3 other than the input width 16 "
                       r"\(ONNX Runtime's MoE returns its input's width\); use kernel='loop' "
                       "or target='standard'"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(6, 16),), kernel="moe_op")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ("ort", "standard"))
def test_a_converted_tabular_model_with_a_head_exports(tmp_path, target):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 3)).eval()
    x = torch.randn(32, 16)
    model = moefy.convert(dense, moefy.MoEConfig(method="split", num_experts=4, top_k=2),
                          example_inputs=(x,))
    assert model[0].output_size == 3
    out = moefy.export_onnx(model, tmp_path / "m.onnx", (x,), target=target)
    assert out.moe_layers == 1 and max(out.max_diff) <= out.tolerance
    session = moefy.runtime.Session(out.path)
    got = next(iter(session.run({session.input_names[0]: x[:5]}).values()))
    with torch.no_grad():
        torch.testing.assert_close(got, model(x[:5]), rtol=1e-4, atol=1e-5)


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
    monkeypatch.setitem(export_mod.TOLERANCE, "standard", 0.0)
    moe = layer(activation="silu")
    with pytest.raises(ExportToleranceError, match="differs from PyTorch"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(6, 16),), target="standard")
    assert list(tmp_path.iterdir()) == []


def test_unwritable_path_and_bad_arguments(tmp_path):
    moe = layer()
    x = (torch.randn(6, 16),)
    with pytest.raises(ExportInputError, match="not a writable directory"):
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


UNWRITABLE = (
    ("/proc/x.onnx", r"cannot write /proc/x\.onnx: /proc does not take new files"),
    ("/sys/x.onnx", r"cannot write /sys/x\.onnx: /sys does not take new files"),  # root too
    ("x.onnx", r"x\.onnx is a directory, not a file; remove it or choose a file path"),
)


@pytest.mark.parametrize("path,message", UNWRITABLE, ids=("proc", "sys", "directory"))
def test_unwritable_targets_are_refused_before_any_work(tmp_path, path, message):
    """/proc and /sys refuse new files (os.access says they are writable for root), a folder
    named like the file cannot be replaced by it: a typed error before the model runs."""
    (tmp_path / "x.onnx").mkdir()
    moe = layer()
    moe.register_forward_pre_hook(lambda *_: pytest.fail("the model ran"))
    with pytest.raises(ExportInputError, match=message):  # an absolute path replaces tmp_path
        moefy.export_onnx(moe, tmp_path / path, (torch.randn(6, 16),))
    assert [p.name for p in tmp_path.iterdir()] == ["x.onnx"]
    assert list((tmp_path / "x.onnx").iterdir()) == []


def test_a_read_only_folder_is_refused_where_it_refuses_files(tmp_path):
    """chmod 555: refused before any work for a user it refuses; root may write there, and
    then the export goes through."""
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o555)
    x = (torch.randn(6, 16),)
    if os.access(folder, os.W_OK):  # root
        assert moefy.export_onnx(layer(), folder / "m.onnx", x).path.is_file()
    else:
        with pytest.raises(ExportInputError, match="read-only is not a writable directory"):
            moefy.export_onnx(layer(), folder / "m.onnx", x)
        assert list(folder.iterdir()) == []


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
            # split: distinct experts, so a wrong hash in the export shows (upcycled copies
            # would hide it)
            "bert_hash": (bert, moefy.MoEConfig(method="split", num_experts=4, top_k=1,
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
    # the image size is fixed in the graph's declared input, so ONNX Runtime is never asked
    with pytest.raises(SessionShapeError, match="'pixel_values' dimension 2 must be 32"):
        session.run({"pixel_values": torch.randn(5, 3, 16, 32)})


def test_hash_routing_with_two_choices(tmp_path):
    """Hash routing with top_k 2 can pick one expert twice for a token: the loop and the
    standard lowering count both assignments, the fused op refuses."""
    pytest.importorskip("transformers")
    model, _ = hf_models()["bert_hash"]
    with torch.no_grad():  # non-zero biases: a repeated expert adds its output bias twice
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.bias.normal_(std=0.5)
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2, router="hash")
    moe_model = moefy.convert(model, cfg)
    ids = torch.arange(60).reshape(2, 30) % 200
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    _, chosen = moe.route(torch.zeros(60, moe.hidden_size), ids)
    assert (chosen[:, 0] == chosen[:, 1]).any()  # the case under test occurs
    for target in ("ort", "standard"):
        out = moefy.export_onnx(moe_model, tmp_path / f"{target}.onnx", inputs, target=target)
        assert max(out.max_diff) <= out.tolerance
    with pytest.raises(ExportError, match="twice"):
        moefy.export_onnx(moe_model, tmp_path / "m.onnx", inputs, kernel="moe_op")


def test_declared_dims_are_static_where_the_program_is(tmp_path):
    """The hidden width is a fixed dimension of the graph's input and output (the exporter
    named it "16", a symbol, so ONNX Runtime took any width); the tokens stay dynamic."""
    out = moefy.export_onnx(layer(), tmp_path / "m.onnx", (torch.randn(5, 16),),
                            validate=False)
    graph = onnx.load(str(out.path)).graph
    for value in (graph.input[0], graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param and not dims[0].HasField("dim_value")  # tokens
        assert dims[1].HasField("dim_value") and dims[1].dim_value == 16


NON_FINITE = (dict(activation="silu"), dict(activation="silu", capacity_factor=0.5),
              dict(activation="relu", router="topp", top_p=0.4),
              dict(activation=nn.Hardtanh(), capacity_factor=0.5))


@pytest.mark.parametrize("target,kernel", EXPORTS)
@pytest.mark.parametrize("cfg", NON_FINITE)
def test_a_non_finite_token_stays_on_its_token(tmp_path, target, kernel, cfg):
    """One NaN token and one 1e30 token: every other token's output is the clean run's. In
    target "standard" dropped and unused assignments share a spare buffer row that was
    multiplied by 0, so a NaN there reached every token that lost an assignment."""
    moe = layer(bias=False, **cfg)
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(12, 16),), target=target,
                            kernel=kernel, validate=False)
    session = moefy.runtime.Session(out.path)
    name = session.input_names[0]
    x = torch.randn(40, 16)
    dirty = x.clone()
    # last in token order: capacity is first come, first served, so the others' slots stay
    dirty[-2], dirty[-1] = float("nan"), 1e30
    clean = next(iter(session.run({name: x}).values()))
    got = next(iter(session.run({name: dirty}).values()))
    if cfg.get("capacity_factor"):
        with torch.no_grad():
            moe(dirty)
        assert moe.last_dropped > 0  # the spare row is in use
    torch.testing.assert_close(got[:-2], clean[:-2], rtol=1e-5, atol=1e-6)


def test_export_runs_without_gradients(tmp_path):
    """BEiT with relative position bias fails inside the exporter's decomposition when
    gradients are on; export_onnx exports without them, and restores grad mode and the
    modules' training flags."""
    pytest.importorskip("transformers")
    from transformers import BeitConfig, BeitModel
    config = BeitConfig(hidden_size=32, intermediate_size=64, image_size=32, patch_size=8,
                        num_hidden_layers=2, num_attention_heads=2,
                        use_relative_position_bias=True)
    beit = BeitModel(config).eval()
    moe_model = moefy.convert(beit, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    moe_model.train()
    modules = list(moe_model.modules())
    modules[-1].eval()
    before = [m.training for m in modules]
    out = moefy.export_onnx(moe_model, tmp_path / "beit.onnx",
                            {"pixel_values": torch.randn(2, 3, 32, 32)})
    assert max(out.max_diff) <= out.tolerance
    assert torch.is_grad_enabled()
    assert [m.training for m in modules] == before and not before[-1] and before[0]


class Interrupt(KeyboardInterrupt):
    pass


def test_nothing_left_after_an_interrupt_or_a_failed_publish(tmp_path, monkeypatch):
    moe = layer()
    x = (torch.randn(6, 16),)

    def interrupted(path):
        raise Interrupt
    with monkeypatch.context() as m:
        m.setattr(export_mod, "_check_onnx", interrupted)
        with pytest.raises(Interrupt):
            moefy.export_onnx(moe, tmp_path / "m.onnx", x)
    assert list(tmp_path.iterdir()) == []
    # with external data there are two files to move: an interrupt between the two moves
    # must not leave the first (an .onnx beside another export's data, or a lone .data)
    monkeypatch.setattr(export_mod, "EXTERNAL_DATA_BYTES", 0)
    replace, moves = os.replace, []

    def replace_once(src, dst):
        if moves:
            raise Interrupt
        moves.append(dst)
        replace(src, dst)
    monkeypatch.setattr(export_mod.os, "replace", replace_once)
    with pytest.raises(Interrupt):
        moefy.export_onnx(moe, tmp_path / "m.onnx", x)
    assert moves and list(tmp_path.iterdir()) == []
    monkeypatch.setattr(export_mod.os, "replace", replace)
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    assert max(out.max_diff) <= out.tolerance


def test_leftovers_of_killed_exports_are_removed(tmp_path):
    """Work folders older than an hour whose process is gone are removed by the next export;
    a live process's folder, a recent one and other hidden folders stay."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    old = time.time() - 2 * export_mod.STALE_AFTER_S
    folders = {
        f".moefy-export-{gone.pid}-abc": (old, False),
        ".moefy-export-xyz": (old, False),  # named before folders held the pid: age decides
        f".moefy-export-{os.getpid()}-def": (old, True),  # its process is alive
        f".moefy-export-{gone.pid}-new": (time.time(), True),  # may be another export's
        ".other-tool-tmp": (old, True),
    }
    for name, (mtime, _) in folders.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "m.onnx").write_bytes(b"partial")
        os.utime(tmp_path / name, (mtime, mtime))
    moefy.export_onnx(layer(), tmp_path / "m.onnx", (torch.randn(6, 16),), validate=False)
    kept = {p.name for p in tmp_path.iterdir()}
    assert kept == {"m.onnx"} | {n for n, (_, stays) in folders.items() if stays}


class Fails(nn.Module):
    def forward(self, x):
        raise RuntimeError("this model cannot take that")


def hostile_exports():
    """name -> (model, path inside tmp_path, example inputs, expected message)."""
    moe = layer()
    x = torch.randn(6, 16)
    return {
        "list inputs": (moe, "m.onnx", [x], "tuple of positional tensors"),
        "numpy inputs": (moe, "m.onnx", (x.numpy(),), "torch.from_numpy"),
        "string input": (moe, "m.onnx", (x, "fast"), "found a str"),
        "no tensor": (moe, "m.onnx", (), "hold no tensor"),
        "wrong width": (moe, "m.onnx", (torch.randn(6, 8),), "does not run on the example "
                        r"inputs \[\(\(6, 8\), 'float32'\)\]"),
        "wrong dtype": (moe, "m.onnx", (x.double(),), "does not run.*float64"),
        "integer inputs": (moe, "m.onnx", (torch.ones(6, 16, dtype=torch.long),),
                           "does not run.*int64"),
        "model raises": (Fails(), "m.onnx", (x,), "cannot take that"),
        "missing dir": (moe, "no/such/dir/m.onnx", (x,), "not a writable directory"),
        "not a module": (lambda t: t, "m.onnx", (x,), "must be a torch.nn.Module"),
    }


@pytest.mark.parametrize("case", sorted(hostile_exports()))
def test_hostile_inputs_get_a_typed_error_and_leave_nothing(tmp_path, case):
    model, path, inputs, message = hostile_exports()[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Fails holds no MoE: warned, then refused
        with pytest.raises(ExportInputError, match=message):
            moefy.export_onnx(model, tmp_path / path, inputs)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ExportInputError, match="path must be a str"):
        moefy.export_onnx(layer(), 3, (torch.randn(6, 16),))


@pytest.mark.parametrize("value", (math.inf, float("nan"), -1.0))
def test_an_infinite_capacity_factor_is_refused(value):
    """inf is not read as dropless (None says that): refused where it is set, and by export
    for a layer that got it some other way (a state restored around the setter)."""
    with pytest.raises(ValueError, match="capacity_factor"):
        layer(capacity_factor=value)
    moe = layer()
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.capacity_factor = value
    if "_capacity_factor" in vars(moe):
        vars(moe)["_capacity_factor"] = value
        with pytest.raises(ExportInputError, match="capacity_factor must be None.*finite"):
            export_mod._check_lowerable([("ffn", moe)], "standard", "buffers")


@pytest.mark.parametrize("target,kernel", EXPORTS)
def test_custom_activation_layers_export_as_plain_ops(tmp_path, target, kernel):
    """A layer with a custom activation module runs its experts as plain torch ops: no
    lowering is involved (the fused op is not refused), and the result says so."""
    moe = layer(activation=nn.Hardtanh(-0.5, 0.5))
    assert moe.activation == "custom"
    out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(7, 16),), target=target,
                            kernel=kernel)
    assert max(out.max_diff) <= out.tolerance
    assert any("custom activation" in n for n in out.notes)
    if target == "standard":
        assert check_tensorrt_ops(out.path) == []
    assert "custom activation" in ort_expressible("custom", False)


def test_hardswish_lowers_to_standard_ops_and_the_fused_op_refuses_it(tmp_path):
    why = ort_expressible("hardswish", False)
    assert "hardswish" in why and "relu, gelu (tanh form), silu" in why
    moe = layer(activation="hardswish")
    assert moe.activation == "hardswish"  # by name, not a custom activation's plain ops
    x = (torch.randn(6, 16) * 4,)  # both kinks of relu6(x + 3) are crossed
    out = moefy.export_onnx(moe, tmp_path / "s.onnx", x, target="standard")
    assert max(out.max_diff) <= out.tolerance and check_tensorrt_ops(out.path) == []
    assert ("ai.onnx", "HardSwish") in op_types(out.path)
    out = moefy.export_onnx(moe, tmp_path / "l.onnx", x, target="ort")
    assert max(out.max_diff) <= out.tolerance
    with pytest.raises(ExportError, match="hardswish.*kernel='loop' or target='standard'"):
        moefy.export_onnx(moe, tmp_path / "m.onnx", x, kernel="moe_op")
