"""moefy.save / moefy.load of method="neuron" models: NeuronFFN and SparseLinear come back
bit-exact (prefill through the masked dense path, decode through the C++ kernels) with their
thresholds (selection "sequence": its share kept, and the set it picks from the prompt), and
a broken plan or the wrong dense model is refused before anything changes."""

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import moefy
from moefy.errors import LoadError
from moefy.io import plan as plan_mod
from moefy.layers.neuron import DecodeLinear, NeuronFFN, SparseLinear
from moefy.runtime import neuron as kernels
from moefy.runtime.kernels import neuron_kernels_available
from tests.io.models import LLAMA, calibration, convert, snapshot, token_ids, untouched

NEURON = (  # (selection, ffn_only)
    ("input", False),
    ("gate", False),
    ("input", True),
    ("gate", True),
    ("sequence", False),  # the prompt picks the set; the decode step reads only it
    ("sequence", True),
)


def neuron_model(selection="input", ffn_only=False):
    return convert(moefy.MoEConfig(method="neuron", active=0.5, selection=selection,
                                   ffn_only=ffn_only), calibration())


def neuron_buffers(model) -> dict:
    return {f"{p}.{n}": b for p, m in model.named_modules()
            if isinstance(m, NeuronFFN | SparseLinear) for n, b in m.named_buffers()}


def prefill_then_decode(model, ids):
    """Logits of a prefill of ``ids`` (T > 16 tokens: the masked dense path) and of one
    decode step after it (T = 1: the C++ kernels)."""
    with torch.no_grad():
        first = model(input_ids=ids, use_cache=True)
        step = first.logits[:, -1:].argmax(-1)
        return first.logits, model(input_ids=step, cache=first.past_key_values,
                                    use_cache=True).logits


@pytest.fixture
def counted_kernel_calls(monkeypatch):
    calls = []
    for name in ("_sparse_input_linear_op", "_neuron_ffn_op", "_input_sparse_ffn_op"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real: calls.append(1) or real(*a))
    return calls


@pytest.mark.parametrize("selection, ffn_only", NEURON)
def test_round_trip_is_bit_exact_in_prefill_and_decode(selection, ffn_only, tmp_path,
                                                       counted_kernel_calls):
    model = neuron_model(selection, ffn_only)
    ids = token_ids(length=24)
    ref_prefill, ref_decode = prefill_then_decode(model, ids)
    saved = neuron_buffers(model)
    assert any(float(b) >= 0 for n, b in saved.items()
               if n.endswith(("threshold", "keep")))  # sparse
    moefy.save(model, tmp_path)
    plan = json.loads((tmp_path / "moefy.json").read_text())
    assert plan["format_version"] == 3  # a moefy that reads format 2 says "upgrade"
    kinds = sorted({e["kind"] for e in plan["layers"]})
    assert kinds == (["NeuronFFN"] if ffn_only else ["NeuronFFN", "SparseLinear"])
    ffn = next(e for e in plan["layers"] if e["kind"] == "NeuronFFN")
    assert ffn["args"] == {"hidden_size": 32, "ffn_size": 64, "output_size": 32,
                           "activation": "silu", "gated": True, "bias": False,
                           "selection": selection}
    assert ffn["state"]["conversion"]["method"] == "neuron"
    assert plan["decode_linear"] == ["lm_head"]  # the head: dense, read by rows

    for back in (moefy.load(tmp_path), moefy.load(tmp_path, LlamaForCausalLM(LLAMA))):
        loaded = neuron_buffers(back)
        assert loaded.keys() == saved.keys()
        assert all(torch.equal(loaded[n], saved[n]) for n in saved)
        calls = len(counted_kernel_calls)
        prefill, decode = prefill_then_decode(back, ids)
        assert torch.equal(prefill, ref_prefill) and torch.equal(decode, ref_decode)
        if neuron_kernels_available() and not (selection == "sequence" and ffn_only):
            assert len(counted_kernel_calls) > calls  # the decode step ran the kernels
        layers = [m for m in back.modules() if isinstance(m, NeuronFFN | SparseLinear)]
        assert len(layers) == (2 if ffn_only else 10)
        assert type(back.lm_head) is DecodeLinear
        assert back.lm_head.weight is back.model.embed_tokens.weight  # still tied
        assert all(m.conversion["method"] == "neuron" for m in layers)
        assert dict(layers[0].conversion) == dict(next(
            m for m in model.modules() if isinstance(m, type(layers[0]))).conversion)


