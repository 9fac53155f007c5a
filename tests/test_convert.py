"""convert(): every FFN found in many architectures; exact where the method preserves the
function; the caller's model untouched; clear errors."""

import copy
import inspect
import math
import time

import pytest
import torch
from torch.utils._pytree import tree_leaves

import moefy
from moefy.errors import AlreadyConvertedError, ConversionError, NoFFNFoundError
from moefy.passes.trace import split_inputs
from tests.passes.models import custom_models, hf_configs

HF = hf_configs()
CUSTOM = custom_models()
GRAPH_MODE = {"sliced_glu"}  # FFN inline in the model's own forward: a GraphModule
# FFN inline in a layer's forward: that layer alone becomes a GraphModule
GRAPH_MODE_LAYERS = {"transformer_encoder"}
EXACT_CONFIGS = (
    ("split", dict(method="split", num_experts=4, top_k=4)),
    ("split_shared_random", dict(method="split", num_experts=6, top_k=6, shared_experts=2,
                                 partition="random")),
    ("upcycle", dict(method="upcycle", num_experts=4, top_k=2)),
    ("upcycle_granular", dict(method="upcycle", num_experts=8, top_k=4, granularity=2)),
)


def build(name):
    if name in HF:
        config, cls, n = HF[name]
        torch.manual_seed(0)
        return cls(config).eval(), None, n
    model, inputs, n = CUSTOM[name]
    return copy.deepcopy(model).eval(), inputs, n


def outputs(model, inputs):
    args, kwargs = split_inputs(model, inputs)
    with torch.no_grad():
        return [t for t in tree_leaves(model(*args, **kwargs)) if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("cfg_name,cfg", EXACT_CONFIGS)
@pytest.mark.parametrize("name", sorted(HF) + sorted(CUSTOM))
def test_convert_finds_every_ffn_and_is_exact(name, cfg_name, cfg):
    model, inputs, expected = build(name)
    if inputs is None:
        inputs = split_inputs(model, None)[1]
    before = copy.deepcopy(model.state_dict())
    moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=inputs)
    moes = [m for m in moe_model.modules() if isinstance(m, moefy.MoE)]
    assert len(moes) == expected
    if name in GRAPH_MODE:  # FFN inline in a larger forward: graph mode
        assert isinstance(moe_model, torch.fx.GraphModule)
    else:
        assert type(moe_model) is type(model)
    if name in GRAPH_MODE_LAYERS:
        assert all(isinstance(layer, torch.fx.GraphModule) for layer in moe_model.layers)
    for ref, got in zip(outputs(model, inputs), outputs(moe_model, inputs), strict=True):
        if ref.is_floating_point():
            torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    # the caller's model is untouched
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(isinstance(m, moefy.MoE) for m in model.modules())
    with pytest.raises(AlreadyConvertedError, match="already"):
        moefy.convert(moe_model, moefy.MoEConfig(**cfg), example_inputs=inputs)


def test_generate_and_save_pretrained_still_work(tmp_path):
    import transformers as tf
    model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=99, n_embd=32, n_layer=2, n_head=2,
                                             n_positions=64)).eval()
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    ids = torch.randint(0, 99, (1, 5))
    with torch.no_grad():
        dense_out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        moe_out = moe_model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(dense_out, moe_out)  # upcycling is exact at initialisation
    moe_model.save_pretrained(tmp_path)
    assert any(p.suffix == ".safetensors" for p in tmp_path.iterdir())


