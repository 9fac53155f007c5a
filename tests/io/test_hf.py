"""``moefy.export_hf``: real transformers loads of the written checkpoints (offline), logits and
greedy generations against the moefy model, and every refusal (typed, writes nothing)."""

import json

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import moefy
from moefy.errors import HFExportError
from moefy.io import hf

PROMPT = "The capital of France is"


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _perturb(model, seed=0):
    """Make the experts differ (an upcycled model's copies are identical: any routing would
    give the same output) and the routers and selection biases matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for moe in (m for m in model.modules() if isinstance(m, moefy.MoE)):
            for w in (moe.w_in, moe.w_gate, moe.w_out):
                w.mul_(1 + 0.3 * torch.randn(w.shape, generator=g))
            moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=g) * 0.5)
            if hasattr(moe, "selection_bias"):
                moe.selection_bias.copy_(torch.randn(moe.num_experts, generator=g) * 0.1)
    return model


def _load(path):
    model, info = tf.AutoModelForCausalLM.from_pretrained(
        path, local_files_only=True, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _assert_same(moe_model, loaded, ids, generate=True):
    with torch.no_grad():
        want = moe_model(input_ids=ids).logits
        got = loaded(input_ids=ids).logits
        assert _rel(got, want) < 1e-4, _rel(got, want)
        if generate:
            kw = dict(max_new_tokens=10, do_sample=False)
            assert torch.equal(loaded.generate(ids, **kw), moe_model.generate(ids, **kw))


def _keys(path):
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return set(f.keys()), f.metadata()


SMOLLM2_CASES = (  # (architecture, conversion, expected class, a tensor name the format uses)
    ("mixtral", dict(method="upcycle", num_experts=4, top_k=2), "MixtralForCausalLM",
     "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
    ("qwen2_moe", dict(method="upcycle", num_experts=4, top_k=2), "Qwen2MoeForCausalLM",
     "model.layers.1.mlp.shared_expert_gate.weight"),
    ("mixtral", dict(method="split", num_experts=4, top_k=1, shared_experts=2),
     "MixtralForCausalLM", "model.layers.0.block_sparse_moe.gate.weight"),
    ("glm4_moe", dict(method="upcycle", num_experts=4, top_k=2, router="sigmoid"),
     "Glm4MoeForCausalLM", "model.layers.0.mlp.gate.e_score_correction_bias"),
)


@pytest.mark.parametrize("arch,settings,cls,name", SMOLLM2_CASES)
def test_smollm2_exports_load_and_match(smollm2_slice, tmp_path, arch, settings, cls, name):
    dense, tokenizer = smollm2_slice(2)
    model = moefy.convert(dense, moefy.MoEConfig(**settings), verify=False)
    if settings["method"] == "upcycle":
        _perturb(model)
    # verify=False: this test loads it itself (the tiny models below cover verification)
    out = moefy.export_hf(model, tmp_path / "hf", arch, tokenizer=tokenizer, verify=False)
    loaded = _load(out)
    assert type(loaded).__name__ == cls
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    _assert_same(model, loaded, ids)
    keys, meta = _keys(out)
    assert name in keys and meta == {"format": "pt"}
    assert "lm_head.weight" not in keys and loaded.config.tie_word_embeddings  # tied, once
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == [cls]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["rms_norm_eps"] == dense.config.rms_norm_eps
    assert (out / "generation_config.json").is_file()
    if settings.get("shared_experts") and arch == "mixtral":  # folded into every expert
        assert loaded.config.intermediate_size == 1536 // 6 * 3
    again = tf.AutoTokenizer.from_pretrained(out, local_files_only=True)  # tokenizer files
    assert again(PROMPT).input_ids == tokenizer(PROMPT).input_ids


def test_no_tokenizer_files_without_a_tokenizer(tmp_path):
    model = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2)
    out = moefy.export_hf(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors"]


# ------------------------------------------------------------------ tiny random models
def _tiny(kind="llama", **extra):
    torch.manual_seed(0)
    common = dict(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    cls = {"llama": (tf.LlamaConfig, tf.LlamaForCausalLM),
           "mistral": (tf.MistralConfig, tf.MistralForCausalLM),
           "qwen2": (tf.Qwen2Config, tf.Qwen2ForCausalLM)}[kind]
    model = cls[1](cls[0](**{**common, **extra})).eval()
    with torch.no_grad():  # non-zero norm weights (and Qwen2's biases): they must carry over
        for name, p in model.named_parameters():
            if "norm" in name or (name.endswith("bias") and kind == "qwen2"):
                p.copy_(torch.randn_like(p) * 0.1 + (1.0 if "norm" in name else 0.0))
    return model


def _ids(n=10):
    return torch.randint(3, 96, (2, n), generator=torch.Generator().manual_seed(1))


def _convert(model, **settings):
    # verify=False: convert's own check is not what these tests are about, and it costs time
    return _perturb(moefy.convert(model, moefy.MoEConfig(**settings), verify=False))


def _same_names_as_transformers(out, tmp_path):
    """The checkpoint's tensor names equal what transformers itself writes for that config."""
    config = tf.AutoConfig.from_pretrained(out, local_files_only=True)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "ref")
    assert _keys(out)[0] == _keys(tmp_path / "ref")[0]


