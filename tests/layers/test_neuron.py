"""SparseLinear and NeuronFFN (moefy/layers/neuron.py) against naive per-token references:
exactly the dense layer with thresholds off, exactly the masked computation with them on, on
the decode path (a few tokens: the C++ kernels where built) and the prefill path alike."""

import threading

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.errors import InputError
from moefy.layers.neuron import DENSE, DecodeLinear, NeuronFFN, SparseLinear, linears_by_rows


def naive_sparse_linear(x, w, b, scale, t):
    """Per token: the kept channels' columns, summed one by one."""
    rows = x.reshape(-1, x.shape[-1])
    scores = rows.abs() * scale  # float32, as the layer computes them
    out = []
    for r, s in zip(rows, scores, strict=True):
        y = torch.zeros(w.shape[0], dtype=torch.float64)
        for j in range(r.numel()):
            if not (float(s[j]) <= t):
                y += r[j].double() * w[:, j].double()
        out.append(y if b is None else y + b.double())
    return torch.stack(out).reshape(*x.shape[:-1], w.shape[0])


def dense_ffn(x, w_up, w_gate, w_down, b_up=None, b_gate=None, b_down=None, act=F.silu):
    h = act(F.linear(x, w_gate, b_gate)) * F.linear(x, w_up, b_up) if w_gate is not None \
        else act(F.linear(x, w_up, b_up))
    return F.linear(h, w_down, b_down)


def ffn_weights(H=24, I=40, O=None, gated=True, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    O = O or H
    w = {"w_in": torch.randn(I, H, generator=g) / H ** 0.5,
         "w_gate": torch.randn(I, H, generator=g) / H ** 0.5 if gated else None,
         "w_out": torch.randn(O, I, generator=g) / I ** 0.5}
    if bias:
        w.update(b_in=torch.randn(I, generator=g) * 0.1,
                 b_gate=torch.randn(I, generator=g) * 0.1 if gated else None,
                 b_out=torch.randn(O, generator=g) * 0.1)
    return w


def layer_for(w, selection, activation="silu"):
    H, I, O = w["w_in"].shape[1], w["w_in"].shape[0], w["w_out"].shape[0]
    layer = NeuronFFN(H, I, O, activation=activation, gated=w["w_gate"] is not None,
                      bias="b_in" in w, selection=selection)
    return layer.load_dense(w["w_in"], w["w_out"], w["w_gate"], w.get("b_in"),
                            w.get("b_gate"), w.get("b_out"))


def reference_ffn(layer: NeuronFFN, w, x, act):
    """The NeuronFFN's selection spelled out per token, in float64."""
    t_in, t_h = float(layer.in_threshold), float(layer.h_threshold)
    keep_x = ~(x.abs() * layer.in_scale <= t_in) if t_in >= 0 else torch.ones_like(x, dtype=bool)
    xs = torch.where(keep_x, x, 0).double()
    wd = {k: (v.double() if v is not None else None) for k, v in w.items()}
    up = F.linear(x.double(), wd["w_in"], wd.get("b_in"))  # the up projection reads all of x
    if layer.selection == "input":
        up = F.linear(xs, wd["w_in"], wd.get("b_in"))
        if wd["w_gate"] is not None:
            h = act(F.linear(xs, wd["w_gate"], wd.get("b_gate"))) * up
        else:
            h = act(up)
        score = h.abs() * layer.h_scale.double()
    else:
        first = wd["w_gate"] if wd["w_gate"] is not None else wd["w_in"]
        b_first = wd.get("b_gate") if wd["w_gate"] is not None else wd.get("b_in")
        a = act(F.linear(xs, first, b_first))
        score = a.abs() * layer.h_scale.double()
        h = a * up if wd["w_gate"] is not None else a
    keep_h = ~(score <= t_h) if t_h >= 0 else torch.ones_like(h, dtype=bool)
    return F.linear(torch.where(keep_h, h, 0), wd["w_out"], wd.get("b_out"))


def test_sparse_linear_is_the_linear_with_the_threshold_off():
    lin = nn.Linear(37, 53)
    sparse = SparseLinear.from_linear(lin)
    x = torch.randn(2, 5, 37)
    torch.testing.assert_close(sparse(x), lin(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.weight, lin.weight)
    assert torch.allclose(sparse.scale, lin.weight.norm(dim=0))


@pytest.mark.parametrize("tokens", [1, 3, 40])  # decode (kernel) and prefill (masked) paths
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_matches_the_naive_selection(tokens, bias):
    torch.manual_seed(tokens)
    lin = nn.Linear(37, 53, bias=bias)
    sparse = SparseLinear.from_linear(lin)
    x = torch.randn(tokens, 37)
    t = float((sparse.scores(x)).median())
    sparse.threshold.fill_(t)
    with torch.no_grad():
        got = sparse(x)
    want = naive_sparse_linear(x, lin.weight.detach(), None if lin.bias is None
                               else lin.bias.detach(), sparse.scale, t)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(got, lin(x))  # something was dropped


@pytest.mark.parametrize("selection", ["input", "gate"])
@pytest.mark.parametrize("gated,bias,activation", [(True, False, "silu"), (True, True, "gelu"),
                                                   (False, True, "gelu"), (False, False, "relu")])
def test_neuron_ffn_is_the_dense_ffn_with_thresholds_off(selection, gated, bias, activation):
    w = ffn_weights(gated=gated, bias=bias)
    layer = layer_for(w, selection, activation)
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation]
    x = torch.randn(3, 7, 24)
    want = dense_ffn(x, w["w_in"], w["w_gate"], w["w_out"], w.get("b_in"), w.get("b_gate"),
                     w.get("b_out"), act)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 2, 40])
