"""moefy.MoE: the contract, shapes, training, caching of prepacked weights, errors."""

import copy
import io

import pytest
import torch

import moefy
from moefy.runtime.reference import reference_ffn

CONFIGS = (
    dict(activation="gelu", gated=False, bias=True, shared_expert_size=0, combine="softmax"),
    dict(activation="silu", gated=True, bias=False, shared_expert_size=0, combine="softmax"),
    dict(activation="relu", gated=False, bias=True, shared_expert_size=24, combine="sum"),
    dict(activation="squared_relu", gated=True, bias=True, shared_expert_size=8, combine="sum"),
)


def contract_output(moe, x):
    """sum_j w[t, j] * expert(i[t, j])(x[t]) + shared(x[t]), token by token."""
    x2 = x.reshape(-1, moe.hidden_size)
    w, i = moe.route(x2)
    rows = []
    for t in range(x2.shape[0]):
        y = moe.shared(x2[t])
        for j in range(moe.top_k):
            y = y + w[t, j] * moe.expert(int(i[t, j]))(x2[t])
        rows.append(y)
    return torch.stack(rows).reshape(*x.shape[:-1], moe.output_size)


@pytest.mark.parametrize("cfg", CONFIGS)
@pytest.mark.parametrize("grad", (False, True))
def test_contract(cfg, grad):
    moe = moefy.MoE(32, 16, num_experts=8, top_k=3, **cfg)
    x = torch.randn(4, 25, 32)
    with torch.set_grad_enabled(grad):
        y = moe(x)
        ref = contract_output(moe, x)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("shape", ((0, 32), (3, 0, 32), (1, 32), (32,), (2, 3, 4, 32)))
def test_any_leading_shape(shape):
    moe = moefy.MoE(32, 16, num_experts=4, top_k=2)
    x = torch.randn(shape)
    with torch.no_grad():
        y = moe(x)
    assert y.shape == x.shape
    y2 = moe(x)  # grad path
    torch.testing.assert_close(y, y2.detach())


# output_size != hidden_size, through every path the runtime picks: (training, gradients,
# tokens, prepack, activation) → masked_dense_ffn; expert_ffn op; C++ decode kernel (≤ 16
# tokens); PackedExperts; expert_ffn op without prepacking; grouped_ffn (custom activation)
OTHER_WIDTH_PATHS = (
    (True, True, 40, True, "gelu"),
    (False, True, 40, True, "gelu"),
    (False, False, 5, True, "gelu"),
    (False, False, 100, True, "gelu"),
    (False, False, 100, False, "gelu"),
    (False, False, 40, True, torch.nn.Tanh()),
)


@pytest.mark.parametrize("training,grad,tokens,prepack,activation", OTHER_WIDTH_PATHS)
@pytest.mark.parametrize("gated,shared", ((False, 0), (True, 8)))
def test_other_output_width_keeps_the_contract(training, grad, tokens, prepack, activation,
                                                gated, shared):
    torch.manual_seed(0)
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2, output_size=3, gated=gated,
                    shared_expert_size=shared, activation=activation).train(training)
    moe.prepack = prepack
    assert moe.w_out.shape == (4, 3, 8) and moe.b_out.shape == (4, 3)
    assert "output_size=3" in repr(moe)
    x = torch.randn(2, tokens // 2, 16)
    with torch.set_grad_enabled(grad):
        y = moe(x)
        ref = contract_output(moe, x)
        w, i = moe.route(x)
        naive = reference_ffn(x.reshape(-1, 16), w, i, moe.expert_weights()) + moe.shared(
            x.reshape(-1, 16))
    assert y.shape == (2, tokens // 2, 3)
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(y.reshape(-1, 3), naive, rtol=1e-4, atol=1e-5)


def test_output_size_defaults_to_hidden_size():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2)
    assert moe.output_size == 16 and moe.w_out.shape == (4, 16, 8)
    assert "output_size" not in repr(moe)


def test_route_shapes_and_combine():
    moe = moefy.MoE(8, 4, num_experts=6, top_k=2, combine="softmax")
    w, i = moe.route(torch.randn(3, 5, 8))
    assert w.shape == i.shape == (15, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(15))
    assert (i >= 0).all() and (i < 6).all()
    moe_sum = moefy.MoE(8, 4, num_experts=6, top_k=2, combine="sum")
    w, _ = moe_sum.route(torch.randn(7, 8))
    assert torch.equal(w, torch.ones(7, 2))


def test_top_k_equal_num_experts_sum_is_dense():
    # combine="sum" with k == E: every expert on every token, i.e. one dense FFN of width E·I.
    E, I, H = 4, 8, 16
    moe = moefy.MoE(H, I, num_experts=E, top_k=E, combine="sum", bias=False)
    x = torch.randn(10, H)
    dense = torch.nn.functional.gelu(x @ moe.w_in.reshape(E * I, H).t())
    dense = dense @ moe.w_out.permute(1, 0, 2).reshape(H, E * I).t()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("output_size", (None, 3))
@pytest.mark.parametrize("gated", (False, True))
def test_gradients_match_oracle(gated, output_size):
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2, gated=gated, shared_expert_size=8,
                    output_size=output_size).double()
    x = torch.randn(12, 16, dtype=torch.float64, requires_grad=True)
    moe(x).square().sum().backward()
    got = {n: p.grad.clone() for n, p in moe.named_parameters()}
    got_x = x.grad.clone()

    moe.zero_grad()
    x.grad = None
    w, i = moe.route(x)
    y = reference_ffn(x, w, i, moe.expert_weights()) + moe.shared(x)
    y.square().sum().backward()
    for n, p in moe.named_parameters():
        torch.testing.assert_close(got[n], p.grad, msg=n)
    torch.testing.assert_close(got_x, x.grad)
    assert got["router.weight"].abs().sum() > 0, "the router must receive gradient"


