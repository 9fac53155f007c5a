"""moefy/runtime/neuron.py: input-channel and single-neuron sparse projections equal a naive
per-token loop over the selected indices, the C++ kernels and the masked dense path select
exactly the same entries (strict >), a dropped inf never becomes a NaN, and the PyTorch path
is differentiable."""

import numpy as np
import pytest
import torch

from moefy.activations import get_activation
from moefy.errors import InputError
from moefy.runtime import neuron
from moefy.runtime.kernels import neuron_kernels_available
from moefy.runtime.neuron import neuron_ffn, sparse_input_linear

ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "squared_relu", "quick_gelu", "hardswish")
TOKENS = (1, 2, 3, 7, 16, 40)
LINEAR_SHAPES = ((37, 53), (64, 48))  # (K, N): tails of the 16-wide loops, and none
FFN_SHAPES = ((37, 53, 29), (64, 96, 48))  # (H, F, O)
KEEP = (0.0, 0.5, 1.0)
UP = ("none", "up", "up+bias")
IMPLS = ("public", "kernel", "masked")

needs_kernel = pytest.mark.skipif(not neuron_kernels_available(),
                                  reason="C++ kernels unavailable (MOEFY_NO_EXT=1 or no compiler)")


# ----------------------------------------------------------------------------- oracles


def naive_sparse_input_linear(x, wt, scale, threshold, bias=None):
    """One token and one selected channel at a time, in float64; the selection in float32
    (the threshold rounded to float32), as the op promises."""
    K, N = wt.shape
    xs = x.reshape(-1, K).detach().double().numpy()
    x32 = x.reshape(-1, K).detach().float().numpy()
    s32, w = scale.detach().float().numpy(), wt.detach().double().numpy()
    thr = np.float32(threshold)
    out = np.zeros((xs.shape[0], N))
    for t in range(xs.shape[0]):
        for j in range(K):
            if np.abs(x32[t, j]) * s32[j] > thr:
                out[t] += xs[t, j] * w[j]
        if bias is not None:
            out[t] += bias.detach().double().numpy()
    return torch.from_numpy(out).reshape(*x.shape[:-1], N)


def naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, threshold, activation):
    """One token and one kept neuron at a time, in float64."""
    F_, O = w_down_t.shape
    H = x.shape[-1]
    act = get_activation(activation).fn
    xs = x.reshape(-1, H).detach().double()
    a = act(g.reshape(-1, F_).detach().double())
    c = coef.detach().double()
    out = torch.zeros(xs.shape[0], O, dtype=torch.float64)
    for t in range(xs.shape[0]):
        for i in range(F_):
            if not abs(float(a[t, i])) * float(c[i]) > threshold:
                continue
            u = 1.0
            if w_up is not None:
                u = float(w_up[i].double() @ xs[t])
                if b_up is not None:
                    u += float(b_up[i])
            out[t] += float(a[t, i]) * u * w_down_t[i].double()
    return out.reshape(*x.shape[:-1], O)


# ----------------------------------------------------------------------------- set-up


def threshold_keeping(scores: torch.Tensor, keep: float) -> float:
    """A threshold that keeps about ``keep`` of the scores, halfway between two distinct
    scores (so that a last-bit difference in an activation cannot flip an entry)."""
    s = torch.unique(scores.detach().double().flatten())  # ascending
    if keep >= 1.0:
        return -1.0
    if keep <= 0.0:
        return float(s[-1]) * 2 + 1.0
    i = min(max(1, int(len(s) * (1 - keep))), len(s) - 1)
    return float(s[i - 1] + s[i]) / 2


def run_linear(impl, monkeypatch, x, wt, scale, threshold, bias=None):
    if impl == "kernel":
        if not neuron_kernels_available():
            pytest.skip("C++ kernels unavailable")
        y = torch.ops.moefy_cpu.sparse_input_linear(x.reshape(-1, wt.shape[0]), wt, scale,
                                                    threshold)
        return (y if bias is None else y + bias).reshape(*x.shape[:-1], wt.shape[1])
    if impl == "masked":
        monkeypatch.setattr(neuron, "neuron_kernels_available", lambda: False)
    return sparse_input_linear(x, wt, scale, threshold, bias)


