"""moefy.MoE routers, capacity factor, auxiliary losses and the masked training path."""

import math

import pytest
import torch

import moefy
from moefy.runtime.dispatch import masked_dense_ffn as _masked_dense

ROUTERS = ("softmax", "noisy", "sigmoid", "topp", "expert_choice", "hash")


def contract_output(moe, x, token_ids=None):
    """sum over slots of w[t, j] * expert(i[t, j])(x[t]) + shared(x[t]), token by token."""
    w, i = moe.route(x, token_ids)
    rows = []
    for t in range(x.shape[0]):
        y = moe.shared(x[t])
        for j in range(w.shape[1]):
            y = y + w[t, j] * moe.expert(int(i[t, j]))(x[t])
        rows.append(y)
    return torch.stack(rows)


@pytest.mark.parametrize("router", ROUTERS)
@pytest.mark.parametrize("combine", ("softmax", "sum"))
def test_every_router_keeps_the_contract(router, combine):
    moe = moefy.MoE(16, 8, num_experts=6, top_k=2, router=router, combine=combine,
                    top_p=0.6).eval()
    torch.nn.init.normal_(moe.router.weight, std=1.0)
    x = torch.randn(20, 16)
    ids = torch.randint(0, 1000, (20,)) if router == "hash" else None
    with torch.no_grad():
        torch.testing.assert_close(moe(x, ids), contract_output(moe, x, ids),
                                   rtol=1e-5, atol=1e-5)


def test_topp_takes_experts_until_the_mass_reaches_p():
    moe = moefy.MoE(16, 8, num_experts=8, top_k=4, router="topp", top_p=0.5).eval()
    torch.nn.init.normal_(moe.router.weight, std=2.0)
    x = torch.randn(200, 16)
    w, i = moe.route(x)
    probs = torch.softmax(moe.router(x), -1).gather(1, i)
    used = w > 0
    counts = used.sum(1)
    assert counts.min() >= 1 and counts.max() <= 4 and len(set(counts.tolist())) > 1
    torch.testing.assert_close(w.sum(1), torch.ones(200))
    mass = (probs * used).sum(1)
    full = counts < 4  # stopped early: the mass reached p, and not one expert earlier
    assert (mass[full] >= 0.5 - 1e-6).all()
    assert ((mass - (probs * used).gather(1, (counts - 1).unsqueeze(1)).squeeze(1))[full]
            < 0.5).all()


def test_expert_choice_gives_each_expert_its_capacity():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2, router="expert_choice").eval()
    x = torch.randn(30, 16)
    w, i = moe.route(x)
    load = torch.zeros(4).index_add_(0, i.reshape(-1), (w > 0).reshape(-1).float())
    assert load.tolist() == [math.ceil(30 * 2 / 4)] * 4


def test_hash_router_is_fixed_and_needs_ids():
    moe = moefy.MoE(16, 8, num_experts=5, top_k=1, router="hash")
    x = torch.randn(6, 16)
    ids = torch.tensor([3, 3, 7, 11, 3, 7])
    _, i = moe.route(x, ids)
    assert i[0] == i[1] == i[4] and i[2] == i[5]
    with pytest.raises(ValueError, match="token_ids"):
        moe.route(x)


def test_noisy_router_adds_noise_only_in_training():
    moe = moefy.MoE(16, 8, num_experts=8, top_k=2, router="noisy")
    x = torch.randn(64, 16)
    moe.eval()
    assert torch.equal(moe.route(x)[1], moe.route(x)[1])
    moe.train()
    assert not torch.equal(moe.route(x)[1], moe.route(x)[1])


def test_sigmoid_bias_moves_load_toward_balance():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=1, router="sigmoid").train()
    moe.bias_update_rate = 0.05
    with torch.no_grad():
        moe.router.weight.normal_(std=0.1)
        moe.router.weight[0] = 1.0  # expert 0 wins every token with positive features
    x = torch.randn(256, 16).abs()

    def share_of_busiest():
        _, i = moe.route(x)
        return torch.bincount(i.reshape(-1), minlength=4).max().item() / 256

    before = share_of_busiest()
    bias = moe.selection_bias.clone()
    moe.route(x)
    assert torch.equal(moe.selection_bias, bias), "route() changes nothing"
    for _ in range(100):
        moe(x)  # each training forward nudges the bias
    assert before == 1.0 and share_of_busiest() < 0.6
    assert moe.selection_bias[0] < moe.selection_bias[1:].min()


