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


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
@pytest.mark.parametrize("name", sorted(n for n, a in ACTIVATIONS.items() if a.onednn))
def test_onednn_post_op_computes_the_activation(name):
    act = get_activation(name)
    x, w, b = torch.randn(64, 16), torch.randn(32, 16), torch.randn(32)
    attr, algo = act.onednn
    fused = torch.ops.mkldnn._linear_pointwise(x, w, b, attr, [], algo)
    torch.testing.assert_close(fused, act.fn(torch.nn.functional.linear(x, w, b)),
                               rtol=1e-5, atol=1e-5)
