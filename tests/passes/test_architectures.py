"""Many architectures convert exactly (upcycle, and split with every expert active), keep
their class, and leave the caller's model untouched; shared FFNs stay shared; graph mode
converts only the module that needs it; export shapes are dynamic only in batch and
sequence. Random tiny configs (tests/passes/models.py); nothing is downloaded."""

import copy
import inspect
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._pytree import tree_leaves

import moefy
from moefy.errors import InputError
from moefy.passes import trace
from moefy.passes.rewrite import ChannelsLast
from tests.passes.models import architecture_configs, custom_models

CONFIGS = architecture_configs()
ARCHITECTURES = tuple(sorted(CONFIGS))
METHODS = (
    ("upcycle", dict(method="upcycle", num_experts=4, top_k=2)),
    ("split", dict(method="split", num_experts=4, top_k=4)),  # every expert active: exact
)
# shared MoE, encoder-decoders, image, channels-first 1×1 convs, Falcon's x @ W.T + b and
# BLOOM's hand-written GELU
EXPORTED = ("albert", "bart", "whisper", "deit", "poolformer", "falcon", "bloom")


def build(name):
    config, cls, expected = CONFIGS[name]
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls(copy.deepcopy(config)).eval(), expected


def outputs(model, inputs):
    with torch.no_grad():
        return [t for t in tree_leaves(model(**inputs)) if isinstance(t, torch.Tensor)]


def assert_same(got, ref):
    assert len(got) == len(ref)
    for g, r in zip(got, ref, strict=True):
        if r.is_floating_point():
            torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5 * r.abs().max().item())
        else:
            assert torch.equal(g, r)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_converts_exactly_and_keeps_the_class(name):
    model, expected = build(name)
    torch.manual_seed(1)
    inputs = trace.split_inputs(model, None)[1]  # built from the config
    state = copy.deepcopy(model.state_dict())
    reference = outputs(model, inputs)
    for _, cfg in METHODS:
        moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=inputs)
        assert type(moe_model) is type(model)
        assert sum(isinstance(m, moefy.MoE) for m in moe_model.modules()) == expected
        assert_same(outputs(moe_model, inputs), reference)
    # the caller's model is untouched
    assert not any(isinstance(m, moefy.MoE) for m in model.modules())
    after = model.state_dict()
    assert state.keys() == after.keys() and all(torch.equal(state[k], after[k]) for k in state)


def test_albert_shared_ffn_stays_one_shared_moe():
    model, _ = build("albert")
    inputs = trace.split_inputs(model, None)[1]
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    (moe,) = [m for m in moe_model.modules() if isinstance(m, moefy.MoE)]  # modules(): unique
    layer = model.encoder.albert_layer_groups[0].albert_layers[0]
    dense_ffn = sum(p.numel() for m in (layer.ffn, layer.ffn_output) for p in m.parameters())
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in moe_model.parameters()) == (
        total - dense_ffn + sum(p.numel() for p in moe.parameters()))
    calls = []
    moe.register_forward_hook(lambda *_: calls.append(1))
    outputs(moe_model, inputs)
    assert len(calls) == model.config.num_hidden_layers  # every layer runs the one MoE


def test_deberta_classifier_head_is_skipped_with_its_reason(capsys):
    model, expected = build("deberta_v2_classifier")
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2),
                              explain=True)
    out = capsys.readouterr().out
    assert f"{expected} FFN(s) found" in out
    assert "width" in out  # the head maps 32 -> 2 labels: rejected, with that reason
    assert isinstance(moe_model.pooler.dense, nn.Linear)
    assert isinstance(moe_model.classifier, nn.Linear)


def test_whisper_keeps_generate_and_config():
    model, _ = build("whisper")
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    assert type(moe_model) is type(model) and moe_model.config is not None
    features = torch.randn(1, model.config.num_mel_bins, 2 * model.config.max_source_positions)
    with torch.no_grad():
        dense = model.generate(features, max_new_tokens=4, do_sample=False)
        moe = moe_model.generate(features, max_new_tokens=4, do_sample=False)
    assert torch.equal(dense, moe)  # upcycling is exact at initialisation


def test_inline_ffn_converts_only_its_layer_in_graph_mode():
    # BART with activation dropout: the dropout between fc1's activation and fc2 runs inline
    # in the layer's forward, so each layer (not the model) is converted in graph mode
    import transformers as tf

    from tests.passes.models import _SEQ2SEQ
    torch.manual_seed(0)
    model = tf.BartModel(tf.BartConfig(**_SEQ2SEQ, activation_dropout=0.1)).eval()
    inputs = trace.split_inputs(model, None)[1]
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    assert type(moe_model) is tf.BartModel
    layers = [*moe_model.encoder.layers, *moe_model.decoder.layers]
    assert all(isinstance(layer, torch.fx.GraphModule) for layer in layers)
    assert_same(outputs(moe_model, inputs), outputs(model, inputs))
    longer = {k: torch.cat([v, v[:, :3]], 1) if isinstance(v, torch.Tensor) else v
              for k, v in inputs.items()}  # another sequence length: still dynamic
    assert_same(outputs(moe_model, longer), outputs(model, longer))
    # a graph-mode layer takes calls like the traced one (use_cache=False): a cache where
    # the trace had None is a clear error, not silently dropped
    with pytest.raises(InputError, match="converted in graph mode .* cache= was None"):
        outputs(moe_model, {**inputs, "use_cache": True})


