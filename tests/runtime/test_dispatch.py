"""Every dispatch implementation equals the naive per-token oracle."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moefy.runtime.dispatch import (
    KERNEL_MAX_TOKENS,
    PackedExperts,
    _padded_rows,
    decode_ffn,
    grouped_ffn,
    masked_dense_ffn,
    plan_dispatch,
)
from moefy.runtime.kernels import decode_kernels_available
from moefy.runtime.reference import reference_ffn
from tests.runtime.helpers import make_experts, make_routing

TOKENS = (0, 1, 7, 2048)
EXPERTS = (1, 4, 64)
TOP_K = ("1", "2", "E")
GATED = (False, True)


def packed_dispatch(x, w, i, ew):
    packed = PackedExperts(ew)
    packed.small_batch_tokens = 0  # exercise the sorted path even for tiny batches
    return packed(x, w, i)


def packed_default(x, w, i, ew):
    return PackedExperts(ew)(x, w, i)


def packed_all_tokens(x, w, i, ew):
    packed = PackedExperts(ew)
    packed.small_batch_tokens = 1 << 30  # the oneDNN decode loop at every size
    return packed(x, w, i)


def decode_kernel(x, w, i, ew):
    assert decode_kernels_available()  # loads the library (this module may run alone)
    # the C++ kernel takes at most KERNEL_MAX_TOKENS tokens per call
    rows = [decode_ffn(x[s : s + KERNEL_MAX_TOKENS], w[s : s + KERNEL_MAX_TOKENS],
                       i[s : s + KERNEL_MAX_TOKENS], ew)
            for s in range(0, x.shape[0], KERNEL_MAX_TOKENS)]
    return torch.cat(rows) if rows else x.new_zeros(x.shape[0], ew.output_size)


def custom_op(x, w, i, ew):
    return torch.ops.moefy.expert_ffn(x, w, i, *ew[:6], ew.activation)


IMPLS = {
    "grouped_ffn": grouped_ffn,
    "masked_dense": masked_dense_ffn,
    "packed": packed_dispatch,
    "packed_default": packed_default,
    "packed_all_tokens": packed_all_tokens,
    "decode_kernel": decode_kernel,
    "custom_op": custom_op,
}


def assert_all_match(x, w, i, ew, rtol=1e-4, atol=1e-5):
    ref = reference_ffn(x, w, i, ew)
    for name, impl in IMPLS.items():
        got = impl(x, w, i, ew)
        assert got.shape == (x.shape[0], ew.output_size), name
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol,
                                   msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("k", TOP_K)
@pytest.mark.parametrize("E", EXPERTS)
@pytest.mark.parametrize("T", TOKENS)
def test_dispatch_matches_oracle(T, E, k, gated):
    k = E if k == "E" else min(int(k), E)
    H, I = 32, 24
    ew = make_experts(E, H, I, gated=gated)
    x = torch.randn(T, H)
    w, i = make_routing(T, E, k)
    assert_all_match(x, w, i, ew)


@pytest.mark.parametrize("bias", (False, True))
@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("T", TOKENS)
def test_other_output_width_matches_oracle(T, gated, bias):
    # experts H → I → O with O != H (a classifier head's block): every path writes (T, O)
    for H, O in ((16, 3), (16, 40)):
        ew = make_experts(4, H, 24, gated=gated, bias=bias, output_size=O)
        x = torch.randn(T, H)
        w, i = make_routing(T, 4, 2)
        assert_all_match(x, w, i, ew)


@pytest.mark.parametrize("activation",
                         ("relu", "gelu", "gelu_tanh", "silu", "squared_relu", "quick_gelu"))
@pytest.mark.parametrize("gated", GATED)
def test_every_activation(activation, gated):
    ew = make_experts(8, 48, 40, gated=gated, activation=activation)
    x = torch.randn(300, 48)
    w, i = make_routing(300, 8, 2)
    assert_all_match(x, w, i, ew)


@pytest.mark.parametrize("bias", (False, True))
def test_all_tokens_on_one_expert_and_empty_experts(bias):
    E, T = 16, 500
    ew = make_experts(E, 64, 32, bias=bias)
    x = torch.randn(T, 64)
    i = torch.full((T, 1), 5)
    w = torch.rand(T, 1)
    assert_all_match(x, w, i, ew)
    # two experts used, fourteen empty
    i2 = torch.stack([torch.full((T,), 3), torch.full((T,), 11)], dim=1)
    assert_all_match(x, torch.rand(T, 2), i2, ew)


def test_duplicate_experts_in_a_row_add_up():
    ew = make_experts(4, 16, 8)
    x = torch.randn(50, 16)
    i = torch.randint(0, 4, (50, 3))  # repeats allowed
    assert_all_match(x, torch.rand(50, 3), i, ew)


def test_large_shapes_use_bucketed_rows():
    # Row counts not multiple of 16 exercise the padded layout at realistic widths.
    ew = make_experts(8, 256, 96, gated=True, bias=False, activation="silu")
    x = torch.randn(1000, 256)
    w, i = make_routing(1000, 8, 2)
    assert_all_match(x, w, i, ew, rtol=1e-4, atol=2e-5)


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("T", (1, 7, 300))
def test_bfloat16_within_dtype_tolerance(T, gated):
    ew = make_experts(8, 64, 32, gated=gated, dtype=torch.bfloat16)
    x = torch.randn(T, 64).bfloat16()
    w, i = make_routing(T, 8, 2, dtype=torch.bfloat16)
    ref = reference_ffn(x, w, i, ew)
    for impl in (grouped_ffn, custom_op):
        torch.testing.assert_close(impl(x, w, i, ew), ref, rtol=2e-2, atol=2e-2)


def test_plan_sorts_pairs_by_expert_stably():
    i = torch.tensor([[2, 0], [0, 1], [2, 1]])
    plan = plan_dispatch(i, 4)
    assert plan.experts.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.slots.tolist() == [1, 2, 3, 5, 0, 4]
    assert plan.tokens.tolist() == [0, 1, 1, 2, 0, 2]
    assert plan.counts.tolist() == [2, 2, 2, 0]


@pytest.mark.parametrize("count", range(0, 5000, 37))
def test_padded_rows_bounds(count):
    rows = _padded_rows(count)
    assert rows >= count and rows - count < max(16, count // 16 + 1)


def test_packed_weights_are_a_snapshot():
    ew = make_experts(4, 16, 8)
    packed = PackedExperts(ew)
    key = packed.key
    with torch.no_grad():
        ew.w_in.add_(1.0)
    from moefy.runtime.dispatch import weights_key
    assert weights_key(ew) != key, "an in-place update must change the key"


@settings(max_examples=40, deadline=None)
@given(
    T=st.integers(0, 40), E=st.integers(1, 9), k=st.integers(1, 9), H=st.integers(1, 24),
    I=st.integers(1, 24), O=st.none() | st.integers(1, 24), gated=st.booleans(),
    bias=st.booleans(), activation=st.sampled_from(("relu", "gelu", "silu", "squared_relu")),
    seed=st.integers(0, 2**16),
)
def test_property_random_shapes(T, E, k, H, I, O, gated, bias, activation, seed):
    torch.manual_seed(seed)
    ew = make_experts(E, H, I, gated=gated, bias=bias, activation=activation, output_size=O)
    x = torch.randn(T, H)
    i = torch.randint(0, E, (T, k))
    w = torch.rand(T, k)
    assert_all_match(x, w, i, ew)


def test_decode_kernels_build_here():
    # CI has a compiler: the fast decode path must really be in use, not the fallback.
    from moefy.runtime.kernels import decode_kernels_available
    assert decode_kernels_available()


@pytest.mark.parametrize("gated", GATED)
@pytest.mark.parametrize("T", (1, 5, 16, 64))
def test_decode_kernel_odd_sizes(T, gated):
    # Odd widths exercise the vector loops' remainders; repeated experts per token add up.
    from moefy.runtime.kernels import decode_kernels_available
    assert decode_kernels_available()
    ew = make_experts(6, 53, 37, gated=gated)
    x = torch.randn(T, 53)
    i = torch.randint(0, 6, (T, 3))
    w = torch.rand(T, 3)
    got = torch.ops.moefy_cpu.decode_ffn(x, w, i, ew.w_in, ew.w_gate, ew.b_in, ew.b_gate,
                                         ew.w_out, ew.b_out, ew.activation)
    torch.testing.assert_close(got, reference_ffn(x, w, i, ew), rtol=1e-4, atol=1e-5)


def test_decode_kernel_rejects_bad_input():
    ew = make_experts(4, 8, 6)
    x = torch.randn(3, 8)
    w, i = make_routing(3, 4, 2)
    args = (ew.w_in, ew.w_gate, ew.b_in, ew.b_gate, ew.w_out, ew.b_out)
    with pytest.raises(RuntimeError, match="out of range"):
        torch.ops.moefy_cpu.decode_ffn(x, w, i + 4, *args, "gelu")
    with pytest.raises(RuntimeError, match="at most 64 tokens"):
        torch.ops.moefy_cpu.decode_ffn(torch.randn(65, 8), *make_routing(65, 4, 2), *args, "gelu")
    with pytest.raises(RuntimeError, match="unknown activation"):
        torch.ops.moefy_cpu.decode_ffn(x, w, i, *args, "tanh")


def test_layers_share_one_gather_workspace_per_thread():
    """The grow-only gather buffer is one per thread for all layers, not one per layer (a
    model's every layer once held a buffer of its largest batch: 15-20 GB for SmolLM2 at
    E64 top-32); another thread gets its own, and results stay the reference's."""
    import threading

    from moefy.layers.moe import MoE
    from moefy.runtime import dispatch

    torch.manual_seed(0)
    layers = [MoE(32, 64, num_experts=8, top_k=4).eval() for _ in range(3)]
    x = torch.randn(dispatch.SMALL_BATCH_TOKENS + 200, 32)
    with torch.no_grad():
        for m in layers:  # grows to the largest layer's need
            m(x)
        buf = dispatch._WORKSPACE.xs
        outs = [m(x) for m in layers]
        assert dispatch._WORKSPACE.xs is buf  # then every layer reuses it
    seen = {}

    def other():
        with torch.no_grad():
            seen["out"] = layers[1](x)
        seen["buf"] = dispatch._WORKSPACE.xs

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert seen["buf"] is not buf
    torch.testing.assert_close(seen["out"], outs[1])
    for m, out in zip(layers, outs, strict=True):
        w, i = m.route(x)
        ref = reference_ffn(x, w, i, m.expert_weights())
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
