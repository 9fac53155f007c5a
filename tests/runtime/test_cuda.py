"""CUDA paths (skipped without a GPU; run with `pytest -m gpu`, or `make gpu-check`).

The same invariants as on CPU: the dispatch equals the naive oracle (values and gradients),
``torch.compile`` and ONNX export keep the function, threads do not disturb each other, and a
non-finite token does not spread to other tokens.
"""

import copy
import threading

import pytest
import torch

import moefy
from moefy.errors import ExportError
from moefy.runtime import expert_ffn, reference_ffn
from moefy.runtime.dispatch import grouped_ffn
from moefy.runtime.experts import ExpertWeights
from tests.runtime.helpers import make_experts, make_routing

pytestmark = pytest.mark.gpu

DTYPES = (torch.float32, torch.bfloat16)
TOKENS = (0, 1, 7, 2048)
TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def on_cuda(ew: ExpertWeights, requires_grad: bool = False) -> ExpertWeights:
    return ExpertWeights(*(
        t.cuda().requires_grad_(requires_grad) if isinstance(t, torch.Tensor) else t
        for t in ew))


def close(actual, expected, dtype, what=""):
    # relative to the largest magnitude: bf16 rounds every product anew
    assert actual.shape == expected.shape, what
    if expected.numel() == 0:
        return
    scale = expected.detach().abs().max().float().clamp_min(1.0)
    torch.testing.assert_close(actual.float() / scale, expected.float() / scale,
                               rtol=TOL[dtype], atol=TOL[dtype], msg=what)


def cuda_moe(dtype=torch.float32, **kwargs):
    torch.manual_seed(0)
    args = dict(gated=True, activation="silu") | kwargs
    return moefy.MoE(64, 32, 8, 2, **args).cuda().to(dtype).eval()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", (False, True))
@pytest.mark.parametrize("T", TOKENS)
def test_cuda_dispatch_matches_oracle(T, gated, dtype):
    ew = on_cuda(make_experts(8, 64, 48, gated=gated, dtype=dtype))
    x = torch.randn(T, 64, device="cuda", dtype=dtype)
    w, i = make_routing(T, 8, 2, dtype=dtype)
    w, i = w.cuda(), i.cuda()
    expected = reference_ffn(x, w, i, ew)
    close(grouped_ffn(x, w, i, ew), expected, dtype, "grouped_ffn")
    close(expert_ffn(x, w, i, *ew[:6], ew.activation), expected, dtype, "expert_ffn op")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output_size", (24, 3))  # grouped_mm's aligned widths, and not
def test_cuda_other_output_width_matches_oracle(output_size, dtype):
    ew = on_cuda(make_experts(8, 64, 48, gated=True, dtype=dtype, output_size=output_size))
    x = torch.randn(300, 64, device="cuda", dtype=dtype)
    w, i = (t.cuda() for t in make_routing(300, 8, 2, dtype=dtype))
    expected = reference_ffn(x, w, i, ew)
    assert expected.shape == (300, output_size)
    close(grouped_ffn(x, w, i, ew), expected, dtype, "grouped_ffn")
    close(expert_ffn(x, w, i, *ew[:6], ew.activation), expected, dtype, "expert_ffn op")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("gated", (False, True))