def run_ffn(impl, monkeypatch, x, g, w_up, b_up, w_down_t, coef, threshold, activation):
    if impl == "kernel":
        if not neuron_kernels_available():
            pytest.skip("C++ kernels unavailable")
        F_, O = w_down_t.shape
        y = torch.ops.moefy_cpu.neuron_ffn(x.reshape(-1, x.shape[-1]), g.reshape(-1, F_),
                                           w_up, b_up, w_down_t, coef, threshold,
                                           activation)
        return y.reshape(*x.shape[:-1], O)
    if impl == "masked":
        monkeypatch.setattr(neuron, "neuron_kernels_available", lambda: False)
    return neuron_ffn(x, g, w_up, b_up, w_down_t, coef, threshold, activation)


def make_linear(T, K, N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, K, generator=gen)
    wt = torch.randn(K, N, generator=gen) / K**0.5
    scale = torch.rand(K, generator=gen) + 0.5
    bias = torch.randn(N, generator=gen)
    return x, wt, scale, bias


def make_ffn(T, H, F_, O, up, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=gen)
    g = torch.randn(T, F_, generator=gen) * 2
    w_up = torch.randn(F_, H, generator=gen) / H**0.5 if up != "none" else None
    b_up = torch.randn(F_, generator=gen) if up == "up+bias" else None
    w_down_t = torch.randn(F_, O, generator=gen) / F_**0.5
    coef = torch.rand(F_, generator=gen) + 0.5
    return x, g, w_up, b_up, w_down_t, coef


def close(actual, expected):
    torch.testing.assert_close(actual.double(), expected.double(), rtol=1e-5, atol=2e-5)


# ----------------------------------------------------------------------------- against the loop


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("K,N", LINEAR_SHAPES)
@pytest.mark.parametrize("T", TOKENS)
def test_sparse_input_linear_equals_the_loop(T, K, N, keep, impl, monkeypatch):
    x, wt, scale, bias = make_linear(T, K, N)
    threshold = threshold_keeping(x.abs() * scale, keep)
    for b in (None, bias):
        expected = naive_sparse_input_linear(x, wt, scale, threshold, b)
        close(run_linear(impl, monkeypatch, x, wt, scale, threshold, b), expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("up", UP)
@pytest.mark.parametrize("keep", KEEP)
@pytest.mark.parametrize("H,F_,O", FFN_SHAPES)
@pytest.mark.parametrize("T", TOKENS)
def test_neuron_ffn_equals_the_loop(T, H, F_, O, keep, up, impl, monkeypatch):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(T, H, F_, O, up)
    threshold = threshold_keeping(torch.nn.functional.silu(g).abs() * coef, keep)
    expected = naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, threshold, "silu")
    close(run_ffn(impl, monkeypatch, x, g, w_up, b_up, w_down_t, coef, threshold, "silu"),
          expected)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("up", UP)
@pytest.mark.parametrize("T", (1, 3, 16))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_neuron_ffn_every_activation(activation, T, up, impl, monkeypatch):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(T, 37, 53, 29, up, seed=1)
    act = get_activation(activation).fn
    threshold = threshold_keeping(act(g).abs() * coef, 0.5)
    expected = naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, threshold, activation)
    close(run_ffn(impl, monkeypatch, x, g, w_up, b_up, w_down_t, coef, threshold, activation),
          expected)


def test_leading_dimensions_and_aliases():
    x, wt, scale, bias = make_linear(6, 37, 53)
    x3 = x.reshape(2, 3, 37)
    y = sparse_input_linear(x3, wt, scale, 0.5, bias)
    assert y.shape == (2, 3, 53)
    close(y, naive_sparse_input_linear(x3, wt, scale, 0.5, bias))
    x, g, w_up, b_up, w_down_t, coef = make_ffn(6, 37, 53, 29, "up+bias")
    y = neuron_ffn(x.reshape(3, 2, 37), g.reshape(3, 2, 53), w_up, b_up, w_down_t, coef, 0.3,
                   "swish")  # an alias of silu
    assert y.shape == (3, 2, 29)
    close(y, naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.3, "silu").reshape(3, 2, 29))


