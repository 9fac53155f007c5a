"""method="neuron" (moefy/passes/neuron.py): built layers are exactly the dense model until a
budget is set; the budget is met on the calibration data, spent where the block errors say,
and refused clearly where it cannot be."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import transformers

from moefy import MoEConfig, convert, distill
from moefy.errors import ConversionError
from moefy.layers.neuron import DecodeLinear, NeuronFFN, SparseLinear
from moefy.passes.neuron import LEVELS, Knob, allocate, knobs_of


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   num_key_value_heads=2, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


def batches(n=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (4, 32), generator=g)} for _ in range(n)]


class GeluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(32, 128), nn.GELU(), nn.Linear(128, 32))
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        return self.head(x + self.block(x))


@pytest.mark.parametrize("selection", ["input", "gate"])
def test_budget_one_is_exactly_the_dense_model(selection):
    model = tiny_llama()
    before = copy.deepcopy(model.state_dict())
    moe = convert(model, MoEConfig(method="neuron", selection=selection),
                  calibration_data=batches(2))
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        assert torch.equal(moe(ids).logits, model(ids).logits)
    layers = [m for m in moe.modules() if isinstance(m, (NeuronFFN, SparseLinear))]
    assert sum(isinstance(m, NeuronFFN) for m in layers) == 3
    assert sum(isinstance(m, SparseLinear) for m in layers) == 12  # q, k, v, o per layer
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, (NeuronFFN, SparseLinear)) for m in model.modules())


@pytest.mark.parametrize("ffn_only", (False, True))
def test_a_causal_lm_s_head_is_read_by_rows_and_stays_tied(ffn_only):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    moe = convert(model, MoEConfig(method="neuron", active=0.6, ffn_only=ffn_only),
                  calibration_data=batches(2))
    assert type(model.lm_head) is nn.Linear  # the caller's model is untouched
    assert type(moe.lm_head) is DecodeLinear
    assert moe.lm_head.weight is moe.model.embed_tokens.weight  # still tied
    assert moe.lm_head.weight is not model.lm_head.weight
    ids = torch.randint(0, 128, (1, 12))
    from moefy.runtime import neuron as runtime
    from moefy.runtime.kernels import neuron_kernels_available

    calls = []
    real = runtime._rows_linear_op
    runtime._rows_linear_op = lambda *a: calls.append(a[0].shape) or real(*a)
    try:
        with torch.no_grad():
            moe(input_ids=ids[:, :1])
    finally:
        runtime._rows_linear_op = real
    assert calls == ([(1, 64)] if neuron_kernels_available() else [])  # the head, by rows
    with torch.no_grad():
        out = moe(input_ids=ids, use_cache=True)
        step = moe(input_ids=ids[:, :1], cache=out.past_key_values, use_cache=True)
        hidden = moe.model(input_ids=ids[:, :1], cache=moe(input_ids=ids, use_cache=True)
                           .past_key_values, use_cache=True).last_hidden_state
    # the decode step's logits are its hidden state through the (dense) head
    torch.testing.assert_close(step.logits, hidden @ moe.model.embed_tokens.weight.T,
                               atol=1e-5, rtol=1e-5)
    inplace = copy.deepcopy(model)
    convert(inplace, MoEConfig(method="neuron", active=0.6), calibration_data=batches(2),
            inplace=True)
    assert type(inplace.lm_head) is DecodeLinear


def share_read(model, data, only=None):
    """The share of the knobs' weights read per token on ``data``, measured by hooks (with
    ``only``: per knob of those, by name)."""
    knobs = knobs_of(model) if only is None else only
    kept = {k.name: [] for k in knobs}

    def hook_for(layer, mine):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            for k in mine:
                t = float(getattr(layer, k.attr))
                if isinstance(layer, SparseLinear):
                    s = layer.scores(x)
                elif k.attr == "in_threshold":
                    s = x.abs() * layer.in_scale
                else:
                    s = layer.hidden(x).abs() * layer.h_scale
                kept[k.name].append(float((s > t).float().mean()) if t >= 0 else 1.0)
        return hook

    by_layer = {}
    for k in knobs:
        by_layer.setdefault(k.layer, []).append(k)
    hooks = [layer.register_forward_pre_hook(hook_for(layer, mine))
             for layer, mine in by_layer.items()]
    with torch.no_grad():
        for b in data:
            model(**b)
    for h in hooks:
        h.remove()
    mean = {k.name: sum(kept[k.name]) / len(kept[k.name]) for k in knobs}
    if only is not None:
        return mean
    total = sum(k.weights for k in knobs)
    return sum(k.weights * mean[k.name] for k in knobs) / total


@pytest.mark.parametrize("selection", ["input", "gate"])
def test_the_budget_is_met_on_the_calibration_data(selection):
    model, data = tiny_llama(), batches()
    moe = convert(model, MoEConfig(method="neuron", active=0.5, selection=selection),
                  calibration_data=data)
    assert share_read(moe, data[:2]) == pytest.approx(0.5, abs=0.03)
    # unseen data reads about as much
    assert share_read(moe, batches(2, seed=7)) == pytest.approx(0.5, abs=0.08)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        dense, sparse = model(ids).logits, moe(ids).logits
    assert torch.isfinite(sparse).all() and not torch.equal(dense, sparse)
    records = [m.conversion for m in moe.modules() if isinstance(m, NeuronFFN)]
    assert all(0 < r["share_in"] <= 1 and 0 < r["share_h"] <= 1 for r in records)
    assert all("active=0.5" in r["verified"] for r in records)


def test_a_lower_budget_costs_more_and_keeps_the_order():
    model, data = tiny_llama(), batches()
    ids = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        dense = model(ids).logits.log_softmax(-1)
        kl = []
        for active in (0.8, 0.5, 0.3):
            moe = convert(model, MoEConfig(method="neuron", active=active),
                          calibration_data=data)
            out = moe(ids).logits.log_softmax(-1)
            kl.append(float((dense.exp() * (dense - out)).sum(-1).mean()))
    assert 0 < kl[0] < kl[1] < kl[2]


def test_ffn_only_leaves_attention_dense_and_counts_the_ffn_weights():
    model, data = tiny_llama(), batches()
    moe = convert(model, MoEConfig(method="neuron", active=0.5, ffn_only=True),
                  calibration_data=data)
    assert not any(isinstance(m, SparseLinear) for m in moe.modules())
    assert share_read(moe, data[:2]) == pytest.approx(0.5, abs=0.03)


def test_a_plain_gelu_mlp_with_biases_converts_and_keeps_its_head_dense():
    model = GeluMLP().eval()
    data = [(torch.randn(64, 32),) for _ in range(4)]
    moe = convert(model, MoEConfig(method="neuron", active=0.6), calibration_data=data)
    assert isinstance(moe.block, NeuronFFN)
    # the head is the model's own output projection, not beside the FFN in a block
    assert type(moe.head) is nn.Linear
    x = torch.randn(8, 32)
    exact = convert(model, MoEConfig(method="neuron"), example_inputs=(x,))
    torch.testing.assert_close(exact(x), model(x), atol=1e-5, rtol=1e-5)


def test_refusals_come_before_any_change():
    model = tiny_llama()
    with pytest.raises(ConversionError, match="calibration_data"):
        convert(model, MoEConfig(method="neuron", active=0.5))
    with pytest.raises(ValueError, match="does not apply to method='neuron'"):
        MoEConfig(method="neuron", top_k=2)
    with pytest.raises(ValueError, match="0 < active <= 1"):
        MoEConfig(method="neuron", active=0.0)
    with pytest.raises(ValueError, match="method='neuron' only"):
        MoEConfig(method="split", ffn_only=True)


def make_knob(weights, errors):
    k = Knob("x", None, "threshold", weights)
    k.errors = list(errors)
    return k


def test_the_greedy_allocation_spends_where_error_is_cheapest():
    cheap = make_knob(100, [0.0] + [0.001 * i for i in range(1, len(LEVELS))])
    costly = make_knob(100, [0.0] + [0.1 * i for i in range(1, len(LEVELS))])
    allocate([cheap, costly], budget=120)
    assert costly.share == 1.0
    assert cheap.share == pytest.approx(0.2, abs=0.03)
    # a budget neither can reach alone is split between them; the weights read fit it
    allocate([cheap, costly], budget=60)
    assert 100 * cheap.share + 100 * costly.share <= 60 + 1e-6
    assert cheap.share < costly.share


def test_interpolated_errors_are_monotone_between_levels():
    k = make_knob(10, [0.1 * i for i in range(len(LEVELS))])  # 0.1 per 0.05 of share
    values = [k.error(s) for s in (1.0, 0.975, 0.95, 0.55, 0.1, 0.05, 0.025)]
    assert values == sorted(values)
    assert math.isclose(values[1], 0.05) and math.isclose(values[-1], 0.1 * len(LEVELS) - 0.05)


def test_distillation_trains_single_neuron_layers_and_keeps_the_selection():
    model, data = tiny_llama(), batches(8)
    sparse = convert(model, MoEConfig(method="neuron", active=0.4), calibration_data=data)
    before = [float(m.in_threshold) for m in sparse.modules() if isinstance(m, NeuronFFN)]
    weights = {n: p.detach().clone() for n, p in sparse.named_parameters()}
    ids = data[0]["input_ids"]

    def kl():
        with torch.no_grad():
            p, q = model(ids).logits.log_softmax(-1), sparse(ids).logits.log_softmax(-1)
        return float((p.exp() * (p - q)).sum(-1).mean())

    first = kl()
    distill(sparse, model, data[:1], steps=12, lr=3e-4, progress=False)
    assert kl() < 0.7 * first
    changed = {n for n, p in sparse.named_parameters() if not torch.equal(p, weights[n])}
    assert any(".mlp." in n for n in changed) and any("q_proj" in n for n in changed)
    assert not any("embed" in n or "norm" in n for n in changed)  # only the sparse layers
    # distillation trains the weights, not the selection: the thresholds stay as allocated
    assert [float(m.in_threshold) for m in sparse.modules() if isinstance(m, NeuronFFN)] == before


def test_minutes_record_what_distillation_did():
    model, data = tiny_llama(), batches(8)
    tuned = convert(model, MoEConfig(method="neuron", active=0.4, minutes=0.2),
                    calibration_data=data)
    infos = [m.conversion["distill"] for m in tuned.modules() if isinstance(m, NeuronFFN)]
    assert len(infos) == 3 and infos[0] == infos[-1]
    # how many steps fit depends on how fast this machine built it; the record says either
    assert infos[0]["steps"] > 0 or "building took" in infos[0]["why"], infos[0]


def test_a_model_in_training_mode_is_calibrated_without_its_dropout():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=176,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, attention_dropout=0.5)
    model = transformers.LlamaForCausalLM(cfg).train()
    data = batches(4)
    first, second = (convert(model, MoEConfig(method="neuron", active=0.5),
                             calibration_data=data) for _ in range(2))
    thresholds = [[float(t) for n, t in m.named_buffers() if n.endswith("threshold")]
                  for m in (first, second)]
    assert thresholds[0] == thresholds[1]
    assert model.training and first.training  # modes are the caller's again


# --------------------------------------------------------------- selection "sequence" (GRIFFIN)


def test_sequence_budget_one_is_exactly_the_dense_model_also_when_decoding():
    from moefy.evaluate import decode_perplexity

    model, data = tiny_llama(), batches(2)
    moe = convert(model, MoEConfig(method="neuron", selection="sequence"), calibration_data=data)
    ffns = [m for m in moe.modules() if isinstance(m, NeuronFFN)]
    assert len(ffns) == 3 and all(m.kept_neurons() is None for m in ffns)
    assert decode_perplexity(moe, data) == pytest.approx(decode_perplexity(model, data),
                                                         rel=1e-5)


@pytest.mark.parametrize("ffn_only", [True, False])
def test_sequence_selection_meets_the_budget_and_keeps_the_prompt_exact(ffn_only):
    from moefy.evaluate import decode_perplexity

    model, data = tiny_llama(), batches()
    moe = convert(model, MoEConfig(method="neuron", active=0.5, selection="sequence",
                                   ffn_only=ffn_only), calibration_data=data)
    ffns = [m for m in moe.modules() if isinstance(m, NeuronFFN)]
    assert all(m._set is None for m in ffns)  # nothing picked from calibration text is left
    assert all(m.conversion["share_keep"] == pytest.approx(float(m.keep)) for m in ffns)
    # what a decoded token reads: each FFN's set, each projection's kept inputs
    knobs = knobs_of(moe)
    read = {k.name: (k.layer.kept_neurons() or k.layer.ffn_size) / k.layer.ffn_size
            for k in knobs if k.attr == "keep"}
    if not ffn_only:
        shares = share_read(moe, data[:2], only=[k for k in knobs if k.attr != "keep"])
        read.update(shares)
    total = sum(k.weights for k in knobs)
    assert sum(k.weights * read[k.name] for k in knobs) / total == pytest.approx(0.5, abs=0.03)
    ids = torch.randint(0, 128, (2, 20))
    with torch.no_grad():
        dense, sparse = model(ids).logits, moe(ids).logits
    if ffn_only:  # the prompt runs dense
        torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    assert decode_perplexity(moe, data[:2]) != decode_perplexity(model, data[:2])


def test_sequence_selection_needs_calibration_sequences_of_two_tokens():
    model = tiny_llama()
    one = [{"input_ids": torch.randint(0, 128, (16, 1))} for _ in range(4)]
    with pytest.raises(ConversionError, match="at least 2 tokens"):
        convert(model, MoEConfig(method="neuron", active=0.5, selection="sequence",
                                 ffn_only=True), calibration_data=one)
