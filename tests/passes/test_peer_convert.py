"""MoEConfig(method="peer"): a dense FFN's neurons become a PEER layer's single-neuron
experts. Exact with every neuron retrieved; weights carved where they belong; pad experts
inert; fitted retrieval beats random keys; the caller's model untouched; bad configs refused."""

import copy

import pytest
import torch
import torch.nn as nn
import transformers as tf

import moefy
from moefy.errors import AlreadyConvertedError, ConversionError, VerificationError
from moefy.passes import fit_peer, peer
from moefy.passes.build import DenseWeights
from moefy.runtime.peer import peer_experts
from tests.passes.models import TINY, NanoGPT, RawModel


def gelu_pad():
    """d_ff 61: a 7x9 grid, two pad experts."""
    return nn.Sequential(nn.Linear(16, 61), nn.GELU(), nn.Linear(61, 16))


def llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=64,
                         num_key_value_heads=2, **TINY)
    return tf.LlamaModel(cfg)


# name, model builder, example inputs (None: built from the HF config), N (grid cells)
EXACT = (
    ("nanogpt_gelu_bias", NanoGPT, (torch.randn(2, 5, 32),), 128),
    ("relu_in_bias_only", RawModel, (torch.randn(2, 5, 32),), 96),
    ("gelu_padded", gelu_pad, (torch.randn(3, 16),), 63),
    ("llama_gated_silu", llama, None, 64),
)


def peers(model):
    return [m for m in model.modules() if isinstance(m, moefy.PEER)]


def outputs(model, inputs):
    with torch.no_grad():
        if inputs is None:
            return model(input_ids=torch.arange(12).view(2, 6) % 99).last_hidden_state
        return model(*inputs)


@pytest.mark.parametrize("name,make,inputs,n", EXACT, ids=[e[0] for e in EXACT])
def test_every_neuron_retrieved_equals_the_dense_model(name, make, inputs, n):
    torch.manual_seed(0)
    model = make().eval()
    cfg = moefy.MoEConfig(method="peer", top_k=n)  # one head retrieving all N cells
    moe_model = moefy.convert(model, cfg, example_inputs=inputs)
    layers = peers(moe_model)
    assert layers and all(m.num_experts == n and m.score == "none" for m in layers)
    assert all(m.conversion["verified"].startswith("exact") for m in layers)
    ref, got = outputs(model, inputs), outputs(moe_model, inputs)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_carving_puts_each_weight_where_it_belongs():
    torch.manual_seed(0)
    model = llama().eval()
    layer = peers(moefy.convert(model, moefy.MoEConfig(method="peer", top_k=16)))[0]
    mlp = model.layers[0].mlp
    assert layer.gated and layer.activation == "silu" and layer.grid == (8, 8)
    cells = torch.tensor([layer.expert_neurons.index(i) for i in range(64)])
    assert torch.equal(layer.down[cells], mlp.up_proj.weight)  # u_i: row i of W1
    assert torch.equal(layer.gate[cells], mlp.gate_proj.weight)
    assert torch.equal(layer.up[cells], mlp.down_proj.weight.t())  # v_i: column i of W2

    gpt = NanoGPT().eval()
    layer = peers(moefy.convert(gpt, moefy.MoEConfig(method="peer", top_k=8),
                                example_inputs=(torch.randn(2, 5, 32),)))[1]
    mlp = gpt.blocks[1].mlp
    cells = torch.tensor([layer.expert_neurons.index(i) for i in range(128)])
    assert torch.equal(layer.down[cells], mlp.c_fc.weight)
    assert torch.equal(layer.down_bias[cells], mlp.c_fc.bias)
    assert torch.equal(layer.up[cells], mlp.c_proj.weight.t())
    assert torch.equal(layer.out_bias, mlp.c_proj.bias)


