"""SparseLinear and NeuronFFN (moefy/layers/neuron.py) against naive per-token references:
exactly the dense layer with thresholds off, exactly the masked computation with them on, on
the decode path (a few tokens: the C++ kernels where built) and the prefill path alike."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.errors import InputError
from moefy.layers.neuron import DENSE, NeuronFFN, SparseLinear


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
