"""The FFN matcher matches what the graph computes, not how it is spelled: every projection
spelling, any element-wise activation (named when it equals one, else its own subgraph),
gated and fused layouts, and every rejection with its reason."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import moefy
from moefy.activations import ACTIVATIONS
from moefy.errors import ConversionError, NoFFNFoundError
from moefy.passes.build import dense_weights
from moefy.passes.elementwise import identify_activation
from moefy.passes.find_ffn import find_ffns
from moefy.passes.trace import export_model, split_inputs, trace_units
from tests.passes.models import (
    ChannelAffineMLP,
    ConvBNMlp,
    LevitMLP,
    MixFFN,
    PositionBiasBlock,
    SqueezeExcite,
    SubLNSwiGLU,
    new_architecture_configs,
    randomize_batch_norms,
)

H, FF = 16, 48


def gelu_tanh_arith(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


def gelu_erf_arith(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def bloom_gelu(x):  # transformers' BLOOM: its own expansion, rounded constants
    return x * 0.5 * (1.0 + torch.tanh(0.79788456 * x * (1 + 0.044715 * x * x)))


ACTIVATION_FORMS = (
    ("relu", torch.relu),
    ("gelu", F.gelu),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("gelu_tanh", gelu_tanh_arith),
    ("gelu_tanh", bloom_gelu),
    ("gelu", gelu_erf_arith),
    ("silu", F.silu),
    ("silu", lambda x: x / (1 + torch.exp(-x))),
    ("squared_relu", lambda x: torch.relu(x).square()),
    ("squared_relu", lambda x: torch.relu(x) ** 2),
    ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
    ("hardswish", F.hardswish),
    ("hardswish", lambda x: x * F.relu6(x + 3) / 6),
    ("relu", lambda x: torch.where(x > 0, x, torch.zeros_like(x))),
    ("custom", torch.tanh),
    ("custom", lambda x: x * torch.sigmoid(x) + 0.1 * x),
    ("custom", lambda x: torch.where(x > 0, x, 0.01 * x)),
    ("custom", lambda x: torch.where(x > 0, x, torch.tensor(0.01) * x)),  # a lifted constant
    ("gelu", lambda x: F.gelu(x.double()).float()),  # casts are identities
)


class Plain(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.fc1, self.fc2 = nn.Linear(H, FF), nn.Linear(FF, H)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Gated(nn.Module):
    def __init__(self, fused=False, up_first=False):
        super().__init__()
        self.fused, self.up_first = fused, up_first
        self.gate_up = nn.Linear(H, 2 * FF, bias=False)
        self.gate, self.up = nn.Linear(H, FF, bias=False), nn.Linear(H, FF, bias=False)
        self.down = nn.Linear(FF, H, bias=False)

    def forward(self, x):
        if self.fused:
            a, b = self.gate_up(x).chunk(2, dim=-1)
            g, u = (b, a) if self.up_first else (a, b)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(u * F.silu(g))


# ---------------------------------------------------------------------- projection spellings


def raw(*shape):
    return nn.Parameter(torch.randn(*shape) * shape[-1] ** -0.5)


class TransposedLinear(nn.Linear):
    """Falcon's FalconLinear: ``x @ W.T + b`` instead of F.linear."""

    def forward(self, x):
        return x @ self.weight.T + self.bias


class FalconStyle(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense_h_to_4h, self.dense_4h_to_h = TransposedLinear(H, FF), TransposedLinear(FF, H)
        self.act = nn.GELU()

    def forward(self, x):
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(x)))


