"""Activation statistics from calibration data, streamed (memory bounded by d_ff² per FFN).

    calibration batches → each traced unit's inputs → its exported graph, node by node
      → each FFN's hidden activation h
      → per FFN: tokens seen, how often each neuron is active (h > 0), co-activation counts
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.fx._pytree as fx_pytree

from moefy.passes.find_ffn import FFNMatch, _strip


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
def collect_stats(ep: torch.export.ExportedProgram, matches: list[FFNMatch],
                  calls: Iterable[tuple[tuple, dict]], stats: dict | None = None,
                  prefix: str = "") -> dict[str, FFNStats]:
    """Run each (args, kwargs) of ``calls`` through the exported graph and accumulate each
    FFN's activation statistics into ``stats``, keyed ``prefix:output-node-name``."""
    gm = ep.module()
    spec = gm.graph._codegen.pytree_info.in_spec
    wanted = {_strip(m.down.input)[0].name: f"{prefix}:{m.output.name}" for m in matches}
    stats = {} if stats is None else stats
    for args, kwargs in calls:
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
    return stats
