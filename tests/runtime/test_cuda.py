"""CUDA paths (skipped without a GPU; run with `pytest -m gpu`)."""

import pytest
import torch

import moefy
from moefy.runtime.dispatch import grouped_ffn
from moefy.runtime.reference import reference_ffn
from tests.runtime.helpers import make_experts, make_routing

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("gated", (False, True))
@pytest.mark.parametrize("T", (0, 1, 7, 2048))
def test_cuda_dispatch_matches_oracle(T, gated, dtype):
    ew = make_experts(8, 64, 48, gated=gated, dtype=dtype)
    ew = type(ew)(*(t.cuda() if isinstance(t, torch.Tensor) else t for t in ew))
    x = torch.randn(T, 64, device="cuda", dtype=dtype)
    w, i = make_routing(T, 8, 2, dtype=dtype)
    w, i = w.cuda(), i.cuda()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(grouped_ffn(x, w, i, ew), reference_ffn(x, w, i, ew),
                               rtol=tol, atol=tol)


def test_cuda_moe_forward_backward():
    moe = moefy.MoE(64, 32, 8, 2, gated=True, activation="silu").cuda().bfloat16()
    x = torch.randn(4, 33, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    moe(x).float().square().mean().backward()
    assert x.grad is not None and moe.w_in.grad is not None
