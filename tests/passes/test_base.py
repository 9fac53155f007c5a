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
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Tanh(), torch.nn.Linear(8, 8))
    with pytest.raises(NoFFNFoundError, match=r"^\[PlanRewrite\] no feed-forward block"):
        moefy.convert(model, moefy.MoEConfig(), example_inputs=(torch.randn(2, 8),))
