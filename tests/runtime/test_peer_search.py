"""moefy/runtime/peer_search.py: PEER's retrieval. Its GEMMs equal F.linear, forward and
backward; the product-key search, C++ or torch, is the exact top-k over every key, and its
sparse backward equals the dense one."""

import pytest
import torch
import torch.nn.functional as F

from moefy.runtime import peer_search as peer
from moefy.runtime.kernels import search_kernel_available

# (tokens, heads, n1, n2, d/2, k): k above one half's size, one token, k = 1, no tokens
SEARCHES = ((37, 3, 6, 9, 8, 4), (5, 2, 3, 7, 4, 6), (1, 1, 16, 16, 8, 1), (0, 2, 4, 4, 4, 3))


@pytest.mark.parametrize("rows,bias", ((1, False), (7, True), (300, True)))
def test_retrieval_gemms_equal_f_linear_forward_and_backward(rows, bias):
    x, w = torch.randn(rows, 24), torch.randn(10, 24)
    b = torch.randn(10) if bias else None
    torch.testing.assert_close(peer.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    query = torch.nn.Linear(24, 10, bias=bias)
    leaves = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    got = peer.query_linear(leaves[0], query)
    want = F.linear(leaves[1], query.weight, query.bias)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g = torch.randn(want.shape)
    for a, b_ in zip(torch.autograd.grad(got, [leaves[0], *query.parameters()], g),
                     torch.autograd.grad(want, [leaves[1], *query.parameters()], g),
                     strict=True):
        torch.testing.assert_close(a, b_, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", ("kernel", "torch"))
@pytest.mark.parametrize("t,heads,n1,n2,half,k", SEARCHES)
def test_product_key_search_is_the_exact_top_k_with_the_dense_gradient(
        impl, t, heads, n1, n2, half, k, monkeypatch):
    if impl == "kernel" and not search_kernel_available():
        pytest.skip("C++ kernels unavailable (MOEFY_NO_EXT=1 or no compiler)")
    if impl == "torch":
        monkeypatch.setattr(peer, "search_kernel_available", lambda: False)
    monkeypatch.setattr(peer, "_SEARCH_BYTES", heads * max(n1, n2) * 4 * 3)  # 3-token blocks
    g = torch.Generator().manual_seed(t + k)
    q = torch.randn(t, heads, 2 * half, generator=g).requires_grad_()
    keys_a = torch.randn(n1, half, generator=g).requires_grad_()
    keys_b = torch.randn(n2, half, generator=g).requires_grad_()
    scores, ids = peer.product_key_search(q, keys_a, keys_b, k)  # (T, heads, k) each
    every = (q[..., :half] @ keys_a.t()).unsqueeze(-1) + (q[..., half:] @ keys_b.t()
                                                          ).unsqueeze(-2)
    every = every.flatten(-2)  # (T, heads, n1·n2): expert a·n2 + b, the oracle
    want = every.topk(k, dim=-1)
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(scores, want.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(peer.product_key_topk(*peer.subkey_scores(q, keys_a, keys_b), k)[1], ids)
    if t:
        grad = torch.randn(scores.shape, generator=g)
        got = torch.autograd.grad(scores, (q, keys_a, keys_b), grad)
        dense = torch.autograd.grad(every.gather(-1, ids), (q, keys_a, keys_b), grad)
        for a, b in zip(got, dense, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