# ----------------------------------------------------------------------------- selection


@needs_kernel
@pytest.mark.parametrize("T", (1, 5, 40))
def test_kernel_and_masked_path_select_the_same_channels(T, monkeypatch):
    """With wt = I the output is the masked input itself, bit for bit: any entry selected
    by one path and not the other shows. Thresholds sit exactly on a score (strict >), and
    0.1 is not a float32 (PyTorch compares in float32: float32(0.1) > 0.1 is False)."""
    x, _, scale, _ = make_linear(T, 37, 37)
    x[0, :4] = torch.tensor([0.1, -0.1, 0.5, -0.5])
    scale[:4] = 1.0
    eye = torch.eye(37)
    scores = (x.abs() * scale).flatten()
    for threshold in (0.1, 0.5, float(scores[7]), float(scores.median()), 0.0, -1.0):
        kernel = torch.ops.moefy_cpu.sparse_input_linear(x, eye, scale, threshold)
        expected = torch.where(x.abs() * scale > threshold, x, 0.0)
        assert torch.equal(kernel, expected), threshold
        monkeypatch.setattr(neuron, "neuron_kernels_available", lambda: False)
        assert torch.equal(sparse_input_linear(x, eye, scale, threshold), expected)
        monkeypatch.undo()
    assert torch.equal(torch.ops.moefy_cpu.sparse_input_linear(x, eye, scale, 0.1)[0, :2],
                       torch.zeros(2))


@needs_kernel
@pytest.mark.parametrize("T", (1, 5, 40))
def test_kernel_and_masked_path_select_the_same_neurons(T):
    """relu is exact in both, so with w_down_t = I and no up projection the output is the
    kept activations bit for bit; thresholds sit exactly on a score."""
    _, g, _, _, _, coef = make_ffn(T, 8, 45, 45, "none")
    eye = torch.eye(45)
    scores = (torch.relu(g).abs() * coef).flatten()
    for threshold in (float(scores[3]), float(scores.max()), float(scores.median()), 0.0, 0.1):
        kernel = torch.ops.moefy_cpu.neuron_ffn(torch.zeros(T, 8), g, None, None, eye, coef,
                                                threshold, "relu")
        masked = neuron._masked_neuron_ffn(torch.zeros(T, 8), g, None, None, eye, coef,
                                           threshold, get_activation("relu"))
        assert torch.equal(kernel, masked), threshold


# ----------------------------------------------------------------------------- inf, NaN


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", (1, 3, 40))
def test_a_nan_score_keeps_its_channel_as_the_dense_layer_would(T, impl, monkeypatch):
    x, wt, scale, bias = make_linear(T, 37, 53)
    scale[[3, 20]] = 0.0  # inf * 0 is a NaN score: kept, so the output shows it (dense: NaN)
    x[0, 3], x[-1, 20] = float("inf"), float("-inf")
    y = run_linear(impl, monkeypatch, x, wt, scale, 0.2, bias)
    assert not torch.isfinite(y[0]).any() and not torch.isfinite(y[-1]).any()
    x[0, 3] = float("nan")
    y = run_linear(impl, monkeypatch, x, wt, scale, 0.2, bias)
    assert torch.isnan(y[0]).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("T", (1, 3, 40))
def test_an_inf_in_a_dropped_neuron_is_not_a_nan(T, impl, monkeypatch):
    x, g, w_up, b_up, w_down_t, coef = make_ffn(T, 37, 53, 29, "up+bias")
    coef[[5, 9]] = 0.0  # scores 0: never kept
    clean = naive_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.3, "gelu")
    w_up[9] = float("inf")
    b_up[5] = float("inf")
    y = run_ffn(impl, monkeypatch, x, g, w_up, b_up, w_down_t, coef, 0.3, "gelu")
    assert torch.isfinite(y).all()
    close(y, clean)


