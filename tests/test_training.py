"""moefy.distill: a short fine-tune brings a converted model closer to the dense one."""

import pytest
import torch
import torch.nn as nn

import moefy


def setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 128), nn.GELU(), nn.Linear(128, 16)).eval()
    data = [(torch.randn(64, 16),) for _ in range(8)]
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2, partition="kmeans")
    return model, moefy.convert(model, cfg, example_inputs=data[0]), data


def err(model, moe_model, data):
    with torch.no_grad():
        return sum(float((moe_model(*b) - model(*b)).pow(2).mean()) for b in data)


def test_distill_lowers_the_error_and_restores_flags():
    model, moe_model, data = setup()
    held = [(torch.randn(64, 16),) for _ in range(4)]
    moe_model[0].router.weight.requires_grad_(False)  # a user's own choice, restored after
    before = err(model, moe_model, held)
    dense_before = {k: v.clone() for k, v in model.state_dict().items()}
    log = moefy.distill(moe_model, model, data, steps=60, lr=3e-3, progress=False)
    assert len(log) == 60 and sum(log[-10:]) < 0.5 * sum(log[:10])
    assert err(model, moe_model, held) < 0.7 * before
    assert not moe_model[0].router.weight.requires_grad
    assert not moe_model.training and not moe_model[0].training
    assert all(torch.equal(dense_before[k], v) for k, v in model.state_dict().items())


def test_distill_trains_only_what_it_is_told():
    model, moe_model, data = setup()
    experts = moe_model[0].w_in.detach().clone()
    router = moe_model[0].router.weight.detach().clone()
    moefy.distill(moe_model, model, data, steps=5, lr=1e-2, train="routers", progress=False)
    assert torch.equal(moe_model[0].w_in, experts)
    assert not torch.equal(moe_model[0].router.weight, router)


def test_distill_with_a_custom_loss_and_aux():
    model, moe_model, data = setup()
    seen = []

    def loss(student, teacher, batch):
        seen.append(type(batch).__name__)
        return (student - teacher).abs().mean()

    log = moefy.distill(moe_model, model, data, steps=3, loss=loss, aux=0.01, progress=False)
    assert len(log) == 3 and seen == ["tuple"] * 3


def test_distill_bad_input():
    model, moe_model, data = setup()
    with pytest.raises(ValueError, match="steps must be a positive int"):
        moefy.distill(moe_model, model, data, steps=0)
    with pytest.raises(ValueError, match="no batches"):
        moefy.distill(moe_model, model, [], steps=2, progress=False)
    with pytest.raises(ValueError, match="no moefy.MoE"):
        moefy.distill(model, model, data, steps=2)