class StoredInOut(nn.Module):
    """``x @ W + b`` on raw parameters stored (in, out)."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1, self.w2, self.b2 = raw(H, FF), raw(FF), raw(FF, H), raw(H)

    def forward(self, x):
        return F.silu(x @ self.w1 + self.b1) @ self.w2 + self.b2


class Einsum(nn.Module):
    def __init__(self, in_out=False):
        super().__init__()
        self.in_out = in_out
        self.wi = raw(H, FF) if in_out else raw(FF, H)
        self.wo = raw(FF, H) if in_out else raw(H, FF)

    def forward(self, x):
        if self.in_out:
            return torch.einsum("...f,fh->...h", F.gelu(torch.einsum("...h,hf->...f", x, self.wi)),
                                self.wo)
        return torch.einsum("bsf,hf->bsh", torch.relu(torch.einsum("bsh,fh->bsf", x, self.wi)),
                            self.wo)


class MatmulSpellings(nn.Module):
    """``mm`` on flattened tokens, ``transpose`` of the weight, ``bmm`` on a broadcast one."""

    def __init__(self):
        super().__init__()
        self.w1, self.w2 = raw(FF, H), raw(H, FF)

    def forward(self, x):
        h = x.reshape(-1, H).mm(self.w1.transpose(0, 1)).view(*x.shape[:-1], FF)
        w2 = self.w2.permute(1, 0).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.bmm(F.gelu(h, approximate="tanh"), w2)


class SwiGLUMatmul(nn.Module):
    def __init__(self):
        super().__init__()
        self.wg, self.wu, self.wd = raw(FF, H), raw(FF, H), raw(H, FF)

    def forward(self, x):
        return (F.silu(x @ self.wg.T) * (x @ self.wu.T)) @ self.wd.T


class GPT2Style(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D
        self.c_fc, self.c_proj = Conv1D(FF, H), Conv1D(H, FF)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(self.c_proj(gelu_tanh_arith(self.c_fc(x))))


class PoolFormerMlp(nn.Module):
    """MetaFormer's Mlp: 1×1 convolutions on channels-first feature maps."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(H, FF, 1), nn.Conv2d(FF, H, 1)
        self.act = nn.GELU()

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


def seq(act):
    return nn.Sequential(nn.Linear(H, FF), act, nn.Linear(FF, H))


X = torch.randn(2, 5, H)
SPELLINGS = {  # name -> (model, input, activation, (up, gate, down) weights)
    "falcon_x_at_wt_plus_b": (FalconStyle(), X, "gelu",
                              ("dense_h_to_4h.weight", None, "dense_4h_to_h.weight")),
    "bloom_gelu": (Plain(bloom_gelu), X, "gelu_tanh", ("fc1.weight", None, "fc2.weight")),
    "relu_inplace": (seq(nn.ReLU(inplace=True)), X, "relu", ("0.weight", None, "2.weight")),
    "hardswish": (seq(nn.Hardswish()), X, "hardswish", ("0.weight", None, "2.weight")),
    "x_at_w_plus_b": (StoredInOut(), X, "silu", ("w1", None, "w2")),
    "einsum": (Einsum(), X, "relu", ("wi", None, "wo")),
    "einsum_in_out": (Einsum(in_out=True), X, "gelu", ("wi", None, "wo")),
    "mm_bmm_transpose": (MatmulSpellings(), X, "gelu_tanh", ("w1", None, "w2")),
    "swiglu_matmul": (SwiGLUMatmul(), X, "silu", ("wu", "wg", "wd")),
    "gpt2_conv1d": (GPT2Style(), X, "gelu_tanh", ("c_fc.weight", None, "c_proj.weight")),
    "custom_silu_plus": (Plain(lambda x: x * torch.sigmoid(x) + 0.1 * x), X, "custom",
                         ("fc1.weight", None, "fc2.weight")),
    "custom_leaky": (Plain(lambda x: torch.where(x > 0, x, 0.01 * x)), X, "custom",
                     ("fc1.weight", None, "fc2.weight")),
    "conv_1x1": (PoolFormerMlp(), torch.randn(2, H, 3, 4), "gelu",
                 ("fc1.weight", None, "fc2.weight")),
}


def matches_of(model, x=None):
    ep = export_model(model, (X if x is None else x,), {})
    return find_ffns(ep)


def dense_forward(model, match, x):
    """The FFN computed from what the matcher extracted: weights in nn.Linear layout and the
    activation (its name, or the matched subgraph)."""
    d = dense_weights(model, match)
    act = d.activation if isinstance(d.activation, nn.Module) else ACTIVATIONS[d.activation].fn
    x = x.movedim(match.channels_dim, -1)
    h = F.linear(x, d.w_in, d.b_in)
    h = act(h) if d.w_gate is None else act(F.linear(x, d.w_gate, d.b_gate)) * h
    return F.linear(h, d.w_out, d.b_out).movedim(-1, match.channels_dim)