# ----------------------------------------------------------------------------- dispatch, grads


@needs_kernel
def test_decode_batches_take_the_kernel_and_others_the_masked_path(monkeypatch):
    def forbidden(*args):
        raise AssertionError("the masked path ran")

    monkeypatch.setattr(neuron, "_masked_input_linear", forbidden)
    monkeypatch.setattr(neuron, "_masked_neuron_ffn", forbidden)
    x, wt, scale, bias = make_linear(neuron.KERNEL_MAX_TOKENS, 37, 53)
    sparse_input_linear(x, wt, scale, 0.5, bias)
    x, g, w_up, b_up, w_down_t, coef = make_ffn(1, 37, 53, 29, "up+bias")
    neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.5, "gelu")
    with pytest.raises(AssertionError, match="masked path"):  # too many tokens
        sparse_input_linear(torch.randn(neuron.KERNEL_MAX_TOKENS + 1, 37), wt, scale, 0.5)
    with pytest.raises(AssertionError, match="masked path"):  # autograd wanted
        sparse_input_linear(torch.randn(1, 37, requires_grad=True), wt, scale, 0.5)
    with pytest.raises(AssertionError, match="masked path"):  # float64
        sparse_input_linear(torch.randn(1, 37).double(), wt.double(), scale.double(), 0.5)
    with pytest.raises(AssertionError, match="masked path"):  # a weight read in place only
        sparse_input_linear(torch.randn(1, 53), wt.T, torch.ones(53), 0.5)
    with pytest.raises(AssertionError, match="masked path"):  # a custom activation
        neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.5, torch.nn.Tanh())


def test_without_the_extension_results_are_the_same(monkeypatch):
    x, wt, scale, bias = make_linear(3, 37, 53)
    y = sparse_input_linear(x, wt, scale, 0.4, bias)
    ffn = make_ffn(3, 37, 53, 29, "up")
    z = neuron_ffn(*ffn, 0.4, "silu")
    monkeypatch.setattr(neuron, "neuron_kernels_available", lambda: False)
    close(sparse_input_linear(x, wt, scale, 0.4, bias), y)
    close(neuron_ffn(*ffn, 0.4, "silu"), z)


@pytest.mark.parametrize("up", UP)
def test_masked_path_gradients(up):
    torch.manual_seed(0)
    x, wt, scale, bias = (t.double() for t in make_linear(3, 11, 7))
    threshold = threshold_keeping(x.abs() * scale, 0.5)
    x.requires_grad_(), wt.requires_grad_(), bias.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, wt, bias: sparse_input_linear(x, wt, scale, threshold, bias), (x, wt, bias))
    ffn = [None if t is None else t.double() for t in make_ffn(3, 11, 13, 7, up)]
    x, g, w_up, b_up, w_down_t, coef = ffn
    threshold = threshold_keeping(torch.nn.functional.gelu(g).abs() * coef, 0.5)
    inputs = [t.requires_grad_() for t in (x, g, w_up, b_up, w_down_t) if t is not None]

    def f(*args):
        it = iter(args)
        ts = [next(it) if t is not None else None for t in (x, g, w_up, b_up, w_down_t)]
        return neuron_ffn(*ts, coef, threshold, "gelu")

    assert torch.autograd.gradcheck(f, tuple(inputs))


def test_float32_training_at_decode_size_has_gradients():
    x, g, w_up, b_up, w_down_t, coef = make_ffn(1, 37, 53, 29, "up+bias")
    with torch.no_grad():
        expected = neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.3, "silu")
    w_up.requires_grad_()
    g.requires_grad_()
    y = neuron_ffn(x, g * 1, w_up, b_up, w_down_t, coef, 0.3, "silu")
    close(y, expected)
    y.sum().backward()
    assert torch.isfinite(w_up.grad).all() and torch.isfinite(g.grad).all()
    kept = (torch.nn.functional.silu(g).abs() * coef > 0.3)[0]
    assert (w_up.grad[~kept] == 0).all() and (w_up.grad[kept] != 0).any()


# ----------------------------------------------------------------------------- bad input


