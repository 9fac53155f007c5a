"""The FFN matcher on small graphs: every activation form, gated and fused layouts, rejections."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.passes.find_ffn import find_ffns
from moefy.passes.trace import export_model


def gelu_tanh_arith(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3.0))))


def gelu_erf_arith(x):
    return x * 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


ACTIVATIONS = (
    ("relu", torch.relu),
    ("gelu", F.gelu),
    ("gelu_tanh", lambda x: F.gelu(x, approximate="tanh")),
    ("gelu_tanh", gelu_tanh_arith),
    ("gelu", gelu_erf_arith),
    ("silu", F.silu),
    ("squared_relu", lambda x: torch.relu(x).square()),
    ("squared_relu", lambda x: torch.relu(x) ** 2),
    ("quick_gelu", lambda x: x * torch.sigmoid(1.702 * x)),
)


class Plain(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.act = act
        self.fc1, self.fc2 = nn.Linear(16, 48), nn.Linear(48, 16)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Gated(nn.Module):
    def __init__(self, fused=False, up_first=False):
        super().__init__()
        self.fused, self.up_first = fused, up_first
        self.gate_up = nn.Linear(16, 96, bias=False)
        self.gate, self.up = nn.Linear(16, 48, bias=False), nn.Linear(16, 48, bias=False)
        self.down = nn.Linear(48, 16, bias=False)

    def forward(self, x):
        if self.fused:
            a, b = self.gate_up(x).chunk(2, dim=-1)
            g, u = (b, a) if self.up_first else (a, b)
        else:
            g, u = self.gate(x), self.up(x)
        return self.down(u * F.silu(g))


def matches_of(model):
    ep = export_model(model, (torch.randn(2, 3, 16),), {})
    return find_ffns(ep)


@pytest.mark.parametrize("name,act", ACTIVATIONS)
def test_every_activation_form(name, act):
    matches, _ = matches_of(Plain(act))
    assert [m.activation for m in matches] == [name]
    assert matches[0].up.weight == "fc1.weight" and matches[0].down.weight == "fc2.weight"


@pytest.mark.parametrize("fused,up_first", ((False, False), (True, False), (True, True)))
def test_gated_and_fused(fused, up_first):
    (m,), _ = matches_of(Gated(fused, up_first))
    assert m.activation == "silu"
    if fused:
        assert m.gate is None and m.up.weight == "gate_up.weight"
        assert m.fused_gate_first is (not up_first)
    else:
        assert (m.gate.weight, m.up.weight) == ("gate.weight", "up.weight")


def test_tanh_is_not_an_ffn_activation():
    matches, rejected = matches_of(Plain(torch.tanh))
    assert matches == []
    assert any("not an activation" in r.reason for r in rejected)