def test_cuda_gradients_match_autograd_of_the_oracle(gated, dtype):
    T = 96
    base = make_experts(8, 64, 48, gated=gated, dtype=dtype)
    w0, i = make_routing(T, 8, 2, dtype=dtype)
    x0 = torch.randn(T, 64, dtype=dtype)
    g = torch.randn(T, 64, dtype=dtype, device="cuda")
    grads = []
    for fn in (lambda x, w, ew: expert_ffn(x, w, i.cuda(), *ew[:6], ew.activation),
               lambda x, w, ew: reference_ffn(x, w, i.cuda(), ew)):
        ew = on_cuda(base, requires_grad=True)
        x = x0.cuda().requires_grad_(True)
        w = w0.cuda().requires_grad_(True)
        (fn(x, w, ew).float() * g.float()).sum().backward()
        grads.append([x.grad, w.grad] + [t.grad for t in ew[:6] if t is not None])
    names = ["x", "weights", "w_in", "w_out", "w_gate", "b_in", "b_gate", "b_out"]
    names = [n for n, t in zip(names, [1, 1, *base[:6]], strict=True) if t is not None]
    for name, got, want in zip(names, *grads, strict=True):
        close(got, want, dtype, f"d {name}")


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_moe_layer_matches_its_experts_and_trains(dtype):
    moe = cuda_moe(dtype)
    x = torch.randn(4, 33, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        weights, indices = moe.route(x)
        expected = reference_ffn(x.reshape(-1, 64), weights, indices, moe.expert_weights())
        close(moe(x).reshape(-1, 64), expected, dtype, "eval forward")
    moe.train()
    x.requires_grad_(True)
    moe(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert moe.w_in.grad is not None and torch.isfinite(moe.w_in.grad).all()


def test_cuda_torch_compile_of_a_moe_matches_eager():
    moe = cuda_moe(torch.bfloat16)
    compiled = torch.compile(moe)
    for T in (8, 300):  # two sizes: the compiled graph has a dynamic token count
        x = torch.randn(T, 64, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            close(compiled(x), moe(x), torch.bfloat16, f"compiled, {T} tokens")
    moe.train()
    x = torch.randn(64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    compiled(x).float().square().mean().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_cuda_model_exports_to_onnx_after_moving_to_cpu(tmp_path):
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 32)).eval()
    cfg = moefy.MoEConfig(method="split", num_experts=4, top_k=2)
    model = moefy.convert(dense, cfg, example_inputs=(torch.randn(8, 32),)).cuda()
    x = torch.randn(16, 32)
    with torch.no_grad():
        on_gpu = model(x.cuda()).cpu()  # it ran on CUDA: any cached state is CUDA state
    cpu_model = copy.deepcopy(model).cpu()
    out = moefy.export_onnx(cpu_model, tmp_path / "m.onnx", (x,))
    assert out.max_diff[0] < 1e-4
    with torch.no_grad():
        torch.testing.assert_close(cpu_model(x), on_gpu, rtol=1e-4, atol=1e-4)


def test_cuda_model_exported_directly_is_validated_or_a_typed_error(tmp_path):
    moe = cuda_moe()
    try:
        out = moefy.export_onnx(moe, tmp_path / "m.onnx", (torch.randn(16, 64, device="cuda"),))
    except ExportError as exc:  # refused with a message that says what to do: acceptable
        assert "cpu" in str(exc).lower() or "cuda" in str(exc).lower(), exc
        assert not (tmp_path / "m.onnx").exists()
    else:
        assert out.max_diff[0] < 1e-3


def test_cuda_moe_from_several_threads_gives_each_its_own_result():
    moe = cuda_moe(torch.bfloat16)
    inputs = [torch.randn(int(n), 64, device="cuda", dtype=torch.bfloat16)
              for n in torch.randint(1, 600, (16,))]
    with torch.no_grad():
        expected = [moe(x) for x in inputs]
    results: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def work(j):
        try:
            with torch.no_grad():
                for _ in range(5):
                    results[j] = moe(inputs[j])
            torch.cuda.synchronize()
        except BaseException as exc:  # re-raised in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(j,)) for j in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    for j, want in enumerate(expected):
        close(results[j], want, torch.bfloat16, f"thread {j}")  # atomics: not bit-exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_a_non_finite_token_does_not_spread(dtype):
    moe = cuda_moe(dtype)
    x = torch.randn(40, 64, device="cuda", dtype=dtype)
    with torch.no_grad():
        clean = moe(x)
        for bad in (float("nan"), float("inf")):
            poisoned = x.clone()
            poisoned[7, 3] = bad
            y = moe(poisoned)
            others = torch.arange(40, device="cuda") != 7
            assert torch.isfinite(y[others]).all(), bad
            close(y[others], clean[others], dtype, f"other tokens with {bad}")


def test_cuda_moe_built_under_inference_mode_runs():
    with torch.inference_mode():
        moe = cuda_moe(torch.bfloat16)
        x = torch.randn(300, 64, device="cuda", dtype=torch.bfloat16)
        y = moe(x)
    with torch.no_grad():
        close(y, moe(x), torch.bfloat16, "inference-mode weights under no_grad")


def test_cuda_model_converts_with_every_partition():
    """Split partitions run their assignment on the CPU; the weights stay on the GPU."""
    torch.manual_seed(0)
    dense = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.GELU(),
                                torch.nn.Linear(128, 32)).cuda().eval()
    x = torch.randn(4, 32, device="cuda")
    data = [(torch.randn(64, 32, device="cuda"),) for _ in range(2)]
    for partition in ("contiguous", "random", "kmeans", "coactivation"):
        moe_model = moefy.convert(
            dense, moefy.MoEConfig(num_experts=4, top_k=4, partition=partition),
            example_inputs=(x,), calibration_data=data)
        assert moe_model[0].w_in.is_cuda, partition
        with torch.no_grad():
            close(moe_model(x), dense(x), torch.float32, partition)
