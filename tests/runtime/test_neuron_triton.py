"""moefy/runtime/neuron_triton.py: the CUDA decode kernels (Triton) against the definitions
(the naive loops of test_neuron.py). Without a GPU they run under Triton's interpreter on
CPU tensors; with one, the gpu-marked tests run them compiled, through the public functions
that choose them."""

import os

import pytest
import torch

if not torch.cuda.is_available():  # before triton decorates the kernels: the interpreter
    os.environ.setdefault("TRITON_INTERPRET", "1")
pytest.importorskip("triton")

from moefy.runtime import neuron  # noqa: E402
from moefy.runtime import neuron_triton as tri  # noqa: E402
from tests.runtime.test_neuron import (  # noqa: E402
    ACTIVATIONS,
    close,
    make_ffn,
    make_linear,
    naive_neuron_ffn,
    naive_sparse_input_linear,
    threshold_keeping,
)

interpreted = pytest.mark.skipif(torch.cuda.is_available(),
                                 reason="with CUDA the gpu tests run the compiled kernels")


@interpreted
@pytest.mark.parametrize("keep", (0.0, 0.4, 1.0))
@pytest.mark.parametrize("K, N", ((37, 53), (64, 130), (1, 1)))
@pytest.mark.parametrize("T", (1, 3, 16))
def test_sparse_input_linear_equals_the_loop(T, K, N, keep):
    x, wt, scale, _ = make_linear(T, K, N, seed=T + K)
    t = threshold_keeping(x.abs() * scale, keep)
    close(tri.sparse_input_linear(x, wt, scale, t), naive_sparse_input_linear(x, wt, scale, t))


@interpreted
@pytest.mark.parametrize("up", ("none", "up", "up+bias"))
@pytest.mark.parametrize("keep", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("T", (1, 4))
def test_neuron_ffn_equals_the_loop(T, keep, up):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(T, 37, 53, 29, up, seed=T)
    a = torch.nn.functional.silu(g)
    t = threshold_keeping(a.abs() * coef, keep)
    close(tri.neuron_ffn(x, g, w_up, b_up, w_down_t, coef, t, "silu"),
          naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, t, "silu"))


@interpreted
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_neuron_ffn_every_activation(activation):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(2, 24, 40, 16, "up+bias", seed=5)
    close(tri.neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.2, activation),
          naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.2, activation))


@interpreted
def test_bfloat16_weights_accumulate_in_float32_and_select_like_pytorch():
    x, wt, scale, _ = make_linear(2, 64, 48, seed=3)
    xb, wb = x.bfloat16(), wt.bfloat16()
    t = threshold_keeping(xb.float().abs() * scale, 0.5)
    got = tri.sparse_input_linear(xb, wb, scale, t)
    assert got.dtype == torch.bfloat16
    want = naive_sparse_input_linear(xb.float(), wb.float(), scale, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


@interpreted
def test_a_nan_input_stays_visible_and_a_dropped_inf_is_not_a_nan():
    x, wt, scale, _ = make_linear(2, 32, 24, seed=1)
    x[0, 4] = float("nan")
    assert tri.sparse_input_linear(x, wt, scale, 0.5)[0].isnan().all()
    x2, g, w_up, b_up, w_down_t, coef = make_ffn(1, 16, 24, 8, "up", seed=2)
    w_down_t[3] = float("inf")  # neuron 3's down row, and neuron 3 dropped
    g[0, 3] = -30.0  # silu(-30) ≈ -3e-12: its score is below any sensible threshold
    y = tri.neuron_ffn(x2, g, w_up, b_up, w_down_t, coef, 1e-6, "silu")
    assert y.isfinite().all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_decode_takes_the_triton_kernels_and_matches_the_cpu(dtype, monkeypatch):
    calls = []
    for name in ("sparse_input_linear", "neuron_ffn"):
        real = getattr(tri, name)
        monkeypatch.setattr(tri, name, lambda *a, real=real: calls.append(1) or real(*a))
    x, wt, scale, bias = make_linear(4, 96, 80, seed=7)
    t = threshold_keeping(x.abs() * scale, 0.5)
    want = naive_sparse_input_linear(x.to(dtype).float(), wt.to(dtype).float(), scale, t,
                                     bias.to(dtype).float())
    dev = [v.cuda() for v in (x.to(dtype), wt.to(dtype), scale, bias.to(dtype))]
    with torch.no_grad():
        got = neuron.sparse_input_linear(*dev[:3], t, dev[3]).float().cpu()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    x, g, w_up, b_up, w_down_t, coef = make_ffn(4, 64, 96, 48, "up+bias", seed=8)
    args = [v.to(dtype) for v in (x, g, w_up, b_up, w_down_t)]
    a = torch.nn.functional.silu(args[1].float())
    t = threshold_keeping(a.abs() * coef, 0.5)
    want = naive_neuron_ffn(*[v.float() for v in args[:4]], args[4].float(), coef, t, "silu")
    with torch.no_grad():
        got = neuron.neuron_ffn(*[v.cuda() for v in args], coef.cuda(), t, "silu")
    torch.testing.assert_close(got.float().cpu().double(), want, rtol=tol, atol=tol)
    assert len(calls) == 2