def test_only_skip_keep_first_last():
    model, inputs, _ = build("nanogpt")
    def names(m):
        return [x.conversion["name"] for x in m.modules() if isinstance(x, moefy.MoE)]

    cfg = dict(method="split", num_experts=4, top_k=4)
    assert names(moefy.convert(model, moefy.MoEConfig(**cfg, keep_first=1), example_inputs=inputs)
                 ) == ["blocks.1.mlp", "blocks.2.mlp"]
    assert names(moefy.convert(model, moefy.MoEConfig(**cfg, keep_last=2), example_inputs=inputs)
                 ) == ["blocks.0.mlp"]
    assert names(moefy.convert(model, moefy.MoEConfig(**cfg, only=["blocks.1.*"]),
                               example_inputs=inputs)) == ["blocks.1.mlp"]
    assert names(moefy.convert(model, moefy.MoEConfig(**cfg, skip=["blocks.1.*"]),
                               example_inputs=inputs)) == ["blocks.0.mlp", "blocks.2.mlp"]
    with pytest.raises(NoFFNFoundError, match="left none"):
        moefy.convert(model, moefy.MoEConfig(**cfg, only=["nothing*"]), example_inputs=inputs)


def test_split_records_neurons_and_partitions_cover_the_ffn():
    model, inputs, _ = build("sequential")
    for partition in ("contiguous", "random", "kmeans"):
        cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2, shared_experts=4,
                              partition=partition)
        moe = moefy.convert(model, cfg, example_inputs=inputs)[0]
        flat = sorted(sum(moe.expert_neurons, []) + moe.shared_neurons)
        assert flat == list(range(128))
        assert len(moe.shared_neurons) == 4 * 16 and all(len(e) == 16 for e in moe.expert_neurons)


def test_report_rows():
    model, inputs, _ = build("sequential")
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=1, shared_experts=4)
    text = moefy.report(moefy.convert(model, cfg, example_inputs=inputs))
    lines = text.splitlines()
    assert lines[0].split()[:5] == ["name", "method", "E", "k", "shared"]
    assert len(lines) == 3
    assert "62%" in lines[1]  # (1 routed + 4 shared) of 8 groups of 16 neurons = 62.5%


# ---------------------------------------------------------------------------- bad input


class NoFFN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.b(torch.softmax(self.a(x), -1))  # softmax is not element-wise


class SharedHidden(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return self.b(h) + h.sum(-1, keepdim=True)  # the hidden activation is used elsewhere


def test_no_ffn_found_says_what_was_searched():
    with pytest.raises(NoFFNFoundError, match="not an activation of a projection"):
        moefy.convert(NoFFN(), moefy.MoEConfig(), example_inputs=(torch.randn(2, 8),))


def test_hidden_activation_used_elsewhere_is_rejected_with_reason():
    with pytest.raises(NoFFNFoundError, match="also used by"):
        moefy.convert(SharedHidden(), moefy.MoEConfig(num_experts=4, top_k=2),
                      example_inputs=(torch.randn(2, 8),))


def test_bad_config_values():
    with pytest.raises(ValueError, match="top_k"):
        moefy.MoEConfig(num_experts=4, top_k=8)
    with pytest.raises(ValueError, match="method"):
        moefy.MoEConfig(method="merge")
    with pytest.raises(ValueError, match="partition"):
        moefy.MoEConfig(partition="spectral")


def test_width_not_divisible_names_layer_and_options():
    model, inputs, _ = build("sequential")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match=r"width 128 .* 5 equal experts.*\[2, 4, 8"):
        moefy.convert(model, moefy.MoEConfig(num_experts=5, top_k=2), example_inputs=inputs,
                      inplace=True)
    # raised before anything changed, even in place
    assert not any(isinstance(m, moefy.MoE) for m in model.modules())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_untraceable_model_without_example_inputs():
    from moefy.errors import TraceError
    with pytest.raises(TraceError, match="pass example_inputs"):
        moefy.convert(CUSTOM["sequential"][0], moefy.MoEConfig())


def test_inplace_changes_the_model_itself():
    model, inputs, _ = build("sequential")
    out = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs,
                        inplace=True)
    assert out is model and isinstance(model[0], moefy.MoE)


def test_graph_mode_refuses_inplace_before_changing_anything():
    model, inputs, _ = build("sliced_glu")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match="inplace=False"):
        moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs,
                      inplace=True)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_graph_mode_drops_dense_ffn_weights():
    model, inputs, _ = build("transformer_encoder")
    gm = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs)
    names = [n for n, _ in gm.named_parameters()]
    assert not any("linear1" in n or "linear2" in n for n in names if "moefy_ffn" not in n)
    assert any("self_attn" in n for n in names)