def test_float32_thresholds_beside_bfloat16_weights(tmp_path):
    """A layer's thresholds and scales stay float32 in a bfloat16 model: not a dtype clash."""
    model = neuron_model().to(torch.bfloat16)
    for b in neuron_buffers(model).values():  # as a conversion of a bfloat16 model leaves them
        b.data = b.data.float()
    ids = token_ids(length=20)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    moefy.save(model, tmp_path)
    # a fresh model cast alike (its rotary frequencies, which are not saved, in bfloat16 too)
    back = moefy.load(tmp_path, LlamaForCausalLM(LLAMA).to(torch.bfloat16))
    assert back.model.layers[0].mlp.in_threshold.dtype == torch.float32
    assert back.model.layers[0].mlp.w_in_t.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids).logits, ref)


@pytest.fixture
def saved_neuron(tmp_path):
    moefy.save(neuron_model(), tmp_path)
    return tmp_path


def test_the_wrong_dense_model_is_refused(saved_neuron):
    other = LlamaForCausalLM(LlamaConfig(**{**LLAMA.to_dict(), "intermediate_size": 48}))
    before = snapshot(other)
    with pytest.raises(LoadError, match="another config.*intermediate_size"):
        moefy.load(saved_neuron, other)
    assert untouched(other, before)
    with pytest.raises(LoadError, match="already holds moefy layers"):
        moefy.load(saved_neuron, moefy.load(saved_neuron))


HOSTILE_ARGS = (  # (entry kind, arg, value, what the refusal says)
    ("NeuronFFN", "ffn_size", -3, "ffn_size must be a positive int"),
    ("NeuronFFN", "selection", "topk", "selection must be one of"),
    ("NeuronFFN", "activation", "nope", "cannot be built"),
    ("NeuronFFN", "gated", "yes", "gated must be true or false"),
    ("NeuronFFN", "device", "cpu", "unknown argument 'device'"),
    ("SparseLinear", "in_features", 2 ** 40, "other shapes|cannot be built"),
    ("SparseLinear", "bias", 1, "bias must be true or false"),
)


@pytest.mark.parametrize("kind, arg, value, message", HOSTILE_ARGS)
def test_hand_edited_neuron_args(saved_neuron, kind, arg, value, message):
    plan = json.loads((saved_neuron / "moefy.json").read_text())
    next(e for e in plan["layers"] if e["kind"] == kind)["args"][arg] = value
    refused_before_any_change(saved_neuron, plan, message)


def refused_before_any_change(saved, plan: dict, message: str) -> None:
    """``plan`` written over the saved one: loading it into a fresh model raises LoadError
    (``message``) and leaves the model as it was."""
    (saved / "moefy.json").write_text(json.dumps(plan))
    fresh = LlamaForCausalLM(LLAMA)
    before = snapshot(fresh)
    with pytest.raises(LoadError, match=message):
        moefy.load(saved, fresh)
    assert untouched(fresh, before)


def test_a_damaged_threshold_or_record(saved_neuron):
    from safetensors.torch import load_file, save_file

    plan = json.loads((saved_neuron / "moefy.json").read_text())
    plan["layers"][0]["state"]["conversion"] = ["neuron"]
    (saved_neuron / "moefy.json").write_text(json.dumps(plan))
    with pytest.raises(LoadError, match="conversion must be an object"):
        moefy.load(saved_neuron)
    plan["layers"][0]["state"]["conversion"] = None
    (saved_neuron / "moefy.json").write_text(json.dumps(plan))
    state = load_file(saved_neuron / "moefy.safetensors")
    state["model.layers.0.mlp.h_threshold"] = torch.zeros(2)
    save_file(state, saved_neuron / "moefy.safetensors",
              metadata={"format": "pt", "moefy": plan["id"]})
    fresh = LlamaForCausalLM(LLAMA)
    before = snapshot(fresh)
    with pytest.raises(LoadError, match="other shapes: model.layers.0.mlp.h_threshold"):
        moefy.load(saved_neuron, fresh)
    assert untouched(fresh, before)