@pytest.mark.parametrize("name", sorted(SPELLINGS))
def test_every_spelling_is_found_and_extracted_exactly(name):
    model, x, activation, weights = SPELLINGS[name]
    model.eval()
    (m,), _ = matches_of(model, x)
    assert m.activation == activation
    assert (m.up.weight, m.gate.weight if m.gate else None, m.down.weight) == weights
    assert m.channels_dim == (1 if name == "conv_1x1" else -1)
    assert (m.activation_fn is not None) == (activation == "custom")
    with torch.no_grad():
        torch.testing.assert_close(dense_forward(model, m, x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name,act", ACTIVATION_FORMS)
def test_every_activation_form(name, act):
    model = Plain(act)
    (m,), _ = matches_of(model)
    assert m.activation == name
    assert m.up.weight == "fc1.weight" and m.down.weight == "fc2.weight"
    with torch.no_grad():
        torch.testing.assert_close(dense_forward(model, m, X), model(X), rtol=1e-5, atol=1e-5)


def test_custom_activation_is_a_standalone_module_that_does_not_mutate():
    (m,), _ = matches_of(seq(nn.Sequential(nn.ReLU(inplace=True), nn.Tanh())))
    fn = m.activation_fn
    h = torch.randn(50)
    before = h.clone()
    torch.testing.assert_close(fn(h), torch.tanh(torch.relu(before)))
    assert torch.equal(h, before)  # in-place ops run out of place in the extracted graph
    assert not list(fn.parameters()) and not list(fn.buffers())


def test_identify_activation_by_value():
    assert identify_activation(lambda h: h * torch.sigmoid(h)) == "silu"
    assert identify_activation(bloom_gelu) == "gelu_tanh"
    assert identify_activation(lambda h: h * torch.sigmoid(1.7 * h)) is None  # not quick_gelu
    assert identify_activation(lambda h: torch.clamp(h, 0, 6)) is None  # relu6 is no name


@pytest.mark.parametrize("fused,up_first", ((False, False), (True, False), (True, True)))
def test_gated_and_fused(fused, up_first):
    model = Gated(fused, up_first)
    (m,), _ = matches_of(model)
    assert m.activation == "silu"
    if fused:
        assert m.gate is None and m.up.weight == "gate_up.weight"
        assert m.fused_gate_first is (not up_first)
    else:
        assert (m.gate.weight, m.up.weight) == ("gate.weight", "up.weight")
    with torch.no_grad():
        torch.testing.assert_close(dense_forward(model, m, X), model(X), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ claims and rejections


class Chain(nn.Module):
    """Linear → act → Linear → act → Linear: the middle Linear can close one FFN only."""

    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(H, FF), nn.Linear(FF, H), nn.Linear(H, H)

    def forward(self, x):
        return self.fc3(F.gelu(self.fc2(torch.relu(self.fc1(x)))))


def test_chain_claims_each_projection_once():
    matches, rejected = matches_of(Chain())
    assert [(m.up.weight, m.down.weight) for m in matches] == [("fc1.weight", "fc2.weight")]
    assert any("shares projection fc2.weight with FFN" in r.reason for r in rejected)


class EncoderWithHead(nn.Module):
    """An encoder FFN, then DeBERTa-style classifier head H → H' → GELU → C with C != H."""

    def __init__(self, classes=3):
        super().__init__()
        self.ffn = seq(nn.GELU())
        self.norm = nn.LayerNorm(H)
        self.head = nn.Sequential(nn.Linear(H, 32), nn.GELU(), nn.Linear(32, classes))

    def forward(self, x):
        return self.head(self.norm(x + self.ffn(x)))


def test_head_with_other_output_width_converts_too():
    model = EncoderWithHead().eval()
    matches, rejected = matches_of(model)
    assert [m.name for m in matches] == ["ffn", "head"]
    assert not any("width" in r.reason for r in rejected)
    moe_model = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=(X,))
    assert isinstance(moe_model.ffn, moefy.MoE) and isinstance(moe_model.head, moefy.MoE)
    assert (moe_model.head.hidden_size, moe_model.head.output_size) == (H, 3)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(X), model(X), rtol=1e-5, atol=1e-5)


class Shared(nn.Module):
    """One FFN module called twice (ALBERT): the same weights in the same roles."""

    def __init__(self):
        super().__init__()
        self.ffn, self.norm = seq(nn.GELU()), nn.LayerNorm(H)

    def forward(self, x):
        return self.ffn(self.norm(x + self.ffn(x)))


def test_call_sites_of_one_shared_module_are_no_conflict():
    matches, _ = matches_of(Shared())
    assert [(m.up.weight, m.down.weight) for m in matches] == [("ffn.0.weight",
                                                                "ffn.2.weight")] * 2


class TiedRoles(nn.Module):
    """A second FFN (on FF-wide features) whose up weight is the first FFN's down weight."""

    def __init__(self):
        super().__init__()
        self.w_in, self.w_out = raw(FF, H), raw(H, FF)

    def forward(self, x):
        y = F.linear(torch.relu(F.linear(x, self.w_in)), self.w_out)  # H → FF → H
        z = torch.cat([y, y, y], dim=-1)  # FF wide
        return F.linear(torch.relu(F.linear(z, self.w_out)), self.w_in)  # FF → H → FF


def test_a_weight_plays_one_role():
    matches, rejected = matches_of(TiedRoles())
    assert [(m.up.weight, m.down.weight) for m in matches] == [("w_in", "w_out")]
    assert any("shares weight w_out with FFN" in r.reason for r in rejected)


class LearnedSwish(nn.Module):
    def __init__(self):
        super().__init__()
        self.beta = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return x * torch.sigmoid(self.beta * x)


REJECTED = (  # model, a phrase of the reason
    (Plain(lambda x: 2.0 * x + 1.0), "affine"),
    (nn.Sequential(nn.Linear(H, FF), nn.Dropout(0.0), nn.Linear(FF, H)), "no activation"),
    (seq(LearnedSwish()), "reads parameter 1.beta"),
    (seq(nn.Softmax(-1)), "neither element-wise nor a projection"),
)


@pytest.mark.parametrize("model,reason", REJECTED)
def test_rejections_keep_their_reason(model, reason):
    matches, rejected = matches_of(model)
    assert matches == []
    assert any(reason in r.reason for r in rejected), [r.reason for r in rejected]


# ------------------------------------------------------------------------- end to end

CONVERTIBLE = sorted(n for n in SPELLINGS if n != "conv_1x1")  # channels-first: the rewrite's


@pytest.mark.parametrize("name", CONVERTIBLE)
def test_convert_is_exact_for_every_spelling(name):
    model, x, _, _ = SPELLINGS[name]
    model.eval()
    for cfg in (dict(method="upcycle", num_experts=4, top_k=2),
                dict(method="split", num_experts=4, top_k=4)):
        moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=(x,))
        assert sum(isinstance(m, moefy.MoE) for m in moe_model.modules()) == 1
        with torch.no_grad():
            torch.testing.assert_close(moe_model(x), model(x), rtol=1e-5, atol=1e-5)