def test_graph_mode_result_takes_other_shapes():
    model, inputs, _ = build("transformer_encoder")
    gm = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs)
    x = torch.randn(3, 9, 32)
    with torch.no_grad():
        torch.testing.assert_close(gm(x), model(x), rtol=1e-5, atol=1e-5)


def test_coactivation_partition_from_calibration_data():
    model, inputs, _ = build("nanogpt")
    data = [(torch.randn(4, 6, 32),) for _ in range(3)]
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=8, shared_experts=0,
                          partition="coactivation")
    moe_model = moefy.convert(model, cfg, example_inputs=inputs, calibration_data=data)
    for ref, got in zip(outputs(model, inputs), outputs(moe_model, inputs), strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert sorted(sum(moe.expert_neurons, [])) == list(range(128))
    with pytest.raises(ConversionError, match="needs calibration_data"):
        moefy.convert(model, cfg, example_inputs=inputs)


def test_calibration_picks_the_most_often_marked_neurons_as_shared():
    from moefy.passes.calibrate import collect_stats
    from moefy.passes.find_ffn import find_ffns
    from moefy.passes.trace import export_model
    model, inputs, _ = build("sequential")
    data = [(torch.randn(8, 5, 32),) for _ in range(2)]
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2, shared_experts=4)
    moe = moefy.convert(model, cfg, example_inputs=inputs, calibration_data=data)[0]
    ep = export_model(model, *split_inputs(model, inputs))
    stats = collect_stats(ep, find_ffns(ep)[0], [((x,), {}) for (x,) in data])
    first = next(iter(stats.values()))
    assert first.tokens == 2 * 8 * 5
    # CMoE: shared = the neurons most often among a token's strongest activations
    score = first.marked + first.active / first.tokens
    top = set(torch.argsort(score, descending=True, stable=True)[:64].tolist())
    assert set(moe.shared_neurons) == top


def test_explain_lists_every_candidate(capsys):
    model, inputs, _ = build("nanogpt")
    moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs,
                  explain=True)
    out = capsys.readouterr().out
    assert "3 FFN(s) found" in out
    assert out.count("+ blocks.") == 3
    assert "not an activation of a projection" in out  # the attention projections


def break_builder(monkeypatch, method: str) -> None:
    """Make the ``method`` builder carve wrong weights (outputs scaled by 1.5)."""
    from moefy.passes import build as build_pass
    real = getattr(build_pass, method)

    def broken(*args, **kwargs):
        moe = real(*args, **kwargs)
        with torch.no_grad():
            moe.w_out.mul_(1.5)
        return moe

    monkeypatch.setattr(build_pass, method, broken)


def test_verification_failure_is_a_typed_error(monkeypatch):
    from moefy.errors import VerificationError
    break_builder(monkeypatch, "split")
    model, inputs, _ = build("sequential")
    with pytest.raises(VerificationError, match="max difference"):
        moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs)


class DataDependentTop(torch.nn.Module):
    """Top-level forward with data-dependent control flow (does not export as a whole); its
    blocks do, and are converted one by one."""

    def __init__(self):
        super().__init__()
        from tests.passes.models import NanoBlock
        self.a, self.b = NanoBlock(), NanoBlock()

    def forward(self, x):
        x = self.a(x)
        if x.sum() > 0:  # data-dependent branch
            return self.b(x)
        return self.b(-x)


def test_untraceable_top_level_falls_back_to_submodules():
    model = DataDependentTop().eval()
    x = torch.randn(2, 5, 32)
    moe_model = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4),
                              example_inputs=(x,))
    assert type(moe_model) is DataDependentTop
    names = sorted(m.conversion["name"] for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert names == ["a.mlp", "b.mlp"]
    for sign in (1, -1):
        with torch.no_grad():
            torch.testing.assert_close(moe_model(sign * x), model(sign * x), rtol=1e-5, atol=1e-5)


def test_graph_mode_only_where_selected_ffns_need_it():
    # skip the inline FFNs of the encoder layers: nothing needs graph mode, nothing converts
    model, inputs, _ = build("transformer_encoder")
    with pytest.raises(NoFFNFoundError, match="left none"):
        moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4, skip=["layers.*"]),
                      example_inputs=inputs)