def test_bad_input_raises_a_readable_error():
    x, wt, scale, _ = make_linear(2, 37, 53)
    with pytest.raises(InputError, match="x must be"):
        sparse_input_linear(torch.randn(2, 36), wt, scale, 0.5)
    with pytest.raises(InputError, match="scale must be"):
        sparse_input_linear(x, wt, torch.ones(36), 0.5)
    with pytest.raises(InputError, match="bias must be"):
        sparse_input_linear(x, wt, scale, 0.5, torch.ones(3))
    x, g, w_up, b_up, w_down_t, coef = make_ffn(2, 37, 53, 29, "up+bias")
    with pytest.raises(InputError, match="g must be"):
        neuron_ffn(x, g[:, :-1], w_up, b_up, w_down_t, coef, 0.5, "silu")
    with pytest.raises(InputError, match="w_up must be"):
        neuron_ffn(x, g, w_up[:, :-1], b_up, w_down_t, coef, 0.5, "silu")
    with pytest.raises(InputError, match="needs w_up"):
        neuron_ffn(x, g, None, b_up, w_down_t, coef, 0.5, "silu")
    with pytest.raises(InputError, match="unknown activation"):
        neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.5, "swiglu")


@needs_kernel
def test_the_kernels_check_their_inputs():
    x, wt, scale, _ = make_linear(2, 37, 53)
    with pytest.raises(RuntimeError, match="wt .* must be a contiguous float32"):
        torch.ops.moefy_cpu.sparse_input_linear(x, torch.randn(53, 37).T, scale, 0.5)
    with pytest.raises(RuntimeError, match="at most 64 tokens"):
        torch.ops.moefy_cpu.sparse_input_linear(torch.randn(65, 37), wt, scale, 0.5)
    with pytest.raises(RuntimeError, match="scale .* must be"):
        torch.ops.moefy_cpu.sparse_input_linear(x, wt, scale.double(), 0.5)
    x, g, w_up, b_up, w_down_t, coef = make_ffn(2, 37, 53, 29, "up+bias")
    with pytest.raises(RuntimeError, match="b_up needs w_up"):
        torch.ops.moefy_cpu.neuron_ffn(x, g, None, b_up, w_down_t, coef, 0.5, "silu")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.moefy_cpu.neuron_ffn(x, g, w_up, b_up, w_down_t, coef, 0.5, "tanh")


@needs_kernel
@pytest.mark.parametrize("shape", [(1, 37), (40, 37), (3, 7, 64)])
def test_the_prefill_mask_selects_what_the_masked_expression_selects(shape):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    scale = torch.rand(shape[-1], generator=g) * 2
    scale[0] = 0.0
    x.view(-1, shape[-1])[0, 0] = float("inf")  # a NaN score: kept
    x.view(-1, shape[-1])[-1, 1] = float("nan")  # kept, stays NaN
    t = float((x.abs() * scale).nan_to_num(0).flatten()[5])  # exactly a score: strict >
    got = torch.ops.moefy_cpu.mask_inputs.default(x, scale, t)
    want = torch.where(~(x.abs() * scale <= t), x, 0.0)
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got.nan_to_num(0, 1, -1), want.nan_to_num(0, 1, -1))


@needs_kernel
def test_prefill_batches_take_the_one_pass_mask(monkeypatch):
    calls = []
    real = torch.ops.moefy_cpu.mask_inputs.default
    monkeypatch.setattr(neuron, "_prefill_mask", lambda *a: calls.append(1) or real(*a))
    x, wt, scale, bias = make_linear(40, 37, 53)
    with torch.no_grad():
        y = neuron.sparse_input_linear(x, wt, scale, 0.3, bias)
    want = torch.where(~(x.abs() * scale <= 0.3), x, 0.0) @ wt + bias
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    assert calls == [1]
    x.requires_grad_()  # training takes the differentiable expression
    neuron.sparse_input_linear(x, wt, scale, 0.3, bias).sum().backward()
    assert calls == [1] and x.grad is not None


# ----------------------------------------------------------------------------- rows_linear


