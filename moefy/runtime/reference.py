"""The naive oracle: one token at a time, its selected experts gathered and applied directly.

Slow on purpose and obviously right; every fast path is tested against it.
"""

from __future__ import annotations

import torch

from moefy.activations import get_activation
from moefy.runtime.experts import ExpertWeights


def reference_ffn(x: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor,
                  ew: ExpertWeights) -> torch.Tensor:
    """y[t] = sum_j weights[t, j] * expert(indices[t, j])(x[t]), accumulated in float32+."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    act = get_activation(ew.activation).fn

    def take(t: torch.Tensor | None, sel: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, sel).to(acc)

    rows = []
    for t in range(x.shape[0]):
        sel = indices[t].long()  # (k,)
        xt = x[t].to(acc)  # (H,)
        w_in, w_gate, w_out = take(ew.w_in, sel), take(ew.w_gate, sel), take(ew.w_out, sel)
        a = torch.einsum("kih,h->ki", w_in, xt)  # (k, I)
        if ew.b_in is not None:
            a = a + take(ew.b_in, sel)
        if w_gate is None:
            h = act(a)
        else:
            g = torch.einsum("kih,h->ki", w_gate, xt)
            if ew.b_gate is not None:
                g = g + take(ew.b_gate, sel)
            h = act(g) * a
        out = torch.einsum("koi,ki->ko", w_out, h)  # (k, O)
        if ew.b_out is not None:
            out = out + take(ew.b_out, sel)
        rows.append((weights[t].to(acc)[:, None] * out).sum(0))
    if not rows:
        return x.new_zeros(x.shape[0], ew.output_size)
    return torch.stack(rows).to(x.dtype)