def test_model_in_training_mode_converts_and_keeps_its_mode():
    config, cls, _ = HF["bert"]
    model = cls(config).train()
    moe_model = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4))
    assert model.training and moe_model.training
    assert all(m.training for m in moe_model.modules() if isinstance(m, moefy.MoE))


@pytest.mark.parametrize("method", ("split", "upcycle"))
def test_bfloat16_model(method):
    config, cls, _ = HF["llama"]
    model = cls(config).eval().bfloat16()
    k = 4 if method == "split" else 2
    moe_model = moefy.convert(model, moefy.MoEConfig(method=method, num_experts=4, top_k=k))
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert moe.w_in.dtype == torch.bfloat16


def test_hash_routing_follows_token_ids():
    from transformers import BertConfig, BertModel
    cfg = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=64)
    model = BertModel(cfg).eval()
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=1,
                                                     router="hash"))
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    ids = torch.tensor([[5, 9, 5, 17]])
    seen = []
    moe.register_forward_hook(lambda m, a, out: seen.append(m.route(a[0])[1]))
    with torch.no_grad():
        y = moe_model(input_ids=ids).last_hidden_state
        ref = model(input_ids=ids).last_hidden_state
    routed = seen[0].reshape(-1)
    assert routed[0] == routed[2]  # same token, same expert
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)  # upcycled copies: exact
    # nothing stays behind: a direct call of the layer has no ids to reuse
    with pytest.raises(ValueError, match="token_ids"):
        moe(torch.randn(4, 32))


# --------------------------------------------------------------------------- guarantees


def test_inplace_verification_compares_with_the_dense_outputs_recorded_before(monkeypatch):
    """In place, the dense model *is* the result: verification must use outputs recorded
    before the change, or a broken conversion compares equal to itself."""
    from moefy.errors import VerificationError
    break_builder(monkeypatch, "upcycle")
    model, inputs, _ = build("sequential")
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(VerificationError, match="max difference"):
        moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2),
                      example_inputs=inputs, inplace=True)
    assert not any(isinstance(m, moefy.MoE) for m in model.modules())  # put back
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_a_build_failure_in_place_puts_every_module_back(monkeypatch):
    from moefy.passes import build as build_pass
    real, calls = build_pass.upcycle, []

    def fails_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise ConversionError("injected")
        return real(*args, **kwargs)

    monkeypatch.setattr(build_pass, "upcycle", fails_second)
    model, inputs, _ = build("nanogpt")
    before = [type(m) for m in model.modules()]
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ConversionError, match="injected"):
        moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2),
                      example_inputs=inputs, inplace=True)
    assert [type(m) for m in model.modules()] == before
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_hash_router_without_token_ids_fails_before_changing_anything():
    model, inputs, _ = build("sequential")  # float inputs: no token ids to hash
    before = [type(m) for m in model.modules()]
    with pytest.raises(ConversionError, match="input_ids"):
        moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=1,
                                             router="hash"),
                      example_inputs=inputs, inplace=True)
    assert [type(m) for m in model.modules()] == before


NOT_PRESERVING = (
    dict(method="upcycle", num_experts=4, top_k=1, capacity_factor=0.5),
    dict(method="upcycle", num_experts=4, top_k=2, router="expert_choice"),
    dict(method="split", num_experts=4, top_k=4, router="topp", top_p=0.3),
    dict(method="upcycle", num_experts=8, top_k=4, granularity=2, router="topp", top_p=0.3),
)


@pytest.mark.parametrize("cfg", NOT_PRESERVING)
def test_configurations_not_preserving_the_function_verify_what_they_can(cfg):
    model, inputs, _ = build("nanogpt")
    moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=inputs)
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert "not function-preserving by design" in moe.conversion["verified"]
    assert "every expert active" in moe.conversion["verified"]