@pytest.mark.parametrize("selection", ["input", "gate"])
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
def test_neuron_ffn_matches_the_per_token_selection(tokens, selection, gated, bias):
    w = ffn_weights(H=33, I=50, O=33, gated=gated, bias=bias, seed=tokens)
    layer = layer_for(w, selection, "silu")
    x = torch.randn(tokens, 33, generator=torch.Generator().manual_seed(1))
    layer.in_threshold.fill_(float((x.abs() * layer.in_scale).quantile(0.3)))
    with torch.no_grad():
        layer.h_threshold.fill_(float((layer.hidden(x).abs() * layer.h_scale).quantile(0.5)))
    with torch.no_grad():
        got = layer(x)
    want = reference_ffn(layer, w, x, F.silu)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-4)


def test_output_width_may_differ_from_the_input():
    w = ffn_weights(H=16, I=48, O=3, gated=False, bias=True)
    layer = layer_for(w, "input", "relu")
    x = torch.randn(5, 16)
    want = dense_ffn(x, w["w_in"], None, w["w_out"], w["b_in"], None, w["b_out"], F.relu)
    assert layer(x).shape == (5, 3)
    torch.testing.assert_close(layer(x), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("selection", ["input", "gate"])
def test_nan_input_stays_visible_and_a_dropped_inf_does_not_poison(selection):
    layer = layer_for(ffn_weights(), selection)
    layer.in_threshold.fill_(0.5)
    layer.h_threshold.fill_(0.0)
    x = torch.randn(2, 24)
    x[0, 3] = float("nan")
    with torch.no_grad():
        assert torch.isnan(layer(x)[0]).all() and torch.isfinite(layer(x)[1]).all()
    lin = SparseLinear.from_linear(nn.Linear(8, 4))
    lin.threshold.fill_(1.0)
    with torch.no_grad():
        lin.weight_t[2] = float("inf")  # channel 2's weights are inf, its input tiny: dropped
    x = torch.full((1, 8), 5.0)
    x[0, 2] = 1e-6
    with torch.no_grad():
        assert torch.isfinite(lin(x)).all()


def test_gradients_flow_through_the_selection():
    layer = layer_for(ffn_weights(), "input")
    layer.in_threshold.fill_(0.1)
    layer.h_threshold.fill_(0.01)
    x = torch.randn(4, 24, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.w_in_t.grad is not None and layer.w_in_t.grad.abs().sum() > 0


def test_bad_input_is_refused_clearly():
    layer = layer_for(ffn_weights(), "input")
    with pytest.raises(InputError, match=r"\(\.\.\., 24\)"):
        layer(torch.randn(3, 23))
    with pytest.raises(InputError, match="float64"):
        layer(torch.randn(3, 24, dtype=torch.float64))
    with pytest.raises(InputError, match="tensor"):
        SparseLinear(4, 4)([1, 2, 3, 4])
    with pytest.raises(ValueError, match="selection"):
        NeuronFFN(4, 8, selection="oracle")
    with pytest.raises(ValueError, match="positive int"):
        SparseLinear(0, 4)


def test_thresholds_travel_with_the_state_dict():
    layer = layer_for(ffn_weights(), "gate")
    layer.in_threshold.fill_(0.2)
    layer.h_threshold.fill_(0.05)
    layer.h_scale.mul_(1.5)
    twin = NeuronFFN(24, 40, activation="silu", selection="gate")
    twin.load_state_dict(layer.state_dict())
    x = torch.randn(6, 24)
    with torch.no_grad():
        torch.testing.assert_close(twin(x), layer(x), atol=0, rtol=0)
    assert float(twin.in_threshold) == float(layer.in_threshold) > DENSE


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad"])
@pytest.mark.parametrize("tokens", [1, 40])
def test_every_grad_mode_gives_the_same_output(mode, tokens):
    w = ffn_weights(bias=True)
    layer = layer_for(w, "input", "silu")
    x = torch.randn(tokens, 24, generator=torch.Generator().manual_seed(2))
    # quantiles interpolate between scores: no score sits exactly on a threshold, where
    # the float64 reference could round the other way
    layer.in_threshold.fill_(float((x.abs() * layer.in_scale).quantile(0.5)))
    with torch.no_grad():
        layer.h_threshold.fill_(float((layer.hidden(x).abs() * layer.h_scale).quantile(0.5)))
    want = reference_ffn(layer, w, x, F.silu)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode,
           "grad": torch.enable_grad}[mode]
    with ctx():
        got = layer(x)
    torch.testing.assert_close(got.detach().double(), want, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------- selection "sequence" (GRIFFIN)


def griffin_set(h_prompt, k):
    """A sequence's set spelled out: per neuron, ‖h_:,i / ‖h_t,:‖‖ over the prompt's tokens,
    the k largest, in float64."""
    h = h_prompt.double()
    stat = torch.stack([sum((h[t, i] / h[t].norm()) ** 2 for t in range(h.shape[0])).sqrt()
                        for i in range(h.shape[1])])
    return sorted(stat.argsort(descending=True)[:k].tolist())


def hidden_of(w, x, act=F.silu):
    return (act(F.linear(x, w["w_gate"], w.get("b_gate"))) * F.linear(x, w["w_in"], w.get("b_in"))
            if w["w_gate"] is not None else act(F.linear(x, w["w_in"], w.get("b_in"))))


@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
def test_sequence_selection_with_keep_off_is_the_dense_ffn_in_prefill_and_decode(gated, bias):
    w = ffn_weights(gated=gated, bias=bias)
    layer = layer_for(w, "sequence").eval()
    assert float(layer.keep) == DENSE and layer.kept_neurons() is None
    for x in (torch.randn(2, 7, 24), torch.randn(2, 1, 24), torch.randn(5, 24)):
        torch.testing.assert_close(layer(x), dense_ffn(x, w["w_in"], w["w_gate"], w["w_out"],
                                                       w.get("b_in"), w.get("b_gate"),
                                                       w.get("b_out")))
    assert layer._set is None  # nothing picked, nothing kept


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("gated,bias", [(True, False), (True, True), (False, True)])
def test_the_prompt_is_exact_and_picks_each_sequence_s_set_then_decoding_reads_only_it(
        rows, gated, bias):
    w = ffn_weights(gated=gated, bias=bias)
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.3)
    k = layer.kept_neurons()
    assert k == 12  # ⌈0.3 · 40⌉
    prompt = torch.randn(rows, 9, 24)
    dense = dense_ffn(prompt, w["w_in"], w["w_gate"], w["w_out"], w.get("b_in"),
                      w.get("b_gate"), w.get("b_out"))
    torch.testing.assert_close(layer(prompt), dense)  # the prompt runs dense
    sets = [griffin_set(hidden_of(w, prompt[r]), k) for r in range(rows)]
    assert layer._set.index.tolist() == sets
    for _ in range(3):  # decoding steps: the same set each time
        token = torch.randn(rows, 1, 24)
        h = hidden_of(w, token).double()
        kept = torch.zeros_like(h)
        for r in range(rows):
            kept[r, 0, sets[r]] = 1
        want = F.linear(h * kept, w["w_out"].double(),
                        None if w.get("b_out") is None else w["b_out"].double())
        torch.testing.assert_close(layer(token).double(), want, atol=1e-5, rtol=1e-5)
    assert layer._set.index.tolist() == sets


def test_a_new_prompt_a_new_batch_size_or_forget_picks_a_new_set():
    w = ffn_weights()
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.25)
    layer(torch.randn(1, 6, 24))
    first = layer._set.index.clone()
    layer(torch.randn(1, 6, 24) * 3 + 1)  # another prompt
    assert not torch.equal(layer._set.index, first)
    token = torch.randn(2, 1, 24)  # two sequences where one was: a new pair of prompts,
    dense = dense_ffn(token, w["w_in"], w["w_gate"], w["w_out"])  # run dense
    torch.testing.assert_close(layer(token), dense)
    assert layer._set.rows == 2
    layer.forget()
    assert layer._set is None
    torch.testing.assert_close(layer(token), dense)  # a one-token prompt after forget