def test_falcon_and_bloom_ffns_are_found():
    import transformers as tf

    from moefy.passes.trace import split_inputs, trace_units
    tiny = dict(vocab_size=99, hidden_size=32, num_attention_heads=2)
    models = {
        "falcon": tf.FalconModel(tf.FalconConfig(new_decoder_architecture=False,
                                                 num_hidden_layers=2, **tiny)),
        "bloom": tf.BloomModel(tf.BloomConfig(n_layer=2, n_head=2, vocab_size=99,
                                              hidden_size=32)),
    }
    for name, model in models.items():
        units = trace_units(model.eval(), *split_inputs(model, None))
        found = [(m.name, m.activation) for u in units for m in find_ffns(u.ep)[0]]
        act = "gelu" if name == "falcon" else "gelu_tanh"
        assert found == [("h.0.mlp", act), ("h.1.mlp", act)], name


def exact_conversions(model, x):
    """Upcycling, and a split with every expert active, reproduce the dense model."""
    for cfg in (dict(method="upcycle", num_experts=4, top_k=2),
                dict(method="split", num_experts=4, top_k=4)):
        moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=(x,))
        assert sum(isinstance(m, moefy.MoE) for m in moe_model.modules()) == 1
        with torch.no_grad():
            torch.testing.assert_close(moe_model(x), model(x), rtol=1e-5, atol=1e-5)


