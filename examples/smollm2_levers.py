"""Where a split of SmolLM2-135M loses its quality: ceilings of each routing lever, per layer.

Every FFN of SmolLM2 computes h = silu(gate(x)) * up(x), y = down(h). A conversion keeps, per
token, only some of h's 1536 neurons (a fraction f). This script masks h in the dense model
(a simulation: no MoE is built, nothing is timed) to measure, on held-out text, how much
perplexity each way of choosing costs:

- neuron oracle: each token keeps its f·1536 neurons of largest |h| — the ceiling of any
  per-token routing (no router can know h without computing it);
- gate signal: the largest |silu(gate(x))| (the "free" router signal of gated FFNs);
- expert oracle, E experts: neurons grouped into E equal experts by co-activation on
  calibration text (moefy's partition="coactivation"), each token keeps the f·E experts of
  largest Σ|h| — the ceiling of an E-expert MoE's router; "+ mean" puts each skipped neuron's
  mean calibration value in its place (moefy's compensate="mean");
- per layer: the neuron oracle at 25% in one layer at a time (the sensitivity a per-layer
  budget would follow).

Calibration: installed packages' docstrings; evaluation: the standard library's (disjoint).
About 10 minutes on 2 cores.

    python examples/smollm2_levers.py [--tokens 4096]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import sentences  # noqa: E402

from moefy import evaluate  # noqa: E402
from moefy.io.pretrained import load_pretrained  # noqa: E402
from moefy.passes.partition import partition_neurons  # noqa: E402

SEQ = 256


class Masker:
    """Replaces each LlamaMLP's forward by one that masks h as ``self`` says."""

    def __init__(self, model):
        self.kind, self.frac, self.layers, self.experts, self.mean = None, 1.0, set(), None, False
        self.collected: dict[int, list[torch.Tensor]] = {}
        self.groups: dict[int, dict[int, torch.Tensor]] = {}  # E -> layer -> (E, size)
        self.means: dict[int, torch.Tensor] = {}
        for i, layer in enumerate(model.model.layers):
            layer.mlp.forward = self._forward(layer.mlp, i)

    def _forward(self, mlp, i):
        def forward(x):
            h = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
            if self.kind == "collect":
                self.collected.setdefault(i, []).append(h.detach().reshape(-1, h.shape[-1]))
            elif self.kind is not None and i in self.layers:
                h = self._mask(mlp, x, h, i)
            return mlp.down_proj(h)
        return forward

    def _mask(self, mlp, x, h, i):
        if self.kind == "experts":
            groups = self.groups[self.experts][i]  # (E, size)
            score = h.abs()[..., groups].sum(-1)  # (..., E)
            k = max(1, round(self.frac * groups.shape[0]))
            keep_e = score >= score.topk(k, dim=-1).values[..., -1:]
            keep = torch.zeros_like(h, dtype=torch.bool)
            keep[..., groups.reshape(-1)] = keep_e.repeat_interleave(groups.shape[1], dim=-1)
        else:
            score = h.abs() if self.kind == "neurons" else mlp.act_fn(mlp.gate_proj(x)).abs()
            k = max(1, round(self.frac * h.shape[-1]))
            keep = score >= score.topk(k, dim=-1).values[..., -1:]
        kept = h * keep
        return kept + (~keep) * self.means[i] if self.mean else kept


def perplexity(model, seqs: torch.Tensor) -> float:
    """Perplexity on the rows of ``seqs``, 8 at a time (``moefy.evaluate.perplexity``)."""
    return evaluate.perplexity(model, [{"input_ids": batch} for batch in seqs.split(8)])


def chunks(tokenizer, text: str, tokens: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(tokens, ids.numel()) // SEQ
    return ids[: n * SEQ].view(n, SEQ)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens (4096)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pre = load_pretrained("smollm2")
    model, tok = pre.model, pre.tokenizer
    held_out = chunks(tok, " ".join(sentences("stdlib", 2000)), args.tokens)
    calibration = chunks(tok, " ".join(sentences("packages", 1000)), 4096)
    masker = Masker(model)
    dense = perplexity(model, held_out)
    print(f"SmolLM2-135M-Instruct, {held_out.numel()} held-out tokens: dense perplexity "
          f"{dense:.2f}")

    masker.kind = "collect"
    with torch.no_grad():
        for batch in calibration.split(8):
            model(input_ids=batch)
    layers = len(model.model.layers)
    generator = torch.Generator().manual_seed(0)
    for i, layer in enumerate(model.model.layers):
        h = torch.cat(masker.collected[i])
        masker.means[i] = h.mean(0)
        a = h.abs()
        a = a / (a.norm(dim=0, keepdim=True) + 1e-6)
        co = a.t() @ a  # normalised co-activation
        for E in (16, 64, 192, 768):
            parts = partition_neurons(layer.mlp.up_proj.weight, None, E, "coactivation",
                                      generator, iterations=5, coactivation=co)
            masker.groups.setdefault(E, {})[i] = torch.stack(parts)
    masker.collected.clear()

    def ratio(kind, frac, layer_set, experts=None, mean=False) -> float:
        masker.kind, masker.frac, masker.layers = kind, frac, layer_set
        masker.experts, masker.mean = experts, mean
        try:
            return perplexity(model, held_out) / dense
        finally:
            masker.kind = None

    every = set(range(layers))
    rows = [("neuron oracle (ceiling of any router)", dict(kind="neurons")),
            ("gate signal |silu(gate x)|", dict(kind="gates"))]
    for E in (16, 64, 192, 768):
        rows.append((f"expert oracle, E={E} ({1536 // E} neurons each)",
                     dict(kind="experts", experts=E)))
        if E in (16, 64):
            rows.append((f"expert oracle, E={E} + mean compensation",
                         dict(kind="experts", experts=E, mean=True)))
    print(f"\n{'perplexity / dense, every layer':48s} {'50% active':>11s} {'25% active':>11s}")
    for name, how in rows:
        cells = [ratio(frac=f, layer_set=every, **how) for f in (0.5, 0.25)]
        print(f"{name:48s} {cells[0]:>10.3f}x {cells[1]:>10.3f}x", flush=True)

    sens = [ratio("neurons", 0.25, {i}) for i in range(layers)]
    print("\nper layer: perplexity / dense with only that layer at 25% (neuron oracle)")
    for start in range(0, layers, 10):
        print("  " + " ".join(f"L{i}:{sens[i]:.3f}" for i in range(start, min(start + 10,
                                                                             layers))))
    excess = sum(s - 1 for s in sens)
    print(f"sum of the per-layer excesses {excess:.3f} (all layers together compound them)")
    print(f"\n{time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