def test_decoding_follows_weights_changed_after_the_prompt():
    w = ffn_weights()
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.5)
    layer(torch.randn(1, 8, 24))
    token = torch.randn(1, 1, 24)
    before = layer(token)
    with torch.no_grad():
        layer.w_out_t.mul_(2.0)  # an optimizer step, in place
    torch.testing.assert_close(layer(token), 2 * before)


def test_gradients_reach_only_the_set_s_weights_when_decoding():
    w = ffn_weights()
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.25)
    with torch.no_grad():
        layer(torch.randn(1, 8, 24))
    chosen = layer._set.index[0]
    layer(torch.randn(1, 1, 24)).sum().backward()
    grad = layer.w_out_t.grad.abs().sum(-1)
    assert (grad[chosen] > 0).all()
    others = torch.ones(40, dtype=torch.bool)
    others[chosen] = False
    assert (grad[others] == 0).all()


@pytest.mark.parametrize("then", ["no_grad", "grad"])
def test_a_prompt_under_inference_mode_decodes_in_other_modes(then):
    layer = layer_for(ffn_weights(), "sequence").eval()
    layer.keep.fill_(0.5)
    token = torch.randn(1, 1, 24)
    with torch.inference_mode():
        layer(torch.randn(1, 8, 24))
        want = layer(token)
    with torch.no_grad() if then == "no_grad" else torch.enable_grad():
        got = layer(token)
    torch.testing.assert_close(got, want)