def test_training_step_changes_output_and_invalidates_packed_weights():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2)
    x = torch.randn(64, 16)
    with torch.no_grad():
        before = moe(x)  # builds the prepacked copy
    opt = torch.optim.SGD(moe.parameters(), lr=0.5)
    moe(x).square().mean().backward()
    opt.step()
    with torch.no_grad():
        after = moe(x)
        w, i = moe.route(x)
        ref = reference_ffn(x, w, i, moe.expert_weights())
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, ref, rtol=1e-4, atol=1e-5)


def test_load_state_dict_refreshes_packed_weights():
    a, b = moefy.MoE(16, 8, 4, 2), moefy.MoE(16, 8, 4, 2)
    x = torch.randn(40, 16)
    with torch.no_grad():
        b(x)
        b.load_state_dict(a.state_dict())
        torch.testing.assert_close(b(x), a(x))
    assert not any("packed" in k for k in b.state_dict())


def test_deepcopy_and_pickle_after_packing():
    moe = moefy.MoE(16, 8, 4, 2)
    x = torch.randn(40, 16)
    with torch.no_grad():
        y = moe(x)
        clone = copy.deepcopy(moe)
        torch.testing.assert_close(clone(x), y)
        buf = io.BytesIO()
        torch.save(moe.state_dict(), buf)
        buf.seek(0)
        fresh = moefy.MoE(16, 8, 4, 2)
        fresh.load_state_dict(torch.load(buf, weights_only=True))
        torch.testing.assert_close(fresh(x), y)


def test_expert_view_shares_weights():
    moe = moefy.MoE(8, 4, 3, 1)
    view = moe.expert(2)
    x = torch.randn(5, 8)
    before = view(x)
    with torch.no_grad():
        moe.w_out[2].mul_(2)
    torch.testing.assert_close(view(x), 2 * before - moe.b_out[2], rtol=1e-5, atol=1e-6)
    assert len(list(view.parameters())) == 0
    with pytest.raises(IndexError):
        moe.expert(3)


def test_shared_is_zero_when_empty():
    moe = moefy.MoE(8, 4, 3, 1)
    assert moe.shared.is_empty
    assert torch.equal(moe.shared(torch.randn(2, 5, 8)), torch.zeros(2, 5, 8))


def test_torch_export_sees_one_expert_node():
    moe = moefy.MoE(16, 8, 4, 2, gated=True, activation="silu").eval()
    x = torch.randn(10, 16)
    tokens = torch.export.Dim("tokens")
    ep = torch.export.export(moe, (x,), dynamic_shapes=({0: tokens},))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.moefy.expert_ffn.default) == 1
    x2 = torch.randn(33, 16)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x2), moe(x2))


def test_torch_compile_forward_and_backward():
    moe = moefy.MoE(16, 8, 4, 2)
    compiled = torch.compile(moe, backend="aot_eager", fullgraph=True)
    x = torch.randn(20, 16, requires_grad=True)
    y = compiled(x)
    torch.testing.assert_close(y, moe(x))
    y.sum().backward()
    assert x.grad is not None and moe.w_in.grad is not None


BAD = (
    (dict(hidden_size=0), "hidden_size"),
    (dict(expert_size=-1), "expert_size"),
    (dict(num_experts=2.0), "num_experts"),
    (dict(top_k=5), "top_k"),
    (dict(activation="tanhh"), "activation"),
    (dict(combine="mean"), "combine"),
    (dict(router="magic"), "router"),
    (dict(shared_expert_size=-3), "shared_expert_size"),
    (dict(output_size=0), "output_size"),
)


@pytest.mark.parametrize("override,field", BAD)
def test_bad_constructor_arguments(override, field):
    args = dict(hidden_size=8, expert_size=4, num_experts=4, top_k=2) | override
    with pytest.raises(ValueError, match=field):
        moefy.MoE(**args)


def test_wrong_input_width():
    moe = moefy.MoE(8, 4, 4, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., 8\)"):
        moe(torch.randn(3, 7))