def counting(monkeypatch, name):
    calls = []
    real = getattr(neuron, name)
    monkeypatch.setattr(neuron, name, lambda *a: calls.append(a[0].shape) or real(*a))
    return calls


@needs_kernel
@pytest.mark.parametrize("T", (1, 2, 5, 16))
@pytest.mark.parametrize("N, K", ((37, 53), (64, 48), (1, 1), (9, 8)))
@pytest.mark.parametrize("bias", (False, True))
def test_rows_linear_equals_the_loop_and_runs_the_kernel(T, N, K, bias, monkeypatch):
    calls = counting(monkeypatch, "_rows_linear_op")
    torch.manual_seed(T * N + K)
    w, x = torch.randn(N, K), torch.randn(T, K)
    b = torch.randn(N) if bias else None
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    got = neuron.rows_linear(x, w, b)
    assert calls == [(T, K)]  # the C++ kernel, not F.linear
    assert got.dtype == torch.float32 and got.shape == (T, N)
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)


@needs_kernel
def test_rows_linear_leading_dimensions_nan_and_inf(monkeypatch):
    calls = counting(monkeypatch, "_rows_linear_op")
    w, x = torch.randn(20, 12), torch.randn(2, 1, 12)
    torch.testing.assert_close(neuron.rows_linear(x, w), x @ w.T, atol=1e-5, rtol=1e-5)
    x[0, 0, 3] = float("nan")
    x[1, 0, 4] = float("inf")
    got, want = neuron.rows_linear(x, w), torch.nn.functional.linear(x, w)
    assert len(calls) == 2
    assert torch.equal(got.isnan(), want.isnan()) and torch.equal(got.isinf(), want.isinf())


@pytest.mark.parametrize("case", ("many tokens", "grad", "bfloat16", "strided weight"))
def test_rows_linear_falls_back_to_f_linear(case, monkeypatch):
    calls = counting(monkeypatch, "_rows_linear_op") if neuron_kernels_available() else []
    w, x = torch.randn(24, 16), torch.randn(1, 16)
    if case == "many tokens":
        x = torch.randn(neuron.KERNEL_MAX_TOKENS + 1, 16)
    elif case == "grad":
        w.requires_grad_(True)
    elif case == "bfloat16":
        w, x = w.bfloat16(), x.bfloat16()
    else:
        w = torch.randn(16, 24).T
    y = neuron.rows_linear(x, w)
    assert torch.equal(y, torch.nn.functional.linear(x, w))
    assert not calls
    if case == "grad":
        y.sum().backward()
        torch.testing.assert_close(w.grad, x.expand(24, 16))


@needs_kernel
def test_rows_linear_checks_its_inputs():
    op = torch.ops.moefy_cpu.rows_linear.default
    with pytest.raises(RuntimeError, match="w \\(N, K\\)"):
        op(torch.randn(1, 8), torch.randn(4, 7))
    with pytest.raises(RuntimeError, match="at most 64 tokens"):
        op(torch.randn(65, 8), torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="float32"):
        op(torch.randn(1, 8).double(), torch.randn(4, 8).double())


# ----------------------------------------------------------------------------- input_sparse_ffn