def test_pad_experts_are_inert():
    model = gelu_pad().eval()
    layer = peers(moefy.convert(model, moefy.MoEConfig(method="peer", top_k=8),
                                example_inputs=(torch.randn(3, 16),)))[0]
    pads = [i for i, neuron in enumerate(layer.expert_neurons) if neuron < 0]
    assert layer.grid == (7, 9) and len(pads) == 2
    assert sorted(n for n in layer.expert_neurons if n >= 0) == list(range(61))
    for table in (layer.down, layer.up, layer.down_bias[:, None]):
        assert not table[pads].any()
    x = torch.randn(5, 16) * 100
    ids = torch.tensor(pads).repeat(5, 1)
    y = peer_experts(x, ids, torch.ones(5, 2), layer.down, layer.up,
                     down_bias=layer.down_bias, activation=layer.activation)
    assert not y.any()  # retrieving a pad adds exactly nothing


def clustered_tokens(n, generator, d=32, centres=16):
    """FFN inputs with structure (a mixture of directions), as real hidden states have."""
    means = torch.randn(centres, d, generator=generator) * 2
    pick = torch.randint(0, centres, (n,), generator=generator)
    return means[pick] + torch.randn(n, d, generator=generator)


def test_fitted_retrieval_beats_random_keys_on_held_out_tokens():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [(clustered_tokens(256, g),) for _ in range(8)]
    cfg = moefy.MoEConfig(method="peer", top_k=32, peer_fit_steps=40)
    layer = peers(moefy.convert(model, cfg, calibration_data=calibration))[0]
    dense = DenseWeights(model[0].weight.detach(), model[2].weight.detach(), None,
                         model[0].bias.detach(), None, model[2].bias.detach(), "gelu")
    held = clustered_tokens(512, torch.Generator().manual_seed(1))[-256:]  # same mixture
    cells = torch.tensor([layer.expert_neurons.index(i) for i in range(128)])
    fitted = fit_peer.measure(layer, dense, held, cells)
    random_keys = copy.deepcopy(layer)
    with torch.no_grad():
        random_keys.reset_parameters()  # random keys and tables; only the retrieval is read
        random_keys.query.reset_parameters()
        random_keys.query_norm.reset_parameters()
    chance = fit_peer.measure(random_keys, dense, held, cells)
    assert chance["retrieval_recall"] < 0.35  # about top_k / N = 0.25
    assert fitted["retrieval_recall"] > chance["retrieval_recall"] + 0.2
    assert fitted["rel_err"] < chance["rel_err"] - 0.2
    info = layer.conversion
    assert info["method"] == "peer" and info["grid"] == (8, 16) and info["top_k"] == 32
    assert info["heads"] == 1 and info["fit_steps"] == 40
    assert 0 < info["retrieval_recall"] <= 1 and info["verified"].startswith("not function")


def test_heads_never_retrieve_a_neuron_twice_and_seed_decides():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32)).eval()
    g = torch.Generator().manual_seed(1)
    calibration = [(clustered_tokens(256, g),) for _ in range(4)]
    cfg = moefy.MoEConfig(method="peer", top_k=16, peer_heads=2, peer_fit_steps=10)
    a = peers(moefy.convert(model, cfg, calibration_data=calibration))[0]
    b = peers(moefy.convert(model, cfg, calibration_data=calibration))[0]
    assert a.heads == 2 and a.conversion["duplicate_share"] == 0
    ids = a.route(clustered_tokens(64, g)).ids.flatten(1)  # (T, heads·k)
    assert all(row.unique().numel() == row.numel() for row in ids)
    for name, t in a.state_dict().items():  # same seed: the same layer
        assert torch.equal(t, b.state_dict()[name]), name


