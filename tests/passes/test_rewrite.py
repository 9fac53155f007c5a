"""Module surgery (moefy/passes/rewrite.py): the converted layer goes wherever the dense module
was registered, and the result shares nothing with the caller's model."""

import pytest
import torch
import torch.nn as nn

import moefy
from moefy.passes.rewrite import SurgeryPlan, apply_surgery, module_paths


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.act, self.down = nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)

    def forward(self, x):
        return self.down(self.act(self.up(x)))


class Twice(nn.Module):
    """One FFN module registered at two paths, called at both."""

    def __init__(self):
        super().__init__()
        self.a = MLP()
        self.b = self.a

    def forward(self, x):
        return self.b(self.a(x) + x)


def test_module_paths_lists_every_registration():
    model = Twice()
    assert module_paths(model, "a") == ["a", "b"] and module_paths(model, "b") == ["b", "a"]
    assert module_paths(model, "a.up") == ["a.up", "b.up"]


def test_apply_surgery_swaps_every_path():
    model = Twice()
    moe = moefy.MoE(16, 64, num_experts=2, top_k=1)
    apply_surgery(model, SurgeryPlan("a", "a", [], None), moe)
    assert model.a is moe and model.b is moe


@pytest.mark.parametrize("inplace", (False, True))
def test_one_ffn_at_two_paths_converts_at_both(inplace):
    torch.manual_seed(0)
    model, x = Twice().eval(), torch.randn(4, 16)
    with torch.no_grad():
        ref = model(x)
    dense_params = {id(p) for p in model.parameters()}
    out = moefy.convert(model, moefy.MoEConfig(method="upcycle", num_experts=4, top_k=2),
                        example_inputs=(x,), inplace=inplace)
    assert isinstance(out.a, moefy.MoE) and out.b is out.a  # still one module
    with torch.no_grad():
        torch.testing.assert_close(out(x), ref, rtol=1e-5, atol=1e-5)
    if not inplace:  # the caller's model is untouched, and shares nothing with the result
        assert isinstance(model.a, MLP) and model.b is model.a
        assert not dense_params & {id(p) for p in out.parameters()}