def naive_input_sparse_ffn(x, w_in_t, in_scale, t_in, b_in, w_out_t, h_scale, t_h,
                           activation, gated):
    """The definition, step by step: the input selection (the loop above), act(gate) · up in
    float32, the neuron selection (the loop above)."""
    g = naive_sparse_input_linear(x, w_in_t, in_scale, t_in, b_in).float()
    act = get_activation(activation).fn
    h = act(g[..., :g.shape[-1] // 2]) * g[..., g.shape[-1] // 2:] if gated else act(g)
    return naive_sparse_input_linear(h, w_out_t, h_scale, t_h)


def make_input_ffn(T, H, I, O, gated, bias, seed=0):
    gen = torch.Generator().manual_seed(seed)
    G = 2 * I if gated else I
    x = torch.randn(T, H, generator=gen)
    w_in_t = torch.randn(H, G, generator=gen) / H**0.5
    b_in = torch.randn(G, generator=gen) if bias else None
    w_out_t = torch.randn(I, O, generator=gen) / I**0.5
    in_scale, h_scale = torch.rand(H, generator=gen) + 0.5, torch.rand(I, generator=gen) + 0.5
    return x, w_in_t, in_scale, b_in, w_out_t, h_scale


@pytest.mark.parametrize("impl", ("public", "masked"))
@pytest.mark.parametrize("keep_in, keep_h", ((1.0, 1.0), (0.5, 0.5), (1.0, 0.3), (0.0, 0.5),
                                             (0.6, 0.0)))
@pytest.mark.parametrize("gated, bias", ((True, False), (False, True), (True, True)))
@pytest.mark.parametrize("T", (1, 3, 16, 40))
def test_input_sparse_ffn_equals_its_definition(T, gated, bias, keep_in, keep_h, impl,
                                                monkeypatch):
    H, I, O = 37, 53, 29
    x, w_in_t, in_scale, b_in, w_out_t, h_scale = make_input_ffn(T, H, I, O, gated, bias, T)
    t_in = threshold_keeping(x.abs() * in_scale, keep_in)
    g = naive_sparse_input_linear(x, w_in_t, in_scale, t_in, b_in).float()
    h = F_silu(g, gated)
    t_h = threshold_keeping(h.abs() * h_scale, keep_h)
    want = naive_input_sparse_ffn(x, w_in_t, in_scale, t_in, b_in, w_out_t, h_scale, t_h,
                                  "silu", gated)
    calls = counting(monkeypatch, "_input_sparse_ffn_op") if neuron_kernels_available() else []
    if impl == "masked":
        monkeypatch.setattr(neuron, "neuron_kernels_available", lambda: False)
    got = neuron.input_sparse_ffn(x, w_in_t, in_scale, t_in, b_in, w_out_t, h_scale, t_h,
                                  "silu", gated)
    close(got, want)
    assert len(calls) == (impl == "public" and T <= neuron.KERNEL_MAX_TOKENS
                          and neuron_kernels_available())


def F_silu(g, gated):
    a = torch.nn.functional.silu
    return a(g[..., :g.shape[-1] // 2]) * g[..., g.shape[-1] // 2:] if gated else a(g)


@needs_kernel
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_input_sparse_ffn_every_activation(activation):
    x, w_in_t, in_scale, b_in, w_out_t, h_scale = make_input_ffn(4, 24, 40, 24, True, True)
    x = x * 3  # reach every piece of the piecewise activations
    args = (x, w_in_t, in_scale, 0.3, b_in, w_out_t, h_scale, 0.05, activation, True)
    want = naive_input_sparse_ffn(*args)  # outputs up to ~100 here: float32's error grows
    torch.testing.assert_close(torch.ops.moefy_cpu.input_sparse_ffn(*args).double(), want,
                               rtol=1e-4, atol=1e-3)


@needs_kernel
def test_input_sparse_ffn_a_nan_or_inf_input_stays_visible_as_in_the_masked_path(monkeypatch):
    x, w_in_t, in_scale, b_in, w_out_t, h_scale = make_input_ffn(3, 24, 40, 24, True, False)
    x[0, 5] = float("nan")
    x[1, 7] = float("inf")
    in_scale[7] = 0.0  # inf · 0 = NaN: a NaN score keeps the channel
    x[2, 9] = float("-inf")
    args = (x, w_in_t, in_scale, 0.5, None, w_out_t, h_scale, 0.1, "silu", True)
    got = neuron.input_sparse_ffn(*args)
    monkeypatch.setattr(neuron, "neuron_kernels_available", lambda: False)
    masked = neuron.input_sparse_ffn(*args)
    for row in range(3):
        assert not got[row].isfinite().all()  # never silently dropped
    assert torch.equal(got.isnan(), masked.isnan()) and torch.equal(got.isinf(), masked.isinf())


def test_input_sparse_ffn_refuses_mismatched_shapes():
    x, w_in_t, in_scale, b_in, w_out_t, h_scale = make_input_ffn(2, 24, 40, 24, True, False)
    with pytest.raises(InputError, match="w_in_t has 80 columns.*needs 40"):
        neuron.input_sparse_ffn(x, w_in_t, in_scale, 0.1, None, w_out_t, h_scale, 0.1,
                                "silu", False)
    with pytest.raises(InputError, match="scale must be"):
        neuron.input_sparse_ffn(x, w_in_t, in_scale, 0.1, None, w_out_t, h_scale[:3], 0.1,
                                "silu", True)
    with pytest.raises(InputError, match="x must be"):
        neuron.input_sparse_ffn(x[:, :5], w_in_t, in_scale, 0.1, None, w_out_t, h_scale, 0.1,
                                "silu", True)


def test_rows_linear_zero_features_and_autocast_take_f_linear(monkeypatch):
    calls = counting(monkeypatch, "_rows_linear_op") if neuron_kernels_available() else []
    for x in (torch.randn(2, 3, 0), torch.randn(100, 0)):
        w = torch.randn(5, 0)
        assert torch.equal(neuron.rows_linear(x, w), torch.zeros(*x.shape[:-1], 5))
    w, x = torch.randn(6, 4), torch.randn(1, 4)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = neuron.rows_linear(x, w)
        assert y.dtype == torch.nn.functional.linear(x, w).dtype == torch.bfloat16
    assert not calls


def test_sparse_input_linear_zero_features_gives_zeros():
    x, wt = torch.randn(100, 0), torch.randn(0, 7)
    y = sparse_input_linear(x, wt, torch.ones(0), 0.5, torch.ones(7))
    assert torch.equal(y, torch.ones(100, 7))


class _FakeTriton:
    pass


@pytest.mark.parametrize("case, applies", (
    ("decode", True), ("bf16 scales (a layer cast with .to)", True), ("17 tokens", False),
    ("grad", False), ("weight of another dtype", False), ("strided weight", False),
    ("tensor threshold", False), ("float64", False), ("autocast", False),
))
def test_which_cuda_calls_take_the_triton_kernels(case, applies, monkeypatch):
    """The choice made for CUDA tensors, checked on CPU tensors (the device test is the
    caller's: it asks only for x.is_cuda)."""
    monkeypatch.setattr(neuron, "_triton", lambda: _FakeTriton)
    dtype = torch.float64 if case == "float64" else torch.bfloat16
    x, wt = torch.randn(1, 8, dtype=dtype), torch.randn(8, 6, dtype=dtype)
    scale, threshold = torch.ones(8), 0.5
    if case == "bf16 scales (a layer cast with .to)":
        scale = scale.bfloat16()
    elif case == "17 tokens":
        x = torch.randn(17, 8, dtype=dtype)
    elif case == "grad":
        wt.requires_grad_(True)
    elif case == "weight of another dtype":
        wt = wt.float()
    elif case == "strided weight":
        wt = torch.randn(6, 8, dtype=dtype).T
    elif case == "tensor threshold":
        threshold = torch.tensor(0.5)
    tokens = x.shape[:-1].numel()
    if case == "autocast":  # CUDA autocast cannot be entered without CUDA: as if inside it
        real = torch.is_autocast_enabled
        monkeypatch.setattr(torch, "is_autocast_enabled",
                            lambda device="cuda": device == "cuda" or real(device))
    got = neuron._cuda_kernel_applies(x, tokens, (wt,), (scale,), threshold)
    assert got is applies


def test_a_failing_triton_launch_warns_once_and_falls_back(monkeypatch):
    def broken(*args):
        raise RuntimeError("no compiler for the launcher\nsecond line")

    monkeypatch.setattr(neuron, "_TRITON_FAILED", False)
    with pytest.warns(RuntimeWarning, match="failed to launch.*no compiler"):
        assert neuron._on_cuda(broken, 1) is None
    assert neuron._TRITON_FAILED
    x = torch.randn(1, 8, dtype=torch.bfloat16)
    assert not neuron._cuda_kernel_applies(x, 1, (x,), (torch.ones(8),), 0.5)
