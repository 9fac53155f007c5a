"""moefy.report on PEER layers: PEER's Table 2 usage and unevenness over the data, against a
hand computation and a brute-force oracle; real experts only; rows beside MoE rows."""

import math

import pytest
import torch
import torch.nn as nn

import moefy
from moefy.report import real_experts
from tests.passes.models import PreNormResidual as Block


def forced_layer():
    """N = 2×3 experts, heads 2, top_k 2, key_dim 2 (one number per half), no BatchNorm:
    q_head0 = (x0, x1), q_head1 = (x2, x3); keys_a = (1, −1), keys_b = (1, 0.25, −1), so
    expert a·3 + b scores q0·keys_a[a] + q1·keys_b[b]."""
    layer = moefy.PEER(4, (2, 3), heads=2, top_k=2, key_dim=2, query_norm=None).eval()
    with torch.no_grad():
        layer.query.weight.copy_(torch.eye(4))
        layer.query.bias.zero_()
        layer.keys_a.copy_(torch.tensor([[1.0], [-1.0]]))
        layer.keys_b.copy_(torch.tensor([[1.0], [0.25], [-1.0]]))
    return layer


def table2(z: torch.Tensor) -> tuple[float, float]:
    """usage (share of z > 0) and KL(z ‖ uniform) of an unnormalised mass z, by hand."""
    z = z.detach().double()
    z = z / z.sum()
    return float((z > 0).double().mean()), math.log(z.numel()) + sum(
        float(v) * math.log(float(v)) for v in z if v > 0)


def test_forced_routing_by_hand():
    """Every token (x0, x1, x2, x3) = (1, 1, −1, −1): head 0 scores expert 0 (a=0, b=0) at 2
    and expert 1 at 1.25; head 1 scores expert 5 (a=1, b=2) at 2 and expert 4 at 0.75."""
    layer = forced_layer()
    x = torch.tensor([[1.0, 1.0, -1.0, -1.0]]).expand(5, 4)
    route = layer.route(x)
    assert route.ids.tolist() == [[[0, 1], [5, 4]]] * 5
    p = 1 / (1 + math.exp(-0.75))  # softmax of (2, 1.25): head 0's top weight
    r = 1 / (1 + math.exp(-1.25))  # softmax of (2, 0.75): head 1's
    z = torch.tensor([p, 1 - p, 0, 0, 1 - r, r]) / 2  # both heads, every token alike
    rep = moefy.report(nn.Sequential(layer), [(x,)])
    row = rep.layers[0]
    assert row["tokens"] == 5 and row["E"] == 6 and row["experts"] == 6
    torch.testing.assert_close(row["load"], z.float())
    assert row["usage"] == pytest.approx(4 / 6)
    assert row["uneven"] == pytest.approx(math.log(6) + float((z[z > 0] * z[z > 0].log()).sum()),
                                          rel=1e-6)
    assert row["max load"] == pytest.approx(r / 2, rel=1e-6)
    assert row["rel err"] is None and row["dropped"] == 0
    assert row["k"] == "2×2" and row["method"] == "peer"
    assert "66.7%" in rep.splitlines()[1]  # usage written as a percentage


def test_padding_experts_are_not_counted():
    """An expert with every parameter zero (a conversion's padding to a grid) is no expert:
    mass routed to it is left out and usage / unevenness are over the real ones."""
    layer = forced_layer()
    with torch.no_grad():
        layer.down[4].zero_()
        layer.up[4].zero_()
    assert real_experts(layer).tolist() == [True, True, True, True, False, True]
    x = torch.tensor([[1.0, 1.0, -1.0, -1.0]]).expand(3, 4)
    row = moefy.report(nn.Sequential(layer), [(x,)]).layers[0]
    p, r = 1 / (1 + math.exp(-0.75)), 1 / (1 + math.exp(-1.25))
    mass = torch.tensor([p, 1 - p, 0, 0, r])  # the five real experts, expert 4 left out
    usage, uneven = table2(mass)
    assert row["experts"] == 5 and row["usage"] == pytest.approx(usage)  # 3 of 5
    assert row["uneven"] == pytest.approx(uneven, rel=1e-6)
    assert float(row["load"][4]) == 0 and float(row["load"].sum()) == pytest.approx(1.0)
    # one zero table alone does not make an expert padding: it still trains
    with torch.no_grad():
        layer.down[4].fill_(0.1)
    assert real_experts(layer).all()


class Masked(nn.Module):
    """A model taking an attention mask: padding tokens must not count."""

    def __init__(self, peer):
        super().__init__()
        self.peer = peer

    def forward(self, x, attention_mask=None):
        return self.peer(x)


class OwnMask(Masked):
    def forward(self, x, pad=None):
        return self.peer(x, mask=pad)


@torch.no_grad()
def brute_force_mass(layer, x):
    """z by scoring all N keys for every token and head (float64), top-k, softmax."""
    n1, n2 = layer.grid
    keys = torch.cat([layer.keys_a.repeat_interleave(n2, 0), layer.keys_b.repeat(n1, 1)], 1)
    q = layer._queries(x.reshape(-1, layer.hidden_size), update=False).double()
    mass = torch.zeros(layer.num_experts, dtype=torch.float64)
    for t in range(q.shape[0]):
        for h in range(layer.heads):
            scores, ids = (keys.double() @ q[t, h]).topk(layer.top_k)
            mass[ids] += torch.softmax(scores, 0)
    return mass


