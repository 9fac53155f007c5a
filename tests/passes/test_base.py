import pytest
import torch

import moefy
from moefy.errors import NoFFNFoundError
from moefy.passes.base import Pass


def test_errors_name_the_pass_that_raised():
    class Fails(Pass):
        def call(self, state):
            raise NoFFNFoundError("nothing here")

    with pytest.raises(NoFFNFoundError, match=r"^\[Fails\] nothing here$"):
        Fails()(None)


def test_convert_errors_carry_the_pass_name():
    # softmax is not element-wise: no FFN (any element-wise activation, tanh included, is one)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Softmax(-1),
                                torch.nn.Linear(8, 8))
    with pytest.raises(NoFFNFoundError, match=r"^\[PlanRewrite\] no feed-forward block"):
        moefy.convert(model, moefy.MoEConfig(), example_inputs=(torch.randn(2, 8),))


def test_every_pass_logs_what_it_did_and_only_the_rewrite_changes_the_model(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8),
                                torch.nn.GELU(), torch.nn.Linear(8, 8))
    with caplog.at_level("INFO", logger="moefy.convert"):
        moefy.convert(model, moefy.MoEConfig(num_experts=4, top_k=4, keep_last=0),
                      example_inputs=(torch.randn(2, 8),))
    lines = {r.getMessage().split(":")[0]: r.getMessage() for r in caplog.records
             if r.name == "moefy.convert" and ":" in r.getMessage()}
    assert "ffns=1" in lines["FindFFNs"]  # the second Linear→GELU→Linear shares a weight
    assert "changed the model (moe=1" in lines["BuildAndRewrite"]
    changed = [name for name, line in lines.items() if "changed the model" in line]
    assert changed == ["BuildAndRewrite"]
    assert "Verify" in lines and "no change" in lines["Verify"]
