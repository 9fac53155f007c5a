"""moefy/runtime/neuron_triton.py: the CUDA decode kernels (Triton) against the definitions
(the naive loops of test_neuron.py). Without a GPU they run under Triton's interpreter on CPU
tensors (tests/runtime/triton_cases.py, in a fresh process: the interpreter must be switched
on before triton is first imported); with one, the gpu-marked test runs them compiled,
through the public functions that choose them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moefy.runtime import neuron
from tests.runtime.test_neuron import (
    make_ffn,
    make_linear,
    naive_neuron_ffn,
    naive_sparse_input_linear,
    threshold_keeping,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(),
                    reason="with CUDA the gpu test runs the compiled kernels")
def test_the_kernels_under_triton_s_interpreter_equal_the_definitions():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider",
         str(ROOT / "tests" / "runtime" / "triton_cases.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "skipped" not in done.stdout.splitlines()[-1]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_cuda_decode_takes_the_triton_kernels_and_matches_the_cpu(dtype, monkeypatch):
    calls, kernels = [], neuron._triton()
    for name in ("sparse_input_linear", "neuron_ffn"):
        real = getattr(kernels, name)
        monkeypatch.setattr(kernels, name, lambda *a, real=real: calls.append(1) or real(*a))
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
