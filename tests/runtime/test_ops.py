"""The custom op: gradients equal the oracle's; tracing sees one node."""

import pytest
import torch

from moefy.runtime.reference import reference_ffn
from tests.runtime.helpers import make_experts, make_routing

CASES = ((False, True), (True, False), (True, True))
OUTPUT_SIZES = (None, 5)  # None: H; 5: experts that change the width (H → I → O)


def op(x, w, i, ew):
    return torch.ops.moefy.expert_ffn(x, w, i, *ew[:6], ew.activation)


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
@pytest.mark.parametrize("gated,bias", CASES)
def test_gradients_match_oracle(gated, bias, output_size):
    ew = make_experts(4, 12, 10, gated=gated, bias=bias, dtype=torch.float64,
                      output_size=output_size)
    x = torch.randn(9, 12, dtype=torch.float64)
    w, i = make_routing(9, 4, 2, dtype=torch.float64)
    leaves = [x, w, *(t for t in ew[:6] if t is not None)]
    grad_out = torch.randn(9, ew.output_size, dtype=torch.float64)

    def grads(fn):
        ls = [t.detach().clone().requires_grad_() for t in leaves]
        it = iter(ls[2:])
        e = type(ew)(*(None if t is None else next(it) for t in ew[:6]), ew.activation)
        fn(ls[0], ls[1], i, e).backward(grad_out)
        return [t.grad for t in ls]

    for got, ref in zip(grads(op), grads(reference_ffn), strict=True):
        torch.testing.assert_close(got, ref)


def test_gradcheck():
    ew = make_experts(3, 5, 4, gated=True, dtype=torch.float64)
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    w, i = make_routing(4, 3, 2, dtype=torch.float64)
    w.requires_grad_()
    w_in = ew.w_in.clone().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, w_in: torch.ops.moefy.expert_ffn(
            x, w, i, w_in, ew.w_out, ew.w_gate, ew.b_in, ew.b_gate, ew.b_out, "silu"),
        (x, w, w_in))


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
def test_fake_tensor_shape(output_size):
    from torch._subclasses.fake_tensor import FakeTensorMode
    ew = make_experts(4, 8, 6, output_size=output_size)
    with FakeTensorMode() as mode:
        fx = mode.from_tensor(torch.randn(5, 8))
        fw = mode.from_tensor(torch.rand(5, 2))
        fi = mode.from_tensor(torch.zeros(5, 2, dtype=torch.long))
        few = [None if t is None else mode.from_tensor(t) for t in ew[:6]]
        out = torch.ops.moefy.expert_ffn(fx, fw, fi, *few, "gelu")
    assert out.shape == (5, output_size or 8)


@pytest.mark.parametrize("output_size", OUTPUT_SIZES)
def test_opcheck(output_size):
    ew = make_experts(4, 8, 6, gated=True, output_size=output_size)
    x = torch.randn(7, 8)
    w, i = make_routing(7, 4, 2)
    torch.library.opcheck(torch.ops.moefy.expert_ffn.default,
                          (x, w, i, *ew[:6], "silu"),
                          test_utils=("test_schema", "test_faketensor"))


BAD_CALLS = (
    ("x", lambda x, w, i: (x[:, :7], w, i), "tokens, 8"),
    ("indices rows", lambda x, w, i: (x, w, i[:3]), "indices of shape"),
    ("weights shape", lambda x, w, i: (x, w[:, :1], i), "differ"),
    ("indices dtype", lambda x, w, i: (x, w, i.float()), "int32 or int64"),
)


@pytest.mark.parametrize("name,mutate,message", BAD_CALLS)
def test_bad_inputs_raise_readable_errors(name, mutate, message):
    ew = make_experts(4, 8, 6)
    x = torch.randn(5, 8)
    w, i = make_routing(5, 4, 2)
    with pytest.raises((ValueError, TypeError), match=message):
        op(*mutate(x, w, i), ew)