def test_function_preserving_configuration_says_it_was_exact():
    model, inputs, _ = build("nanogpt")
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2,
                                                     router="topp"), example_inputs=inputs)
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert moe.conversion["verified"].startswith("exact")


def test_non_finite_dense_output_is_reported_as_that_before_any_change():
    from moefy.errors import VerificationError
    model, (x,), _ = build("sequential")
    x = x.clone()
    x[0, 0, 0] = float("nan")
    with pytest.raises(VerificationError, match="dense model's output"):
        moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=(x,),
                      inplace=True)
    assert not any(isinstance(m, moefy.MoE) for m in model.modules())


@pytest.mark.parametrize("poison", (float("nan"), float("inf"), 1e30))
def test_a_poisoned_calibration_token_is_skipped_and_counted(poison):
    model, inputs, _ = build("nanogpt")
    data = [(torch.randn(8, 32, 32),) for _ in range(3)]
    bad = [(d[0].clone(),) for d in data]
    bad[1][0][2, 3, :] = poison
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2, compensate="linear")
    clean = moefy.convert(model, cfg, example_inputs=inputs, calibration_data=data)
    got = moefy.convert(model, cfg, example_inputs=inputs, calibration_data=bad)
    x = torch.randn(4, 16, 32)
    with torch.no_grad():
        ref, y_clean, y = model(x), clean(x), got(x)
    assert torch.isfinite(y).all()
    err = lambda a: float((a - ref).norm() / ref.norm())  # noqa: E731
    assert err(y) < 1.5 * err(y_clean) + 0.02  # as good as without the poisoned token
    moes = [m for m in got.modules() if isinstance(m, moefy.MoE)]
    assert moes[0].conversion["calibration_skipped"] == 1
    assert all(m.conversion["calibration_tokens"] == 3 * 8 * 32 - 1 for m in moes[:1])
    assert "skipped" in moefy.report(got)


def test_calibration_batch_that_does_not_fit_is_a_clear_error_before_any_change():
    model, inputs, _ = build("nanogpt")
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2)
    for data, what in (([(torch.randn(2, 5, 16),)], "batch 0"),
                       ([(torch.randn(2, 5, 32),), (torch.randn(2, 5, 32).double(),)], "batch 1"),
                       (["text"], "batch 0")):
        with pytest.raises(ConversionError, match=what):
            moefy.convert(model, cfg, example_inputs=inputs, calibration_data=data,
                          inplace=True)
        assert not any(isinstance(m, moefy.MoE) for m in model.modules())


class TakesBias(torch.nn.Module):
    """An optional keyword input that changes the FFN's input."""

    def __init__(self):
        super().__init__()
        self.f = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                     torch.nn.Linear(64, 16))

    def forward(self, x, bias=None):
        return self.f(x if bias is None else x + bias)


def test_calibration_batch_with_inputs_the_trace_lacks_is_refused_not_dropped():
    x = torch.randn(4, 16)
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2)
    with pytest.raises(ConversionError, match="not those the model was traced with"):
        moefy.convert(TakesBias(), cfg, example_inputs=(x,),
                      calibration_data=[(x, torch.full((16,), 100.0))])
    with pytest.raises(ConversionError, match="dtype or rank"):
        moefy.convert(TakesBias(), cfg, example_inputs=(x,), calibration_data=[(x.double(),)])


def test_hugging_face_model_traces_with_the_first_calibration_batch():
    from transformers import BatchEncoding
    config, cls, _ = HF["bert"]
    model = cls(config).eval()
    ids = torch.randint(0, 99, (4, 12))
    batches = [BatchEncoding({"input_ids": ids})]  # no attention_mask, a tokenizer's type
    moe_model = moefy.convert(model, moefy.MoEConfig(method="split", num_experts=4, top_k=4),
                              calibration_data=batches)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(input_ids=ids).last_hidden_state,
                                   model(input_ids=ids).last_hidden_state,
                                   rtol=1e-4, atol=1e-5)