def test_a_nan_in_the_prompt_keeps_its_neurons_visible():
    w = ffn_weights()
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.1)
    prompt = torch.randn(1, 5, 24)
    with torch.no_grad():
        layer.w_in_t[:, 7] = float("nan")  # neuron 7's gate: NaN for every token
    assert torch.isnan(layer(prompt)).all()
    assert 7 in layer._set.index[0].tolist()
    assert torch.isnan(layer(torch.randn(1, 1, 24))).all()  # still visible when decoding


def test_exporting_a_sequence_layer_is_refused_with_the_reason():
    layer = layer_for(ffn_weights(), "sequence").eval()
    layer.keep.fill_(0.5)
    with pytest.raises(Exception, match="keeps its neuron set between calls"):
        torch.export.export(layer, (torch.randn(2, 4, 24),))


def test_prompt_then_decode_is_what_generation_computes():
    w = ffn_weights()
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.4)
    x = torch.randn(2, 10, 24)
    sparse, dense = layer.prompt_then_decode(x)
    layer(x[:, :5])
    steps = torch.cat([layer(x[:, t:t + 1]) for t in range(5, 10)], dim=1)
    torch.testing.assert_close(sparse, steps)
    torch.testing.assert_close(dense, dense_ffn(x[:, 5:], w["w_in"], w["w_gate"], w["w_out"]))
    assert layer.prompt_then_decode(x[:, :1]) is None


def test_training_runs_a_sequence_as_generation_would_and_keeps_no_set():
    w = ffn_weights()
    layer = layer_for(w, "sequence").eval()
    layer.keep.fill_(0.3)
    x = torch.randn(2, 10, 24)
    sparse, _ = layer.prompt_then_decode(x)
    layer.train()
    y = layer(x)
    assert layer._set is None
    torch.testing.assert_close(y[:, 5:], sparse)
    torch.testing.assert_close(y[:, :5], dense_ffn(x[:, :5], w["w_in"], w["w_gate"], w["w_out"]))
    y[:, 5:].sum().backward()
    assert layer.w_out_t.grad.abs().sum(-1).gt(0).sum() <= 2 * layer.kept_neurons()


def test_empty_input_to_a_sequence_layer_gives_empty_output_and_keeps_the_set():
    layer = layer_for(ffn_weights(), "sequence").eval()
    layer.keep.fill_(0.5)
    layer(torch.randn(1, 6, 24))
    before = layer._set
    for x in (torch.randn(0, 1, 24), torch.randn(1, 0, 24), torch.randn(0, 24)):
        assert layer(x).shape == (*x.shape[:-1], 24)
    assert layer._set is before