def test_capacity_factor_drops_overflow_and_counts_it():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=1, capacity_factor=1.0).eval()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[2, 0] = 5.0
    x = torch.randn(40, 16)
    x[:, 0] = x[:, 0].abs() + 1  # every token prefers expert 2
    w, i = moe.route(x)
    assert moe.last_dropped == 0, "route() changes nothing"
    with torch.no_grad():
        moe(x)
    capacity = math.ceil(40 * 1 / 4 * 1.0)
    assert (w[:, 0] > 0).sum() == capacity and moe.last_dropped == 40 - capacity
    assert (w[:capacity] > 0).all() and (w[capacity:] == 0).all()  # first come, first served
    with torch.no_grad():
        y = moe(x)
    torch.testing.assert_close(y[capacity:], moe.shared(x[capacity:]))  # dropped: nothing routed


def test_aux_losses_follow_their_formulas():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2).train()
    x = torch.randn(50, 16)
    moe(x)
    logits = moe.router(x)
    probs = torch.softmax(logits, -1)
    _, idx = logits.topk(2, dim=-1)
    frac = torch.bincount(idx.reshape(-1), minlength=4).float() / 100
    torch.testing.assert_close(moe.last_aux["balance"], 4 * (frac * probs.mean(0)).sum())
    torch.testing.assert_close(moe.last_aux["z"], torch.logsumexp(logits, -1).pow(2).mean())
    loss = moefy.aux_loss(moe, balance=1.0, z=0.5)
    torch.testing.assert_close(loss, moe.last_aux["balance"] + 0.5 * moe.last_aux["z"])
    loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_needs_a_training_forward():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2).eval()
    moe(torch.randn(3, 16))
    with pytest.raises(ValueError, match="training-mode forward"):
        moefy.aux_loss(moe)


@pytest.mark.parametrize("gated", (False, True))
def test_masked_training_path_equals_the_sparse_op(gated):
    moe = moefy.MoE(16, 8, num_experts=6, top_k=2, gated=gated, activation="silu")
    x = torch.randn(30, 16, requires_grad=True)
    w, i = moe.route(x)
    w = w.detach().requires_grad_(True)
    ew = moe.expert_weights()
    outs = []
    for fn in (_masked_dense, lambda *a: torch.ops.moefy.expert_ffn(*a[:3], *ew[:6],
                                                                   ew.activation)):
        y = fn(x, w, i, ew)
        grads = torch.autograd.grad(y.square().sum(), [x, w, moe.w_in, moe.w_out])
        outs.append((y, grads))
    torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(outs[0][1], outs[1][1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_sum_combine_passes_router_gradient_straight_through():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2, combine="sum").train()
    x = torch.randn(10, 16)
    w, _ = moe.route(x)
    assert torch.equal(w.detach(), torch.ones_like(w))  # values: unweighted
    moe(x).square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 0  # but the router still learns


def test_freeze_selects_parameters():
    moe = moefy.MoE(16, 8, num_experts=4, top_k=2, shared_expert_size=8)
    assert moefy.freeze(moe, "routers") == ["router.weight"]
    experts = moefy.freeze(moe, "experts")
    assert "router.weight" not in experts and "w_in" in experts and any(
        n.startswith("shared.") for n in experts)
    assert len(moefy.freeze(moe, "moe")) == len(list(moe.parameters()))
    with pytest.raises(ValueError, match="train must be one of"):
        moefy.freeze(moe, "attention")
    with pytest.raises(ValueError, match="no moefy.MoE"):
        moefy.freeze(torch.nn.Linear(2, 2))


def test_bad_router_arguments():
    with pytest.raises(ValueError, match="router must be one of"):
        moefy.MoE(16, 8, num_experts=4, top_k=2, router="magic")
    with pytest.raises(ValueError, match="capacity_factor"):
        moefy.MoE(16, 8, num_experts=4, top_k=2, capacity_factor=0)
    with pytest.raises(ValueError, match="top_p"):
        moefy.MoE(16, 8, num_experts=4, top_k=2, top_p=1.5)