# ------------------------------------------------- per-feature affine maps after a projection

AFFINE = {  # name -> (model, input, the first projection's folded maps)
    "levit_linear_bn": (lambda: randomize_batch_norms(LevitMLP()), X, ["batch_norm"]),
    "channel_affine": (ChannelAffineMLP, X, ["mul", "add", "div"]),
    "conv_bn": (lambda: randomize_batch_norms(ConvBNMlp()), torch.randn(2, H, 3, 4),
                ["batch_norm"]),
}


def output_of(model, path, x):
    out = []
    handle = model.get_submodule(path).register_forward_hook(lambda m, a, o: out.append(o))
    with torch.no_grad():
        model(x)
    handle.remove()
    return out[0]


@pytest.mark.parametrize("name", sorted(AFFINE))
def test_affine_after_a_projection_is_folded_into_it(name):
    make, x, ops = AFFINE[name]
    torch.manual_seed(0)
    model = make().eval()
    (m,), _ = matches_of(model, x)
    assert [a.op for a in m.up.affine] == ops
    assert m.down.affine == []  # an affine map after the second projection maps the MoE's output
    expected = output_of(model, m.down.weight.rpartition(".")[0], x)
    with torch.no_grad():
        torch.testing.assert_close(dense_forward(model, m, x), expected, rtol=1e-5, atol=1e-5)
    exact_conversions(model, x)


def test_batch_norm_in_training_mode_is_rejected_with_its_reason():
    matches, rejected = matches_of(LevitMLP().train())
    assert matches == []
    assert any("BatchNorm" in r.reason and "model.eval()" in r.reason for r in rejected)


class ResidualTabularMLP(nn.Module):
    """A tabular MLP: a residual hidden block H → F → H, then the head H → F → 3 classes."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(H, 64), nn.ReLU(), nn.Linear(64, H))
        self.head = nn.Sequential(nn.Linear(H, 64), nn.ReLU(), nn.Linear(64, 3))

    def forward(self, x):
        return self.head(x + self.block(x))


TABULAR = {  # name -> (model, (input, output) width of each FFN found)
    "head": (lambda: nn.Sequential(nn.Linear(H, 64), nn.ReLU(), nn.Linear(64, 3)),
             [(H, 3)]),
    "block_then_head": (ResidualTabularMLP, [(H, H), (H, 3)]),
    # greedy in graph order: the first block widens 16 → 32, the last Linear stays dense
    "deep_mlp": (lambda: nn.Sequential(nn.Linear(H, 64), nn.ReLU(), nn.Linear(64, 32),
                                       nn.ReLU(), nn.Linear(32, 3)), [(H, 32)]),
}
EXACT_METHODS = (  # upcycle: softmax weights over k copies sum to 1; split: every expert on
    dict(method="upcycle", num_experts=4, top_k=2),
    dict(method="split", num_experts=4, top_k=4),
    dict(method="split", num_experts=3, top_k=3, shared_experts=1),
)


@pytest.mark.parametrize("cfg", EXACT_METHODS, ids=lambda c: f"{c['method']}{c['num_experts']}")
@pytest.mark.parametrize("name", sorted(TABULAR))
def test_tabular_mlp_with_other_output_width_converts_exactly(name, cfg):
    make, widths = TABULAR[name]
    torch.manual_seed(0)
    model = make().eval()
    x = torch.randn(32, H)
    matches, _ = matches_of(model, x)
    assert [(m.up.shape[1], m.down.shape[0]) for m in matches] == widths
    moe_model = moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=(x,))
    moes = [m for m in moe_model.modules() if isinstance(m, moefy.MoE)]
    assert [(m.hidden_size, m.output_size) for m in moes] == widths
    with torch.no_grad():
        for rows in (x, x[:3]):  # the packed path, and decode-sized batches
            torch.testing.assert_close(moe_model(rows), model(rows), rtol=1e-5, atol=1e-5)


def test_other_output_width_with_calibration_and_compensation_converts():
    torch.manual_seed(0)
    model = TABULAR["head"][0]().eval()
    data = [(torch.randn(256, H),) for _ in range(2)]
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2, compensate="linear")
    moe_model = moefy.convert(model, cfg, example_inputs=data[0], calibration_data=data)
    moe = moe_model[0]
    assert moe.output_size == 3 and moe.shared.compensation[1].out_features == 3
    with torch.no_grad():
        assert moe_model(data[0][0]).shape == (256, 3)
        moe.top_k = 4  # every expert: the sum is the FFN again, compensation off
        torch.testing.assert_close(moe_model(data[0][0]), model(data[0][0]),
                                   rtol=1e-5, atol=1e-5)


class InlineHead(nn.Module):
    """An FFN module, then a head H → 32 → 3 run inline in the model's own forward (as
    DeBERTa's pooler dense → act → classifier): only graph mode could convert the head."""

    def __init__(self):
        super().__init__()
        self.ffn = seq(nn.GELU())
        self.dense, self.out = nn.Linear(H, 32), nn.Linear(32, 3)

    def forward(self, x):
        h = x + self.ffn(x)
        return self.out(torch.relu(self.dense(h)))