# ----------------------------------------------------------------------------- DecodeLinear


@pytest.mark.parametrize("tokens", (1, 3, 40))
@pytest.mark.parametrize("bias", (False, True))
def test_decode_linear_is_the_linear_over_the_same_parameters(tokens, bias):
    torch.manual_seed(tokens)
    lin = nn.Linear(24, 50, bias=bias)
    head = DecodeLinear.from_linear(lin)
    assert head.weight is lin.weight and head.bias is lin.bias  # shared, not copied
    assert isinstance(head, nn.Linear) and head.state_dict().keys() == lin.state_dict().keys()
    x = torch.randn(2, tokens, 24)
    with torch.no_grad():
        torch.testing.assert_close(head(x), lin(x), atol=1e-5, rtol=1e-5)
    y = head(x)  # grad mode: F.linear itself, differentiable
    assert torch.equal(y, lin(x))
    y.sum().backward()
    assert lin.weight.grad is not None and lin.weight.grad.shape == (50, 24)


def test_decode_linear_keeps_a_tie_and_refuses_what_is_no_linear():
    emb = nn.Embedding(50, 24)
    lin = nn.Linear(24, 50, bias=False)
    lin.weight = emb.weight  # tied, as a causal LM's head
    head = DecodeLinear.from_linear(lin.eval())
    assert head.weight is emb.weight and not head.training
    with torch.no_grad():
        emb.weight[3].fill_(1.0)  # a change to the embedding is the head's
        torch.testing.assert_close(head(torch.ones(1, 24))[0, 3], torch.tensor(24.0))
    with pytest.raises(TypeError, match="takes an nn.Linear"):
        DecodeLinear.from_linear(emb)
    with pytest.raises(RuntimeError):  # as nn.Linear itself refuses a wrong width
        head(torch.randn(1, 23))


def test_linears_by_rows_copies_keeps_ties_and_computes_the_same():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                                   num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, tie_word_embeddings=True)
    model = transformers.LlamaForCausalLM(cfg).eval()
    fast = linears_by_rows(model)
    assert not any(isinstance(m, DecodeLinear) for m in model.modules())  # untouched
    linears = [m for m in fast.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 8 and all(type(m) is DecodeLinear for m in linears)
    assert fast.lm_head.weight is fast.model.embed_tokens.weight
    assert fast.lm_head.weight is not model.lm_head.weight
    bare = nn.Linear(4, 3, bias=False)
    alone = linears_by_rows(bare)
    assert type(alone) is DecodeLinear and alone.weight is not bare.weight
    assert alone.state_dict().keys() == bare.state_dict().keys() == {"weight"}
    ids = torch.randint(0, 64, (1, 3))
    with torch.no_grad():
        torch.testing.assert_close(fast(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_decode_linear_in_every_mode_and_from_two_threads():
    torch.manual_seed(3)
    lin = nn.Linear(40, 300)
    head = DecodeLinear.from_linear(lin)
    x = torch.randn(1, 2, 40)
    with torch.no_grad():
        want = lin(x)
        no_grad = head(x)
    with torch.inference_mode():
        inference = head(x)
    grad = head(x)
    assert grad.requires_grad and not no_grad.requires_grad and inference.is_inference()
    for y in (no_grad, inference, grad.detach()):
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    outs = [None, None]

    def run(i):
        with torch.no_grad():
            outs[i] = [head(x) for _ in range(20)]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(y, no_grad) for ys in outs for y in ys)  # reproducible, no races


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode", "train"])
def test_a_static_ffn_is_the_dense_ffn_of_its_neurons_in_every_mode(mode):
    torch.manual_seed(0)
    layer = NeuronFFN(16, 24, activation="silu", gated=True, bias=True, selection="static")
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    layer.train(mode == "train")
    x = torch.randn(3, 5, 16)
    gate, up = layer.w_in_t[:, :24], layer.w_in_t[:, 24:]
    ref = ((F.silu(x @ gate + layer.b_in[:24]) * (x @ up + layer.b_in[24:])) @ layer.w_out_t
           + layer.b_out)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode()}.get(
        mode, torch.enable_grad())
    with ctx:
        y = layer(x)
    torch.testing.assert_close(y, ref.detach() if mode != "grad" else ref)
    assert y.requires_grad == (mode in ("grad", "train"))
    assert "selection='static'" in repr(layer) and "threshold" not in repr(layer)
    with pytest.raises(InputError):
        layer(torch.randn(3, 15))  # the wrong width: a clear moefy error
