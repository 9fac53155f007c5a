import pytest
import torch

from moefy.activations import ACTIVATIONS, get_activation


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_hand_written_gradient_matches_autograd(name):
    act = get_activation(name)
    x = torch.randn(200, dtype=torch.float64, requires_grad=True)
    g = torch.randn(200, dtype=torch.float64)
    act.fn(x).backward(g)
    torch.testing.assert_close(act.grad(g, x.detach()), x.grad)


def test_aliases_and_unknown():
    assert get_activation("swish").name == "silu"
    assert get_activation("gelu_new").name == "gelu_tanh"
    with pytest.raises(ValueError, match="expected one of"):
        get_activation("softsign")