def test_other_output_width_needing_graph_mode_is_left_dense_with_its_reason(capsys):
    model = InlineHead().eval()
    moe_model = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4),
                              example_inputs=(X,), explain=True)
    assert type(moe_model) is InlineHead  # not a GraphModule made for the head
    assert isinstance(moe_model.ffn, moefy.MoE) and isinstance(moe_model.dense, nn.Linear)
    out = capsys.readouterr().out
    assert "output width 3 differs from input width 16" in out
    assert "converted only by a module swap, not in graph mode" in out
    with torch.no_grad():
        torch.testing.assert_close(moe_model(X), model(X), rtol=1e-5, atol=1e-5)


def test_other_output_width_is_rejected_for_peer_with_its_reason():
    model = ResidualTabularMLP().eval()
    x = torch.randn(32, H)
    matches, rejected = find_ffns(export_model(model, (x,), {}), "peer")
    assert [m.name for m in matches] == ["block"]
    reason = next(r.reason for r in rejected if "width" in r.reason)
    assert "output width 3 differs from input width 16: method='peer' maps H → H" in reason
    assert "method='split' or 'upcycle' convert it" in reason
    moe_model = moefy.convert(model, moefy.MoEConfig(method="peer", top_k=8),
                              example_inputs=(x,))
    assert isinstance(moe_model.block, moefy.PEER) and isinstance(moe_model.head[0], nn.Linear)
    with pytest.raises(NoFFNFoundError, match="method='peer' maps H → H"):
        moefy.convert(TABULAR["head"][0]().eval(), moefy.MoEConfig(method="peer", top_k=8),
                      example_inputs=(x,))


# ------------------------------------------------------------ blocks that are not token FFNs

NOT_TOKEN_FFNS = {  # name -> (model, input, a phrase of the reason, the FFNs that remain)
    "constant_input": (PositionBiasBlock(), X, "does not depend on any model input", ["ffn"]),
    "squeeze_excite_conv": (SqueezeExcite(), torch.randn(2, H, 3, 4), "pooled over the tokens",
                            []),
    "squeeze_excite_linear": (SqueezeExcite(linear=True), X, "pooled over the tokens", []),
    "mix_ffn": (MixFFN(), X, "token-mixing convolution between the projections", []),
}


@pytest.mark.parametrize("name", sorted(NOT_TOKEN_FFNS))
def test_blocks_that_are_not_token_ffns_are_rejected_with_their_reason(name):
    model, x, reason, remaining = NOT_TOKEN_FFNS[name]
    matches, rejected = matches_of(model, x)
    assert [m.name for m in matches] == remaining
    assert any(reason in r.reason for r in rejected), [r.reason for r in rejected]


