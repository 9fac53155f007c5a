"""The Triton kernels' cases under Triton's interpreter, on CPU tensors: run by
tests/runtime/test_neuron_triton.py in a fresh process with TRITON_INTERPRET=1 set before
triton is first imported (triton decorates its own library functions at import, so the
interpreter cannot be switched on later in a process that imported it: a test process has,
through torch). Not collected on its own (the file name does not start with test_)."""

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("runs under TRITON_INTERPRET=1 (tests/runtime/test_neuron_triton.py starts it)",
                allow_module_level=True)
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


@pytest.mark.parametrize("keep", (0.0, 0.4, 1.0))
@pytest.mark.parametrize("K, N", ((37, 53), (64, 130), (1, 1)))
@pytest.mark.parametrize("T", (1, 3, 16))
def test_sparse_input_linear_equals_the_loop(T, K, N, keep):
    x, wt, scale, _ = make_linear(T, K, N, seed=T + K)
    t = threshold_keeping(x.abs() * scale, keep)
    close(tri.sparse_input_linear(x, wt, scale, t), naive_sparse_input_linear(x, wt, scale, t))


@pytest.mark.parametrize("up", ("none", "up", "up+bias"))
@pytest.mark.parametrize("keep", (0.0, 0.5, 1.0))
@pytest.mark.parametrize("T", (1, 4))
def test_neuron_ffn_equals_the_loop(T, keep, up):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(T, 37, 53, 29, up, seed=T)
    a = torch.nn.functional.silu(g)
    t = threshold_keeping(a.abs() * coef, keep)
    close(tri.neuron_ffn(x, g, w_up, b_up, w_down_t, coef, t, "silu"),
          naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, t, "silu"))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_neuron_ffn_every_activation(activation):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(2, 24, 40, 16, "up+bias", seed=5)
    close(tri.neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.2, activation),
          naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.2, activation))


def test_bfloat16_weights_accumulate_in_float32_and_select_like_pytorch():
    x, wt, scale, _ = make_linear(2, 64, 48, seed=3)
    xb, wb = x.bfloat16(), wt.bfloat16()
    t = threshold_keeping(xb.float().abs() * scale, 0.5)
    got = tri.sparse_input_linear(xb, wb, scale, t)
    assert got.dtype == torch.bfloat16
    want = naive_sparse_input_linear(xb.float(), wb.float(), scale, t)
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("scale_dtype", (torch.float32, torch.bfloat16))
def test_half_precision_selects_what_the_masked_path_selects(scale_dtype):
    """bfloat16 near a threshold: the activation and (with half-precision scales) the score
    rounded as PyTorch rounds them, so both paths keep the same entries."""
    g = torch.tensor([[1.0, 0.5, 2.0]], dtype=torch.bfloat16)
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    w_down_t = torch.ones(3, 5, dtype=torch.bfloat16)
    coef = torch.ones(3, dtype=scale_dtype)
    a = torch.nn.functional.silu(g)
    for t in (float(a[0, 0]) + 1e-4, float(a[0, 0]) - 1e-4, float(a[0, 1]) + 2e-4):
        want = neuron._masked_neuron_ffn(x, g, None, None, w_down_t, coef, t,
                                         neuron.get_activation("silu"))
        got = tri.neuron_ffn(x, g, None, None, w_down_t, coef, t, "silu")
        assert torch.equal(got, want.to(got.dtype)), t
    xs = torch.tensor([[0.734375, 0.5, -0.75]], dtype=torch.bfloat16)
    wt = torch.ones(3, 2, dtype=torch.bfloat16)
    scale = torch.ones(3, dtype=scale_dtype)
    for t in (0.7340, 0.7344, 0.49):
        want = neuron._masked_input_linear(xs, wt, scale, t, None)
        assert torch.equal(tri.sparse_input_linear(xs, wt, scale, t), want), t


def test_a_nan_input_stays_visible_and_a_dropped_inf_is_not_a_nan():
    x, wt, scale, _ = make_linear(2, 32, 24, seed=1)
    x[0, 4] = float("nan")
    assert tri.sparse_input_linear(x, wt, scale, 0.5)[0].isnan().all()
    x2, g, w_up, b_up, w_down_t, coef = make_ffn(1, 16, 24, 8, "up", seed=2)
    w_down_t[3] = float("inf")  # neuron 3's down row, and neuron 3 dropped
    g[0, 3] = -30.0  # silu(-30) ≈ -3e-12: its score is below any sensible threshold
    y = tri.neuron_ffn(x2, g, w_up, b_up, w_down_t, coef, 1e-6, "silu")
    assert y.isfinite().all()