def test_a_moefy_that_reads_format_2_says_upgrade(saved_neuron, monkeypatch):
    monkeypatch.setattr(plan_mod, "FORMAT_VERSION", 2)
    with pytest.raises(LoadError, match="plan format 3.*upgrade moefy"):
        moefy.load(saved_neuron)


def test_plans_without_neuron_layers_keep_their_format():
    moe = moefy.MoE(8, 16, num_experts=4, top_k=2)
    assert plan_mod.describe_model(moe)["format_version"] == 1
    [entry] = plan_mod.describe_model(SparseLinear(8, 4))["layers"]
    assert entry["kind"] == "SparseLinear" and entry["args"] == {
        "in_features": 8, "out_features": 4, "bias": True}


@pytest.mark.parametrize("value, message", (
    (["model.nowhere"], "no nn.Linear at 'model.nowhere'"),
    (["model.embed_tokens"], "no nn.Linear at 'model.embed_tokens'"),
    ("lm_head", "'decode_linear' is missing or not a list"),
    ([""], "'decode_linear' holds ''"),
    (["model.layers.0.self_attn.q_proj"], "both a module to read by rows and a layer"),
    (["model.layers.0.mlp.up_proj"], "both a module to read by rows and under a layer"),
))
def test_a_hand_edited_decode_linear_is_refused_before_any_change(saved_neuron, value,
                                                                   message):
    plan = json.loads((saved_neuron / "moefy.json").read_text())
    plan["decode_linear"] = value
    refused_before_any_change(saved_neuron, plan, message)


def test_a_plan_without_decode_linear_loads_a_plain_head(saved_neuron):
    """A plan written before the key existed: the head comes back as the nn.Linear it was."""
    plan = json.loads((saved_neuron / "moefy.json").read_text())
    del plan["decode_linear"]
    (saved_neuron / "moefy.json").write_text(json.dumps(plan))
    assert type(moefy.load(saved_neuron).lm_head) is torch.nn.Linear


def test_a_static_set_round_trips_bit_exact_with_its_smaller_shapes(tmp_path):
    model = neuron_model("static")
    sizes = [m.ffn_size for m in model.modules() if isinstance(m, NeuronFFN)]
    assert sum(sizes) < 2 * 64  # the FFNs shrank (by a share the allocation chose)
    ids = token_ids(length=24)
    ref_prefill, ref_decode = prefill_then_decode(model, ids)
    moefy.save(model, tmp_path)
    plan = json.loads((tmp_path / "moefy.json").read_text())
    ffn = next(e for e in plan["layers"] if e["kind"] == "NeuronFFN")
    assert ffn["args"] == {"hidden_size": 32, "ffn_size": sizes[0], "output_size": 32,
                           "activation": "silu", "gated": True, "bias": True,
                           "selection": "static"}
    assert {e["kind"] for e in plan["layers"]} == {"NeuronFFN"}  # attention stays dense
    for back in (moefy.load(tmp_path), moefy.load(tmp_path, LlamaForCausalLM(LLAMA))):
        prefill, decode = prefill_then_decode(back, ids)
        assert torch.equal(prefill, ref_prefill) and torch.equal(decode, ref_decode)
        layers = [m for m in back.modules() if isinstance(m, NeuronFFN)]
        assert [m.ffn_size for m in layers] == sizes
        assert all(m.conversion["share_keep"] == round(n / 64, 4)
                   for m, n in zip(layers, sizes, strict=True))