def test_calibration_without_one_usable_token_is_an_error():
    model, inputs, _ = build("nanogpt")
    data = [(torch.full((2, 8, 32), float("nan")),)]
    with pytest.raises(ConversionError, match="no usable token"):
        moefy.convert(model, moefy.MoEConfig(method="split", num_experts=4, top_k=2),
                      example_inputs=inputs, calibration_data=data)


def test_a_layer_fit_is_verified_as_what_it_is():
    model, inputs, _ = build("nanogpt")
    data = [(torch.randn(8, 32, 32),) for _ in range(2)]
    moe_model = moefy.convert(model, moefy.MoEConfig(method="split", num_experts=4, top_k=2,
                                                     fit_steps=3),
                              example_inputs=inputs, calibration_data=data)
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert "outputs are finite" in moe.conversion["verified"]


def test_two_threads_converting_at_once_both_succeed():
    import threading
    results, errors = [], []

    def work():
        try:
            model, inputs, _ = build("nanogpt")
            results.append(moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4),
                                         example_inputs=inputs))
        except Exception as exc:  # collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 2


def test_example_inputs_the_model_cannot_take_are_clear_errors():
    seq = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 16)).eval()
    cfg = moefy.MoEConfig(num_experts=4, top_k=2)
    with pytest.raises(ConversionError, match="does not run on the example inputs"):
        moefy.convert(seq, cfg, example_inputs=(torch.randint(0, 5, (3, 16)),))
    with pytest.raises(ConversionError, match="empty"):
        moefy.convert(seq, cfg, example_inputs=(torch.randn(0, 16),))
    with torch.device("meta"):
        meta = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                                   torch.nn.Linear(64, 16))
    with pytest.raises(ConversionError, match="meta device"):
        moefy.convert(meta, cfg, example_inputs=(torch.randn(3, 16),))


def test_an_endless_calibration_stream_stops_at_the_token_budget():
    import itertools
    model, inputs, _ = build("nanogpt")
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2, calibration_tokens=2000)
    stream = itertools.repeat((torch.randn(4, 50, 32),))  # never ends
    moe_model = moefy.convert(model, cfg, example_inputs=inputs, calibration_data=stream)
    moe = next(m for m in moe_model.modules() if isinstance(m, moefy.MoE))
    assert 2000 <= moe.conversion["calibration_tokens"] < 2200