def test_routing_over_data_matches_a_brute_force_oracle_and_skips_padding():
    torch.manual_seed(0)
    layer = moefy.PEER(4, (2, 3), heads=2, top_k=2, key_dim=2, query_norm=None).eval()
    x = torch.randn(2, 6, 4) * 2
    attention_mask = torch.ones(2, 6, dtype=torch.long)
    attention_mask[1, 2:] = 0
    data = [{"x": x, "attention_mask": attention_mask}, {"x": x[:1]}]
    row = moefy.report(Masked(layer), data).layers[0]
    real = torch.cat([x[0], x[1, :2], x[0]])  # the 14 real tokens
    usage, uneven = table2(brute_force_mass(layer, real))
    assert row["tokens"] == 14
    assert row["usage"] == pytest.approx(usage) and row["uneven"] == pytest.approx(uneven,
                                                                                  rel=1e-5)
    with_padding = table2(brute_force_mass(layer, torch.cat([x.reshape(-1, 4), x[0]])))
    assert with_padding[1] != pytest.approx(uneven, rel=1e-3)  # padding would show
    # the same padding given to the layer itself (PEER's own mask) is skipped too
    own = moefy.report(OwnMask(layer), [{"x": x, "pad": attention_mask.bool()},
                                        {"x": x[:1]}]).layers[0]
    assert own["tokens"] == 14 and own["uneven"] == pytest.approx(uneven, rel=1e-5)


def small_model():
    torch.manual_seed(0)
    return nn.Sequential(Block(moefy.MoE(16, 32, num_experts=4, top_k=2)),
                         Block(moefy.PEER(16, (8, 8), heads=2, top_k=4)),
                         Block(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))))


def test_end_to_end_report_lists_peer_beside_moe_in_model_order():
    model = small_model().train()
    peer = model[1].ffn
    stats = peer.query_norm.running_mean.clone(), int(peer.query_norm.num_batches_tracked)
    data = [(torch.randn(3, 10, 16),) for _ in range(3)]
    rep = moefy.report(model, data)
    names = [row["name"] for row in rep.layers]
    assert names == ["0.ffn", "1.ffn"]
    row = rep.layers[1]
    assert row["E"] == 64 and row["k"] == "2×4" and row["tokens"] == 90
    assert math.isclose(float(row["load"].sum()), 1.0, rel_tol=1e-6)
    # z over the layer's actual inputs (the LayerNorm's output), eval mode
    model.eval()
    inputs = torch.cat([model[1].norm(model[0](x)) for (x,) in data]).detach()
    route = peer.route(inputs)
    mass = torch.zeros(64, dtype=torch.float64).index_add_(
        0, route.ids.reshape(-1), route.weights.reshape(-1).double())
    torch.testing.assert_close(row["load"], (mass / mass.sum()).float())
    usage, uneven = table2(mass)
    assert row["usage"] == pytest.approx(usage) and row["uneven"] == pytest.approx(uneven,
                                                                                  rel=1e-5)
    assert 0 < row["usage"] <= 1 and row["rel err"] is None
    assert rep.layers[0]["rel err"] is not None  # the MoE row is measured as before
    # report ran in eval mode: the BatchNorm statistics are unchanged
    torch.testing.assert_close(peer.query_norm.running_mean, stats[0])
    assert int(peer.query_norm.num_batches_tracked) == stats[1]
    line = rep.splitlines()[2]
    assert line.startswith("1.ffn") and "peer" in line and "%" in line


def test_training_flags_are_restored():
    model = small_model().train()
    moefy.report(model, [(torch.randn(4, 16),)])
    assert all(m.training for m in model.modules())


def test_static_peer_row_counts_retrieval_as_active():
    layer = moefy.PEER(16, (8, 8), heads=2, top_k=4, key_dim=8)
    row = moefy.report(layer).layers[0]
    # experts 2·4·(2·16), query 16·16 (no bias: BatchNorm), BatchNorm affine 2·16, keys 16·4
    assert row["active"] == f"{(256 + 256 + 32 + 64) / 1e6:.2f}M"
    assert row["FFN FLOPs"] == "—"  # no dense FFN to compare with
    layer.conversion = {"dense_ffn_size": 64, "method": "peer", "name": "mlp"}
    row = moefy.report(layer).layers[0]
    # (8 experts + query 16·16/32 + keys 2·16·4/32 per-neuron-equivalents) / 64 neurons
    assert row["FFN FLOPs"] == f"{(256 + 256 + 128) / (64 * 32):.0%}"
    assert row["name"] == "mlp"


def test_heatmap_draws_moe_layers_only(tmp_path):
    with pytest.raises(moefy.errors.ReportInputError, match="MoE layers only"):
        moefy.report(nn.Sequential(forced_layer()), [(torch.randn(3, 4),)],
                     heatmap=tmp_path / "a.png")
    pytest.importorskip("matplotlib")
    moefy.report(small_model(), [(torch.randn(3, 16),)], heatmap=tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 0