def test_explain_shows_why_a_block_is_not_a_token_ffn(capsys):
    model = PositionBiasBlock().eval()
    moe_model = moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4),
                              example_inputs=(X,), explain=True)
    assert "coords_table does not depend on any model input" in capsys.readouterr().out
    assert isinstance(moe_model.cpb_mlp[0], nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(moe_model(X), model(X), rtol=1e-5, atol=1e-5)
    with pytest.raises(NoFFNFoundError) as info:
        moefy.convert(MixFFN(), moefy.MoEConfig(num_experts=4, top_k=4), example_inputs=(X,),
                      explain=True)
    for text in (str(info.value), capsys.readouterr().out):
        assert ("a token-mixing convolution between the projections (conv2d: a 3×3 depthwise "
                "convolution after dense1.weight, before dense2.weight)") in text
        assert "cannot become per-token experts" in text


def hf_rejections(name):
    config, cls = new_architecture_configs()[name]
    torch.manual_seed(0)
    model = cls(config).eval()
    units = trace_units(model, *split_inputs(model, None))
    found = [find_ffns(u.ep) for u in units]
    return [m for f in found for m in f[0]], [r.reason for f in found for r in f[1]]


def test_segformer_mix_ffns_are_rejected_as_token_mixing():
    matches, reasons = hf_rejections("segformer")
    assert matches == []
    mixing = [r for r in reasons if "token-mixing convolution between the projections" in r]
    assert len(mixing) == 2  # one Mix-FFN per stage, each named with its projections
    assert all("mlp.fc1.weight, before" in r and "per-token experts" in r for r in mixing)
    config, cls = new_architecture_configs()["segformer"]
    with pytest.raises(moefy.errors.NoFFNFoundError) as info:  # what convert says first
        moefy.convert(cls(config).eval(), moefy.MoEConfig(method="upcycle", num_experts=2,
                                                          top_k=1))
    assert str(info.value).startswith("[PlanRewrite] SegformerModel's feed-forward blocks "
                                      "mix tokens (2 found): a token-mixing convolution")
    del info


def test_efficientnet_squeeze_excitation_is_not_a_token_ffn():
    matches, reasons = hf_rejections("efficientnet")
    assert matches == []  # before: every block's squeeze-excitation gate matched
    assert sum("pooled over the tokens" in r for r in reasons) >= 2


# ------------------------------------------------ a norm between the activation and down

SUB_LN = (dict(gated=True, norm="layer_norm"), dict(gated=False, norm="layer_norm"),
          dict(gated=True, norm="rms_norm"))


@pytest.mark.parametrize("kw", SUB_LN)
def test_sub_ln_ffn_upcycles_exactly(kw):
    torch.manual_seed(0)
    model = SubLNSwiGLU(**kw).eval()
    (m,), _ = matches_of(model)
    assert m.hidden_norm is not None and m.hidden_norm.kind == kw["norm"]
    assert (m.gate is not None) == kw["gated"]
    cfg = moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2)
    moe_model = moefy.convert(model, cfg, example_inputs=(X,))
    (moe,) = [m for m in moe_model.modules() if isinstance(m, moefy.MoE)]
    with torch.no_grad():
        torch.testing.assert_close(moe_model(X), model(X), rtol=1e-5, atol=1e-5)
    # with gradients in training, the experts run as one masked product of all experts'
    # hidden rows side by side: the norm must still see one expert's at a time
    moe_model.train(), model.train()
    x, x_ref = X.clone().requires_grad_(), X.clone().requires_grad_()
    y, y_ref = moe_model(x), model(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-5)
    assert moe.w_in.grad is not None


@pytest.mark.parametrize("cfg", (dict(method="split", num_experts=4, top_k=4),
                                 dict(method="upcycle", num_experts=4, top_k=2, granularity=2)))
def test_sub_ln_ffn_is_not_cut_into_neurons(cfg):
    model = SubLNSwiGLU().eval()
    with pytest.raises(ConversionError, match="layer norm over its 32 hidden features .* "
                       "reads every neuron at once, so its neurons cannot be cut"):
        moefy.convert(model, moefy.MoEConfig(**cfg), example_inputs=(X,))
