"""MoEConfig: the budget recipe's choices and the validation of every setting it adds."""

import math

import pytest

import moefy


@pytest.mark.parametrize("active,experts", [(0.5, 64), (0.25, 64), (0.125, 64), (0.3, 64),
                                            (0.25, 16), (0.5, 4), (0.75, 32)])
def test_for_budget_spends_the_active_share_half_shared_half_routed(active, experts):
    c = moefy.MoEConfig.for_budget(active, minutes=5, experts=experts)
    pieces = c.shared_experts + c.top_k
    assert c.num_experts + c.shared_experts == experts  # the FFN cut into `experts` pieces
    assert pieces == round(active * experts)  # the active share, to the nearest piece
    assert abs(pieces / experts - active) <= 0.5 / experts
    assert c.shared_experts == pieces // 2 and c.top_k >= c.shared_experts
    assert c.top_k < c.num_experts  # never every routed expert: that would not save work
    assert (c.method, c.partition, c.router_init, c.compensate) == (
        "split", "coactivation", "fit", "linear")
    assert c.minutes == 5


def test_for_budget_without_minutes_has_no_budget():
    assert moefy.MoEConfig.for_budget(0.5).minutes is None


@pytest.mark.parametrize("active", [0, 1, 1.5, -0.2, math.nan, "0.5", True, None, 0.001])
def test_for_budget_refuses_shares_it_cannot_honour(active):
    with pytest.raises(ValueError, match="active"):
        moefy.MoEConfig.for_budget(active, minutes=5)


@pytest.mark.parametrize("experts", [1, 0, 2.5, True])
def test_for_budget_refuses_bad_expert_counts(experts):
    with pytest.raises(ValueError, match="experts"):
        moefy.MoEConfig.for_budget(0.5, experts=experts)


@pytest.mark.parametrize("minutes", [0, -1, math.nan, math.inf, "5", True])
def test_minutes_must_be_a_positive_finite_number(minutes):
    with pytest.raises(ValueError, match="minutes"):
        moefy.MoEConfig(minutes=minutes)
    with pytest.raises(ValueError, match="minutes"):
        moefy.MoEConfig.for_budget(0.5, minutes=minutes)


def test_minutes_does_not_apply_to_peer():
    with pytest.raises(ValueError, match="minutes"):
        moefy.MoEConfig(method="peer", top_k=4, minutes=1)


def test_for_budget_picks_the_neuron_method_for_a_causal_lm():
    MoEConfig = moefy.MoEConfig
    c = MoEConfig.for_budget(0.5, minutes=3, causal=True)
    assert (c.method, c.active, c.minutes) == ("neuron", 0.5, 3)
    assert MoEConfig.for_budget(0.5, causal=False).method == "split"
    assert MoEConfig.for_budget(0.5).method == "split"
    with pytest.raises(ValueError, match="causal must be"):
        MoEConfig.for_budget(0.5, causal="yes")