def test_without_calibration_data_keys_come_from_the_weights():
    torch.manual_seed(0)
    model = NanoGPT().eval()
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 5, 32)
    moe_model = moefy.convert(model, moefy.MoEConfig(method="peer", top_k=32),
                              example_inputs=(x,))
    layer = peers(moe_model)[0]
    assert layer.conversion["fit_steps"] == 0 and "retrieval_recall" not in layer.conversion
    assert torch.isfinite(outputs(moe_model, (x,))).all()
    # the caller's model is untouched
    assert all(torch.equal(before[k], t) for k, t in model.state_dict().items())
    assert not peers(model)
    with pytest.raises(AlreadyConvertedError):
        moefy.convert(moe_model, moefy.MoEConfig(method="peer", top_k=32), example_inputs=(x,))


BAD_CONFIGS = (
    (dict(method="peer", shared_experts=2), "shared_experts"),
    (dict(method="peer", router="sigmoid"), "router"),
    (dict(method="peer", capacity_factor=1.0), "capacity_factor"),
    (dict(method="peer", fit_steps=10), "fit_steps"),
    (dict(method="peer", peer_heads=0), "peer_heads"),
    (dict(method="peer", peer_key_dim=7), "peer_key_dim"),
    (dict(method="peer", peer_fit_steps=-1), "peer_fit_steps"),
    (dict(method="split", peer_heads=2), "peer_heads"),
    (dict(method="peer", top_k=0), "top_k"),
    (dict(method="peer", num_experts=4), "num_experts"),
    (dict(method="peer", top_p=0.3), "top_p"),
)


@pytest.mark.parametrize("cfg,field", BAD_CONFIGS, ids=[b[1] for b in BAD_CONFIGS])
def test_bad_config_names_the_field(cfg, field):
    with pytest.raises(ValueError, match=f"MoEConfig.{field}"):
        moefy.MoEConfig(**cfg)


def test_conversion_errors_before_anything_changes():
    x = (torch.randn(2, 5, 32),)
    model = NanoGPT().eval()
    with pytest.raises(ConversionError, match="top_k=200"):
        moefy.convert(model, moefy.MoEConfig(method="peer", top_k=200), example_inputs=x,
                      inplace=True)
    assert not peers(model)
    with pytest.raises(ConversionError, match="peer_fit_steps=5 .*calibration_data"):
        moefy.convert(model, moefy.MoEConfig(method="peer", top_k=8, peer_fit_steps=5),
                      example_inputs=x)
    with pytest.raises(ConversionError, match="peer_heads=9"):
        moefy.convert(model, moefy.MoEConfig(method="peer", top_k=8, peer_heads=9),
                      example_inputs=x)


def test_gate_bias_is_refused():
    class BiasedGLU(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate, self.up = nn.Linear(16, 32), nn.Linear(16, 32)
            self.down = nn.Linear(32, 16)

        def forward(self, x):
            return self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))

    with pytest.raises(ConversionError, match="gate projection has a bias"):
        moefy.convert(BiasedGLU().eval(), moefy.MoEConfig(method="peer", top_k=8),
                      example_inputs=(torch.randn(3, 16),))


@pytest.mark.parametrize("d_ff,grid", ((128, (8, 16)), (1536, (32, 48)), (61, (7, 9)),
                                       (64, (8, 8)), (1, (1, 1)), (11008, (86, 128))))
def test_grid_has_least_padding_within_two_to_one(d_ff, grid):
    n1, n2 = peer.peer_grid(d_ff)
    assert (n1, n2) == grid and n1 <= n2 <= 2 * n1 and n1 * n2 >= d_ff


def test_verification_catches_a_wrong_carving(monkeypatch):
    carve = peer.carve

    def no_input_bias(dense, config, cells=None):
        layer = carve(dense, config, cells)
        with torch.no_grad():
            layer.down_bias.zero_()  # b1 lost: the experts no longer sum to the FFN
        return layer

    monkeypatch.setattr(peer, "carve", no_input_bias)
    with pytest.raises(VerificationError, match="every expert active"):
        moefy.convert(NanoGPT().eval(), moefy.MoEConfig(method="peer", top_k=8),
                      example_inputs=(torch.randn(2, 5, 32),))
