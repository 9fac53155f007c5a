"""Activation statistics from calibration data, streamed (memory bounded by d_ff² per FFN).

    calibration batches → exported graph, run node by node → each FFN's hidden activation h
      → per FFN: tokens seen, how often each neuron is active (h > 0), co-activation counts
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx._pytree as fx_pytree

from moefy.passes.find_ffn import FFNMatch, _strip
from moefy.passes.trace import split_inputs


@dataclass
class FFNStats:
    tokens: int
    active: torch.Tensor  # (d_ff,) tokens on which each neuron was active
    coactive: torch.Tensor  # (d_ff, d_ff) tokens on which both neurons were active

    def correlation(self) -> torch.Tensor:
        """Co-activation normalised by each neuron's activity (cosine of activity vectors)."""
        norm = self.active.clamp_min(1).sqrt()
        return self.coactive / norm[:, None] / norm[None, :]


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: dict[str, str]):
        super().__init__(gm)
        self.wanted = wanted  # hidden-activation node name -> FFN key
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n):
        out = super().run_node(n)
        if n.name in self.wanted:
            self.values[self.wanted[n.name]] = out
        return out


@torch.no_grad()
def collect_stats(model: torch.nn.Module, ep: torch.export.ExportedProgram,
                  matches: list[FFNMatch], calibration_data: Iterable) -> dict[str, FFNStats]:
    """Run ``calibration_data`` (an iterable of inputs: tuples, dicts or tensors, e.g. a
    DataLoader) through the exported graph and accumulate each FFN's activation statistics,
    keyed by the name of the FFN's output node."""
    gm = ep.module()
    spec = gm.graph._codegen.pytree_info.in_spec
    wanted = {_strip(m.down.input)[0].name: m.output.name for m in matches}
    stats: dict[str, FFNStats] = {}
    for batch in calibration_data:
        args, kwargs = split_inputs(model, batch)
        recorder = _Recorder(gm, wanted)
        recorder.run(*fx_pytree.tree_flatten_spec((args, kwargs), spec))
        for name, h in recorder.values.items():
            active = (h.reshape(-1, h.shape[-1]) > 0).float()  # (tokens, d_ff)
            s = stats.get(name)
            if s is None:
                d = active.shape[1]
                s = stats[name] = FFNStats(0, torch.zeros(d), torch.zeros(d, d))
            s.tokens += active.shape[0]
            s.active += active.sum(0)
            s.coactive.addmm_(active.t(), active)
    if not stats:
        raise ValueError("calibration_data yielded no batches")
    return stats
