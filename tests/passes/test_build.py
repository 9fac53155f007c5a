"""Split builders with calibration: compensation, fitted routers, exactness where promised."""

import pytest
import torch
import torch.nn as nn

import moefy
from moefy.errors import ConversionError


def mlp(h=32, d=256):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(h, d), nn.GELU(), nn.Linear(d, h))
    with torch.no_grad():
        model[0].bias.normal_(std=1.0)  # neurons with a non-zero mean output
    return model.eval()


def data(n=12, h=32, seed=1):
    # correlated features, so that which neurons fire depends on a few directions
    basis = torch.randn(6, h, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(64, 6, generator=g) @ basis + 0.3 * torch.randn(64, h, generator=g),)
            for _ in range(n)]


def rel_err(model, moe_model, batches):
    with torch.no_grad():
        ref = torch.cat([model(*b) for b in batches])
        got = torch.cat([moe_model(*b) for b in batches])
    return float((got - ref).norm() / ref.norm())


@pytest.mark.parametrize("compensate", ("mean", "linear"))
@pytest.mark.parametrize("shared", (0, 2))
def test_compensated_split_is_exact_with_every_expert(compensate, shared):
    model, cal = mlp(), data()
    cfg = moefy.MoEConfig(method="split", num_experts=8 - shared, top_k=8 - shared,
                          shared_experts=shared,
                          partition="coactivation", compensate=compensate)
    moe_model = moefy.convert(model, cfg, example_inputs=cal[0], calibration_data=cal)
    assert rel_err(model, moe_model, data(seed=5)) < 1e-5


def test_mean_compensation_stays_exact_when_top_k_is_raised():
    model, cal = mlp(), data()
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2, compensate="mean")
    moe_model = moefy.convert(model, cfg, example_inputs=cal[0], calibration_data=cal)
    moe_model[0].top_k = 8
    assert rel_err(model, moe_model, data(seed=5)) < 1e-5


def test_each_lever_lowers_the_error_on_held_out_data():
    model, cal, held = mlp(), data(), data(seed=7)
    errs = {}
    for name, extra in (("none", dict(compensate=False, router_init="similarity")),
                        ("mean", dict(compensate="mean", router_init="similarity")),
                        ("mean+fit", dict(compensate="mean", router_init="fit")),
                        ("linear+fit", dict(compensate="linear", router_init="fit"))):
        cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2,
                              partition="coactivation", **extra)
        errs[name] = rel_err(model, moefy.convert(model, cfg, example_inputs=cal[0],
                                                  calibration_data=cal), held)
    assert errs["none"] > errs["mean"] > errs["mean+fit"] > errs["linear+fit"], errs


def test_fitted_router_recall_beats_the_training_free_one():
    model, cal = mlp(), data(n=30)
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2, router_init="fit")
    moe = moefy.convert(model, cfg, example_inputs=cal[0], calibration_data=cal)[0]
    info = moe.conversion
    assert info["router_recall"] > info["router_recall_init"]
    assert info["router_recall"] > 2 / 8 + 0.2  # well above chance
    assert info["rel_err_compensated"] < info["rel_err_calibration"]


def test_representative_router_uses_a_neuron_of_each_expert():
    model, cal = mlp(), data()
    cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2,
                          router_init="representative")
    moe = moefy.convert(model, cfg, example_inputs=cal[0], calibration_data=cal)[0]
    w1 = model[0].weight
    for e, neurons in enumerate(moe.expert_neurons):
        row = moe.router.weight[e]
        assert any(torch.equal(row, w1[n]) for n in neurons)


def test_data_hungry_options_without_data_fail_before_any_change():
    model = mlp()
    x = data()[0]
    for extra in (dict(router_init="fit"), dict(compensate="linear"),
                  dict(router_init="representative")):
        with pytest.raises(ConversionError, match="needs calibration_data"):
            moefy.convert(model, moefy.MoEConfig(method="split", num_experts=8, top_k=2,
                                                 **extra), example_inputs=x)
    with pytest.raises(ValueError, match="compensate"):
        moefy.MoEConfig(compensate="median")
    with pytest.raises(ValueError, match="router_init"):
        moefy.MoEConfig(router_init="oracle")


def test_compensation_rank_sets_the_map_and_trades_error():
    model, cal, held = mlp(), data(), data(seed=7)
    errs = {}
    for rank in (2, 10):
        cfg = moefy.MoEConfig(method="split", num_experts=8, top_k=2, partition="coactivation",
                              compensate_rank=rank)
        moe_model = moefy.convert(model, cfg, example_inputs=cal[0], calibration_data=cal)
        ranks = {m.out_features for m in moe_model[0].shared.modules()
                 if isinstance(m, nn.Linear) and m.in_features == 32}
        assert ranks == {rank}
        errs[rank] = rel_err(model, moe_model, held)
    assert errs[10] < errs[2], errs
    with pytest.raises(ValueError, match="compensate_rank"):
        moefy.MoEConfig(compensate_rank=0)


@pytest.mark.parametrize("method", ["split", "upcycle"])
def test_what_the_builders_do_not_set_starts_at_zero(method):
    """Layers are built on the meta device and materialised empty: the sigmoid router's
    selection bias and the noisy router's noise weights must still start at zero (stale
    memory there once routed half the tokens to dead experts)."""
    dense = nn.Sequential(nn.Linear(64, 1024), nn.GELU(), nn.Linear(1024, 64))
    garbage = torch.full((1 << 16,), 3e30)  # leaves non-zero memory for the allocator to reuse
    del garbage
    for router in ("sigmoid", "noisy"):
        moe = moefy.convert(dense, moefy.MoEConfig(method=method, num_experts=8, top_k=2,
                                                   router=router),
                            example_inputs=(torch.randn(4, 64),))[0]
        state = moe.selection_bias if router == "sigmoid" else moe.router_noise.weight
        assert torch.equal(state, torch.zeros_like(state)), router