def test_graph_mode_of_the_whole_model_keeps_its_attributes():
    model, inputs, _ = custom_models()["sliced_glu"]  # FFN inline in the model's own forward
    model = copy.deepcopy(model).eval()
    model.config = {"hidden_size": 32}
    gm = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=inputs)
    assert isinstance(gm, torch.fx.GraphModule)
    assert gm.config == {"hidden_size": 32}


class ConvFFN(nn.Module):
    """A MetaFormer-style block: a 1x1-convolution FFN on (B, C, H, W) with a residual; its
    GELU a module of its own (surgery) or inline in the block's forward (graph mode)."""

    def __init__(self, c=16, inline=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, 4 * c, 1), nn.Conv2d(4 * c, c, 1)
        self.act = F.gelu if inline else nn.GELU()

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


@pytest.mark.parametrize("inline", (False, True))
@pytest.mark.parametrize("method,cfg", METHODS)
def test_conv_ffn_becomes_a_channels_last_moe(method, cfg, inline):
    torch.manual_seed(0)
    model = nn.Sequential(ConvFFN(inline=inline), ConvFFN(inline=inline)).eval()
    x = torch.randn(2, 16, 5, 5)
    moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=(x,))
    assert type(moe_model) is nn.Sequential
    wrappers = [m for m in moe_model.modules() if isinstance(m, ChannelsLast)]
    assert len(wrappers) == 2 and all(isinstance(w.moe, moefy.MoE) for w in wrappers)
    if inline:  # each block, not the model, became a GraphModule
        assert all(isinstance(block, torch.fx.GraphModule) for block in moe_model)
    else:
        assert all(isinstance(block.fc1, ChannelsLast) for block in moe_model)
    # another batch; surgery keeps the modules, which take any height and width too (an
    # exported graph keeps an image's height and width static)
    y = torch.randn(3, 16, 5, 5) if inline else torch.randn(3, 16, 7, 7)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(y), model(y), rtol=1e-5, atol=1e-5)


def test_only_batch_and_sequence_are_dynamic():
    auto = torch.export.Dim.AUTO
    model = nn.Linear(4, 4)  # any module: positional inputs are read by shape and dtype
    ids, image = torch.zeros(2, 8, dtype=torch.long), torch.randn(2, 3, 32, 32)
    hidden, rows = torch.randn(2, 8, 32), torch.randn(2, 32)
    assert trace.auto_dynamic_shapes(model, (ids, image, hidden, rows), {}) == (
        {0: auto, 1: auto}, {0: auto}, {0: auto, 1: auto}, {0: auto})

    whisper, _ = build("whisper")
    _, kwargs = trace.split_inputs(whisper, None)
    shapes = trace.auto_dynamic_shapes(whisper, (), kwargs)
    assert shapes["input_features"] == {0: auto}  # not the mel bins, not the frames
    assert shapes["decoder_input_ids"] == {0: auto, 1: auto}


def test_a_layer_taking_keywords_through_kwargs_exports():
    # Hugging Face layers take use_cache through **kwargs; torch.export then mis-paired the
    # inputs with dynamic_shapes ("Must provide a tree_name"), and graph mode fell back
    whisper, _ = build("whisper")
    layer = whisper.model.encoder.layers[0]
    params = inspect.signature(layer.forward).parameters.values()
    assert any(p.kind is p.VAR_KEYWORD for p in params)
    x = torch.randn(2, 16, 32)
    ep = trace.export_model(layer, (x, None), {"use_cache": False})
    assert "forward" not in vars(layer)  # the signature shim is gone again
    y = torch.randn(3, 11, 32)  # batch and sequence stayed dynamic
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(y, None, use_cache=False),
                                   layer(y, None, use_cache=False), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", EXPORTED)
def test_converted_architecture_exports_to_onnx(name, tmp_path):
    model, _ = build(name)
    inputs = trace.split_inputs(model, None)[1]
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    result = moefy.export_onnx(moe_model, tmp_path / "m.onnx", inputs)
    assert result.moe_layers >= 1 and max(result.max_diff) <= result.tolerance


def test_falcon_exports_and_validates(tmp_path):
    # multi-query attention: what moefy promises is a validated export, at opset 23 or, where
    # the exporter cannot express the model there, at its default opset with a note saying so
    model, _ = build("falcon")
    inputs = trace.split_inputs(model, None)[1]
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    result = moefy.export_onnx(moe_model, tmp_path / "m.onnx", inputs)
    assert result.moe_layers >= 1 and max(result.max_diff) <= result.tolerance
    fell_back = any("failed at opset 23" in n for n in result.notes)
    assert (result.opset == 23) != fell_back


def test_an_exporter_failure_at_opset_23_falls_back_with_a_note(tmp_path, monkeypatch):
    export = torch.onnx.export
    tried = []

    def failing_at_23(*args, **kwargs):
        tried.append(kwargs.get("opset_version"))
        if kwargs.get("opset_version") == 23:
            raise RuntimeError("this translation needs a newer opset")
        return export(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", failing_at_23)
    model, _ = build("falcon")
    inputs = trace.split_inputs(model, None)[1]
    moe_model = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2))
    result = moefy.export_onnx(moe_model, tmp_path / "m.onnx", inputs)
    assert tried == [23, None] and result.opset < 23
    assert any("failed at opset 23 (RuntimeError: this translation needs a newer opset)" in n
               for n in result.notes)
    assert max(result.max_diff) <= result.tolerance
