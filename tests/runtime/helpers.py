"""Random experts and routings for runtime tests."""

import torch

from moefy.runtime.experts import ExpertWeights


def make_experts(E, H, I, *, gated=False, bias=True, activation="gelu", dtype=torch.float32,
                 output_size=None):
    """Experts H → I → O, O = ``output_size`` (default H)."""
    O = H if output_size is None else output_size

    def r(*shape, scale):
        return (torch.randn(*shape) * scale).to(dtype)

    return ExpertWeights(
        w_in=r(E, I, H, scale=H**-0.5),
        w_out=r(E, O, I, scale=I**-0.5),
        w_gate=r(E, I, H, scale=H**-0.5) if gated else None,
        b_in=r(E, I, scale=0.1) if bias else None,
        b_gate=r(E, I, scale=0.1) if bias and gated else None,
        b_out=r(E, O, scale=0.1) if bias else None,
        activation=activation,
    )


def make_routing(T, E, k, *, dtype=torch.float32):
    """Distinct top-k experts per token with softmax weights."""
    top, indices = torch.randn(T, E).topk(k, dim=-1)
    return top.softmax(-1).to(dtype), indices
