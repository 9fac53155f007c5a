"""``moefy::expert_ffn``: the routed experts as one operator.

    x (T, H), weights (T, k), indices (T, k), stacked expert weights  ⇒  y (T, O)

``torch.export``, ``torch.compile`` and the ONNX exporter see a single node with a fake
(meta) implementation; lowering maps that node to a grouped MoE op. Autograd goes through a
second opaque op, ``moefy::expert_ffn_backward``, so compiled training does not trace into
the data-dependent dispatch either.
"""

from __future__ import annotations

import torch

from moefy.runtime.dispatch import grouped_ffn, grouped_ffn_backward
from moefy.runtime.experts import ExpertWeights, check_routing

Tensor = torch.Tensor


@torch.library.custom_op("moefy::expert_ffn", mutates_args=())
def expert_ffn(
    x: Tensor, weights: Tensor, indices: Tensor, w_in: Tensor, w_out: Tensor,
    w_gate: Tensor | None, b_in: Tensor | None, b_gate: Tensor | None, b_out: Tensor | None,
    activation: str, capacity_factor: float = 0.0,
) -> Tensor:
    """``capacity_factor`` > 0 promises that no expert receives more than
    ceil(T·k/E·capacity_factor) assignments with a non-zero weight (the router dropped the
    rest); static-shape lowerings size their buffers by it. 0: dropless."""
    ew = ExpertWeights(w_in, w_out, w_gate, b_in, b_gate, b_out, activation)
    check_routing(x, weights, indices, ew)
    return grouped_ffn(x, weights, indices, ew)


@expert_ffn.register_fake
def _expert_ffn_fake(x, weights, indices, w_in, w_out, w_gate, b_in, b_gate, b_out, activation,
                     capacity_factor=0.0):
    return x.new_empty(x.shape[0], w_out.shape[1])  # (T, O)


@torch.library.custom_op("moefy::expert_ffn_backward", mutates_args=())
def expert_ffn_backward(
    grad: Tensor, x: Tensor, weights: Tensor, indices: Tensor, w_in: Tensor, w_out: Tensor,
    w_gate: Tensor | None, b_in: Tensor | None, b_gate: Tensor | None, b_out: Tensor | None,
    activation: str,
) -> list[Tensor]:
    """Gradients for (x, weights, w_in, w_out, w_gate, b_in, b_gate, b_out); an absent
    optional input gets an empty tensor."""
    ew = ExpertWeights(w_in, w_out, w_gate, b_in, b_gate, b_out, activation)
    grads = grouped_ffn_backward(grad, x, weights, indices, ew)
    return [grad.new_empty(0) if g is None else g for g in grads]


@expert_ffn_backward.register_fake
def _expert_ffn_backward_fake(grad, x, weights, indices, w_in, w_out, w_gate, b_in, b_gate,
                              b_out, activation):
    present = [x, weights, w_in, w_out, w_gate, b_in, b_gate, b_out]
    return [grad.new_empty(0) if t is None else torch.empty_like(t) for t in present]


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:3], *(t for t in inputs[3:9] if t is not None))
    ctx.present = [t is not None for t in inputs[3:9]]
    ctx.activation = inputs[9]


def _backward(ctx, grad):
    saved = list(ctx.saved_tensors)
    x, weights, indices = saved[:3]
    rest = iter(saved[3:])
    w = [next(rest) if p else None for p in ctx.present]
    grads = expert_ffn_backward(grad.contiguous(), x, weights, indices, *w, ctx.activation)
    g = [None if t is None else gr for t, gr in zip([x, weights, *w], grads, strict=True)]
    # order of expert_ffn's inputs: x, weights, indices, w_in, w_out, w_gate, b_in, b_gate, b_out
    return g[0], g[1], None, *g[2:], None, None


expert_ffn.register_autograd(_backward, setup_context=_setup_context)