TINY_CASES = (  # (source, its config extras, conversion, architecture)
    # head_dim ≠ hidden / heads, untied head, linear RoPE scaling, attention biases all zero
    ("llama", dict(head_dim=16, tie_word_embeddings=False, attention_bias=True,
                   rope_parameters={"rope_type": "linear", "rope_theta": 500.0, "factor": 2.0}),
     dict(method="upcycle", num_experts=4, top_k=2), "mixtral"),
    ("qwen2", {}, dict(method="upcycle", num_experts=4, top_k=2), "qwen2_moe"),  # qkv biases
    ("qwen2", {}, dict(method="upcycle", num_experts=4, top_k=2, router="sigmoid"), "glm4_moe"),
    # one sliding window for all layers, shorter than the probe
    ("mistral", dict(sliding_window=4), dict(method="split", num_experts=4, top_k=1,
                                             shared_experts=4), "mixtral"),
    ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1),  # mixed
     dict(method="upcycle", num_experts=4, top_k=2), "qwen2_moe"),
    # dense layers: anywhere for qwen2_moe, a prefix for glm4_moe
    ("llama", {}, dict(method="upcycle", num_experts=4, top_k=2, keep_last=1), "qwen2_moe"),
    ("llama", {}, dict(method="split", num_experts=4, top_k=1, shared_experts=4,
                       router="sigmoid", keep_first=1), "glm4_moe"),
    # granular upcycling: still plain top-k over E
    ("llama", {}, dict(method="upcycle", num_experts=8, top_k=4, granularity=2), "mixtral"),
)


@pytest.mark.parametrize("kind,extra,settings,arch", TINY_CASES)
def test_tiny_models_export_exactly(tmp_path, kind, extra, settings, arch):
    model = _convert(_tiny(kind, **extra), **settings)
    out = moefy.export_hf(model, tmp_path / "hf", arch)
    loaded = _load(out)
    _assert_same(model, loaded, _ids(), generate=False)
    _same_names_as_transformers(out, tmp_path)


def test_qwen2_moe_shared_expert_is_exact_not_halved(tmp_path):
    model = _convert(_tiny("llama"), method="split", num_experts=4, top_k=1, shared_experts=4)
    loaded = _load(moefy.export_hf(model, tmp_path / "hf", "qwen2_moe"))
    block = loaded.model.layers[0].mlp
    assert block.shared_expert.down_proj.weight.shape == (32, 32)  # not folded: its own expert
    assert not block.shared_expert_gate.weight.any()  # σ(0) · 2 = 1
    _assert_same(model, loaded, _ids(), generate=False)


def test_layers_of_other_expert_widths_are_padded_exactly(tmp_path):
    model = _convert(_tiny(), method="split", num_experts=4, top_k=1, shared_experts=4)
    narrow = moefy.MoE(32, 4, 4, 1, activation="silu", gated=True, bias=False,
                       shared_expert_size=12, combine="sum")  # experts of 4, not 8; shared 12
    model.model.layers[1].mlp = narrow.eval()
    for arch in ("mixtral", "qwen2_moe"):
        loaded = _load(moefy.export_hf(model, tmp_path / arch, arch))
        _assert_same(model, loaded, _ids(), generate=False)
    assert loaded.config.shared_expert_intermediate_size == 32
    assert loaded.config.moe_intermediate_size == 8


def test_bfloat16_models_export_their_dtype(tmp_path):
    model = _convert(_tiny("llama").to(torch.bfloat16), method="upcycle", num_experts=4, top_k=2)
    out = moefy.export_hf(model, tmp_path / "hf", "mixtral")
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    loaded = tf.AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert loaded.dtype == torch.bfloat16
    with torch.no_grad():
        assert _rel(loaded(_ids()).logits.float(), model(_ids()).logits.float()) < 0.05