class MaskedBlock(torch.nn.Module):
    """An FFN inline in a forward with an optional mask: graph mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 64), torch.nn.Linear(64, 16)

    def forward(self, x, mask=None):
        if mask is not None:
            x = x * mask[..., None]
        return x + self.b(torch.relu(self.a(x)))


class MaskedNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blk = MaskedBlock()

    def forward(self, x, mask=None):
        return self.blk(x, mask=mask)


def test_graph_mode_refuses_an_input_its_trace_dropped():
    from moefy.errors import InputError
    net, x = MaskedNet().eval(), torch.randn(2, 5, 16)
    mask = torch.ones(2, 5)
    mask[1, 3:] = 0
    moe_model = moefy.convert(net, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=(x,))
    assert isinstance(moe_model.blk, torch.fx.GraphModule)
    with pytest.raises(InputError, match="mask= was None"):  # it would be ignored silently
        moe_model(x, mask=mask)
    traced_with = moefy.convert(net, moefy.MoEConfig(num_experts=4, top_k=4),
                                example_inputs=(x, mask))
    with torch.no_grad():
        torch.testing.assert_close(traced_with(x, mask), net(x, mask), rtol=1e-5, atol=1e-5)


def test_a_nan_token_shows_nan_not_a_made_up_value():
    seq = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(),
                              torch.nn.Linear(64, 16)).eval()
    moe_model = moefy.convert(seq, moefy.MoEConfig(num_experts=4, top_k=2),
                              example_inputs=(torch.randn(3, 16),))
    x = torch.randn(5, 16)
    x[2, 1] = float("nan")
    with torch.no_grad():
        y = moe_model(x)
    assert torch.isnan(y[2]).all() and torch.isfinite(y[[0, 1, 3, 4]]).all()


def test_fit_steps_without_calibration_data_is_an_error():
    model, inputs, _ = build("sequential")
    with pytest.raises(ConversionError, match="fit_steps"):
        moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=2, fit_steps=5),
                      example_inputs=inputs)


def test_convert_inside_a_calibration_generator_does_not_deadlock():
    model, inputs, _ = build("sequential")

    def batches():
        inner = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4),
                              example_inputs=inputs)
        assert isinstance(inner[0], moefy.MoE)
        yield (torch.randn(4, 5, 32),)

    moefy.convert(model, moefy.MoEConfig(method="split", num_experts=4, top_k=2),
                  example_inputs=inputs, calibration_data=batches())


class _TwoLayerFFN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(16, 64)
        self.down = torch.nn.Linear(64, 16)

    def forward(self, x):
        return self.down(torch.nn.functional.gelu(self.up(x)))


@pytest.mark.parametrize("config", (
    moefy.MoEConfig(method="split", num_experts=4, top_k=2),  # router_init "fit" with data
    moefy.MoEConfig(method="peer", top_k=16),  # keys and query fitted with data
))
def test_fitting_conversions_refuse_inference_mode_before_any_change(config):
    model = _TwoLayerFFN()
    before = copy.deepcopy(model.state_dict())
    data = [(torch.randn(256, 16),)]
    with torch.inference_mode(), pytest.raises(ConversionError, match="inference_mode"):
        moefy.convert(model, config, calibration_data=data, inplace=True)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with torch.no_grad():  # the way out the message gives
        converted = moefy.convert(model, config, calibration_data=data)
    assert converted(torch.randn(3, 16)).shape == (3, 16)


def _tiny_lm():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64)
    return tf.LlamaForCausalLM(cfg).eval()


def _kl_to(dense, moe, batches) -> float:
    total = 0.0
    with torch.no_grad():
        for b in batches:
            t = dense(**b).logits.log_softmax(-1)
            s = moe(**b).logits.log_softmax(-1)
            total += (t.exp() * (t - s)).sum(-1).mean().item()
    return total / len(batches)


def test_minutes_distils_what_building_leaves_of_the_budget():
    dense = _tiny_lm()
    gen = torch.Generator().manual_seed(1)
    calib = [{"input_ids": torch.randint(0, 64, (4, 32), generator=gen)} for _ in range(6)]
    held = [{"input_ids": torch.randint(0, 64, (4, 32), generator=gen)} for _ in range(2)]
    before = copy.deepcopy(dense.state_dict())
    t0 = time.perf_counter()
    plain = moefy.convert(dense, moefy.MoEConfig.for_budget(0.25, experts=16),
                          calibration_data=calib)
    seconds = time.perf_counter() - t0 + 6.0  # what building takes here, and 6 s to distil
    t0 = time.perf_counter()
    budget = moefy.convert(dense, moefy.MoEConfig.for_budget(0.25, minutes=seconds / 60,
                                                             experts=16),
                           calibration_data=calib)
    elapsed = time.perf_counter() - t0
    info = next(m for m in budget.modules() if isinstance(m, moefy.MoE)).conversion["distill"]
    assert info["steps"] > 2 and info["loss_last"] < info["loss_first"]
    per_step = info["seconds"] / info["steps"]
    assert elapsed < seconds + 2 * per_step + 1.0  # the budget, a step over at most
    assert _kl_to(dense, budget, held) < 0.8 * _kl_to(dense, plain, held)  # held-out tokens
    assert all(torch.equal(v, dense.state_dict()[k]) for k, v in before.items())  # teacher


def test_minutes_under_no_grad_still_distils():
    """convert's own advice for inference mode is torch.no_grad(): distillation must still
    train there."""
    dense = _tiny_lm()
    gen = torch.Generator().manual_seed(2)
    calib = [{"input_ids": torch.randint(0, 64, (4, 32), generator=gen),
              "attention_mask": torch.ones(4, 32, dtype=torch.long)} for _ in range(4)]
    calib.append({"input_ids": torch.zeros(4, 32, dtype=torch.long),
                  "attention_mask": torch.zeros(4, 32, dtype=torch.long)})  # all padding
    t0 = time.perf_counter()
    moefy.convert(dense, moefy.MoEConfig.for_budget(0.5, experts=8), calibration_data=calib)
    seconds = time.perf_counter() - t0 + 3.0
    with torch.no_grad():
        moe = moefy.convert(dense, moefy.MoEConfig.for_budget(0.5, minutes=seconds / 60,
                                                              experts=8),
                            calibration_data=calib)
    info = next(m for m in moe.modules() if isinstance(m, moefy.MoE)).conversion["distill"]
    assert info["steps"] >= 2 and all(math.isfinite(info[k]) for k in ("loss_first",
                                                                          "loss_last"))


def test_minutes_needs_calibration_and_a_copy():
    dense = _tiny_lm()
    batch = {"input_ids": torch.randint(0, 64, (2, 8))}
    with pytest.raises(ConversionError, match="calibration_data"):
        moefy.convert(dense, moefy.MoEConfig(num_experts=4, top_k=2, minutes=1),
                      example_inputs=batch)
    with pytest.raises(ConversionError, match="inplace"):
        moefy.convert(dense, moefy.MoEConfig.for_budget(0.5, minutes=1, experts=8),
                      calibration_data=[batch], inplace=True)
    assert not any(isinstance(m, moefy.MoE) for m in dense.modules())


def test_minutes_leaves_an_exact_conversion_alone():
    dense = _tiny_lm()
    calib = [{"input_ids": torch.randint(0, 64, (2, 16))}]
    moe = moefy.convert(dense, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2,
                                               minutes=0.05), calibration_data=calib)
    info = next(m for m in moe.modules() if isinstance(m, moefy.MoE)).conversion["distill"]
    assert info["steps"] == 0 and "exact" in info["why"]


def test_each_lever_helps_on_a_real_smollm2_slice(smollm2_slice):
    """Two real SmolLM2 layers at 25% active, measured on held-out text (KL of the output
    distributions to the dense slice): calibration (co-activation partition, shared experts,
    fitted router) beats the weights alone, compensation adds to it, distillation for the
    time building leaves adds more."""
    import dataclasses
    from pathlib import Path

    model, tokenizer = smollm2_slice(2)
    src = Path(inspect.__file__).parent  # the standard library: text that moefy's moves leave be

    def batches(names, rows):
        text = "\n".join((src / n).read_text() for n in names)
        ids = tokenizer(text, return_tensors="pt").input_ids[0]
        ids = ids[: rows * 256].view(rows, 256)
        return [{"input_ids": b, "attention_mask": torch.ones_like(b)} for b in ids.split(4)]

    calib = batches(["argparse.py", "pathlib.py", "dataclasses.py"], 20)  # 5120 tokens
    held = batches(["textwrap.py", "fractions.py"], 4)
    recipe = moefy.MoEConfig.for_budget(0.25, experts=16)
    weights_only = moefy.MoEConfig(num_experts=recipe.num_experts, top_k=recipe.top_k,
                                   shared_experts=recipe.shared_experts)
    no_comp = dataclasses.replace(recipe, compensate=False)
    kl = {}
    for name, cfg, data in [("weights", weights_only, None), ("calibrated", no_comp, calib),
                            ("compensated", recipe, calib)]:
        t0 = time.perf_counter()
        moe = moefy.convert(model, cfg, calibration_data=data,
                            example_inputs=None if data else held[0])
        building = time.perf_counter() - t0
        kl[name] = _kl_to(model, moe, held)
    distilled = moefy.convert(model, dataclasses.replace(recipe, minutes=(building + 25) / 60),
                              calibration_data=calib)
    kl["distilled"] = _kl_to(model, distilled, held)
    assert kl["weights"] > kl["calibrated"] > kl["compensated"] > kl["distilled"], kl