# ------------------------------------------------------------------ refusals
def _refused(model, tmp_path, arch, *needles):
    out = tmp_path / "out"
    with pytest.raises(HFExportError) as err:
        moefy.export_hf(model, out, arch)
    assert not out.exists(), "a refused export must write nothing"
    for needle in needles:
        assert needle in str(err.value), str(err.value)
    return str(err.value)


def test_refusals_name_a_format_that_holds_the_model(tmp_path):
    sigmoid = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2, router="sigmoid")
    _refused(sigmoid, tmp_path, "mixtral", "sigmoid router", "glm4_moe can hold")
    _refused(sigmoid, tmp_path, "deepseek_v3", "multi-head latent attention", "glm4_moe")
    softmax = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2)
    _refused(softmax, tmp_path, "deepseek_v3", "latent attention", "mixtral and qwen2_moe")
    _refused(softmax, tmp_path, "glm4_moe", "routes by softmax", "mixtral")
    dense_first = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2, keep_first=1)
    _refused(dense_first, tmp_path, "mixtral", "layers [0] are dense", "qwen2_moe can hold")
    biased = _convert(_tiny("qwen2"), method="upcycle", num_experts=4, top_k=2)
    _refused(biased, tmp_path, "mixtral", "q/k/v biases", "qwen2_moe can hold")
    mixed = _tiny("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    mixed = _convert(mixed, method="upcycle", num_experts=4, top_k=2)
    _refused(mixed, tmp_path, "mixtral", "sliding window", "qwen2_moe can hold")
    slid = _convert(_tiny("mistral", sliding_window=4), method="upcycle", num_experts=4,
                    top_k=2, router="sigmoid")
    _refused(slid, tmp_path, "glm4_moe", "no sliding-window", "No Hugging Face MoE format")
    o_bias = _tiny(attention_bias=True)
    with torch.no_grad():
        o_bias.model.layers[2].self_attn.o_proj.bias.fill_(0.1)
    o_bias = _convert(o_bias, method="upcycle", num_experts=4, top_k=2)
    _refused(o_bias, tmp_path, "qwen2_moe", "o_proj bias", "No Hugging Face MoE format")
    dense_last = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2, router="sigmoid",
                          keep_last=1)
    _refused(dense_last, tmp_path, "glm4_moe", "only as a prefix", "No Hugging Face MoE format")


ROUTING_REFUSALS = (  # (conversion, what the message names, what it says to change)
    (dict(method="split", num_experts=4, top_k=2), "unweighted", "top_k=1"),
    (dict(method="upcycle", num_experts=4, top_k=2, capacity_factor=1.0), "capacity_factor",
     "capacity_factor=None"),
    (dict(method="upcycle", num_experts=4, top_k=2, router="hash"), "router='hash'",
     "router='softmax'"),
    (dict(method="upcycle", num_experts=4, top_k=2, router="expert_choice"), "expert_choice",
     "moefy.save"),
    (dict(method="upcycle", num_experts=4, top_k=2, router="topp"), "router='topp'",
     "moefy.export_onnx"),
)


@pytest.mark.parametrize("settings,what,fix", ROUTING_REFUSALS)
def test_routing_no_format_holds_is_refused(tmp_path, settings, what, fix):
    model = _convert(_tiny(), **settings)
    for arch in ("mixtral", "qwen2_moe"):
        _refused(model, tmp_path, arch, what, fix, "No Hugging Face MoE format")


def test_noisy_router_and_top1_topp_export_as_softmax(tmp_path):
    for router in ("noisy", "topp"):
        model = _convert(_tiny(), method="upcycle", num_experts=4, top_k=1 if router == "topp"
                         else 2, router=router)
        loaded = _load(moefy.export_hf(model, tmp_path / router, "mixtral"))
        _assert_same(model, loaded, _ids(), generate=False)


def test_what_no_format_holds_in_a_layer_is_refused(tmp_path):
    model = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2)
    moe = model.model.layers[1].mlp
    moe.shared.bias = torch.nn.Parameter(torch.full((32,), 0.1))
    _refused(model, tmp_path, "qwen2_moe", "non-zero shared.bias", "moefy.save")
    moe.shared.bias = torch.nn.Parameter(torch.zeros(32))  # zero: dropped, exact
    _assert_same(model, _load(moefy.export_hf(model, tmp_path / "ok", "qwen2_moe")), _ids(),
                 generate=False)
    moe.router.bias = torch.nn.Parameter(torch.randn(4))  # a fitted split router's bias
    _refused(model, tmp_path, "mixtral", "router has a bias", "router_init='similarity'")
    moe.router.bias = None
    moe.shared.set_compensation(torch.randn(4, 32), torch.randn(32, 4), torch.zeros(32))
    _refused(model, tmp_path, "mixtral", "shared.compensation")
    moe.shared.compensation = None
    moe.activation = "relu"
    _refused(model, tmp_path, "mixtral", "activation 'relu'", "hidden_act is 'silu'")
    model.model.layers[1].mlp = moefy.MoE(32, 64, 4, 2, activation="silu", gated=False,
                                          bias=False)
    _refused(model, tmp_path, "mixtral", "non-gated")


def test_bad_arguments_are_refused(tmp_path):
    model = _convert(_tiny(), method="upcycle", num_experts=4, top_k=2)
    msg = _refused(model, tmp_path, "llama_moe")
    assert all(a in msg for a in hf.ARCHITECTURES)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(HFExportError, match="is a file"):
        moefy.export_hf(model, a_file)
    other = tmp_path / "other"
    other.mkdir()
    (other / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(HFExportError, match="another checkpoint"):
        moefy.export_hf(model, other)
    assert sorted(p.name for p in other.iterdir()) == ["model.safetensors.index.json"]
    moefy.save(model, tmp_path / "saved")  # a moefy checkpoint: the export must not mix in
    with pytest.raises(HFExportError, match=r"another checkpoint's weights \(moefy.json"):
        moefy.export_hf(model, tmp_path / "saved")
    (tmp_path / "card").mkdir()
    (tmp_path / "card" / "model-card.md").write_text("# notes")  # not weights: fine
    moefy.export_hf(model, tmp_path / "card", verify=False)
    _refused(_tiny(), tmp_path, "mixtral", "no moefy MoE layers", "convert it first",
             "moefy.save")
    _refused(torch.nn.Linear(4, 4), tmp_path, "mixtral", "got Linear", "moefy.save")
    peer = _tiny()
    peer.model.layers[0].mlp = moefy.PEER(32, 16, heads=1, top_k=2)
    _refused(peer, tmp_path, "mixtral", "PEER", "moefy.export_onnx")



def test_the_dense_models_own_folder_is_refused_and_left_as_it_was(tmp_path):
    dense = _tiny()
    dense.save_pretrained(tmp_path / "dense")  # config.json + model.safetensors of a llama
    before = {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()}
    model = _convert(dense, method="upcycle", num_experts=4, top_k=2)
    with pytest.raises(HFExportError, match=r"a model that export_hf did not write \(config"
                                            r".*save_pretrained.*new or empty directory"):
        moefy.export_hf(model, tmp_path / "dense", verify=False)
    assert {p.name: p.read_bytes() for p in (tmp_path / "dense").iterdir()} == before
    (tmp_path / "weights").mkdir()  # weights alone, no config: not an export's either
    (tmp_path / "weights" / "model.safetensors").write_bytes(b"dense")
    with pytest.raises(HFExportError, match="did not write"):
        moefy.export_hf(model, tmp_path / "weights", verify=False)
    out = moefy.export_hf(model, tmp_path / "hf", verify=False)
    assert hf.exported_architecture(out) == "mixtral"
    moefy.export_hf(model, out, "qwen2_moe", verify=False)  # an earlier export is replaced
    assert hf.exported_architecture(out) == "qwen2_moe"
    assert hf.exported_architecture(tmp_path / "dense") is None

BROKEN_WRITES = (  # (tensor, None: left out / a factor, what the verification reports)
    ("model.layers.0.block_sparse_moe.experts.1.w3.weight", None, "cannot load it.*conversion"),
    ("model.norm.weight", None, "missing_keys.*model.norm.weight"),
    ("model.layers.2.block_sparse_moe.experts.0.w2.weight", 3.0, "logits differ"),
)


@pytest.mark.parametrize("name,factor,report", BROKEN_WRITES)
def test_a_checkpoint_that_does_not_verify_is_removed(tmp_path, monkeypatch, name, factor,
                                                      report):
    model = _convert(_tiny(), method="upcycle", num_experts=4, top_k=4)  # every expert used
    real = hf._tensors

    def broken(src, arch):
        tensors, width, shared = real(src, arch)
        if factor is None:
            del tensors[name]
        else:
            tensors[name] *= factor
        return tensors, width, shared

    monkeypatch.setattr(hf, "_tensors", broken)
    with pytest.raises(HFExportError, match=f"does not reproduce.*{report}"):
        moefy.export_hf(model, tmp_path / "hf")
    assert not list((tmp_path / "hf").iterdir())
