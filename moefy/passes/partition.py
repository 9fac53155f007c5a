"""Neuron partitions for splits: the FFN's d_ff neurons ⇒ G equal groups.

- contiguous: neurons 0..n-1, n..2n-1, ...
- random: a seeded permutation cut in G pieces
- kmeans: balanced k-means on the L2-normalised input-weight rows (gate and up rows
  concatenated for gated FFNs): neurons that respond to similar inputs share an expert
- coactivation: balanced k-means on the rows of the calibration co-activation matrix:
  neurons that fire on the same tokens share an expert
"""

from __future__ import annotations

import numpy as np
import torch


def partition_neurons(w_in: torch.Tensor, w_gate: torch.Tensor | None, groups: int, method: str,
                      generator: torch.Generator, iterations: int = 15,
                      coactivation: torch.Tensor | None = None) -> list[torch.Tensor]:
    """``groups`` disjoint sorted index tensors of equal size covering ``range(d_ff)``.

    ``coactivation`` (d_ff, d_ff), normalised co-activation from calibration data, is needed
    by ``method="coactivation"``. Runs on the CPU whatever the weights' device (the balanced
    assignment is a NumPy loop); the indices are CPU tensors, which index any device."""
    w_in = w_in.detach().cpu()
    w_gate = None if w_gate is None else w_gate.detach().cpu()
    n = w_in.shape[0]
    if n % groups:
        raise ValueError(f"{n} neurons do not split into {groups} equal groups")
    size = n // groups
    if method == "contiguous":
        return list(torch.arange(n).view(groups, size))
    if method == "random":
        perm = torch.randperm(n, generator=generator)
        return [p.sort().values for p in perm.view(groups, size)]
    if method == "kmeans":
        feats = w_in if w_gate is None else torch.cat([w_gate, w_in], dim=1)
        return _balanced_kmeans(feats.float(), groups, generator, iterations)
    if method == "coactivation":
        if coactivation is None:
            raise ValueError("partition='coactivation' needs calibration statistics")
        # Each neuron described by whom it fires with: neurons that fire together share an
        # expert (a balanced cut of the co-activation graph, by k-means on its rows).
        return _balanced_kmeans(coactivation.float().cpu(), groups, generator, iterations)
    raise ValueError(f"unknown partition {method!r}")


def _balanced_assign(scores: np.ndarray, size: int) -> np.ndarray:
    """Each row to its best column with room left; most decided rows first."""
    n, g = scores.shape
    prefs = np.argsort(-scores, axis=1)  # (n, g)
    top2 = np.take_along_axis(scores, prefs[:, :2], axis=1) if g > 1 else scores
    margin = top2[:, 0] - (top2[:, 1] if g > 1 else 0)
    room = np.full(g, size)
    assign = np.empty(n, dtype=np.int64)
    for row in np.argsort(-margin):
        for col in prefs[row]:
            if room[col]:
                room[col] -= 1
                assign[row] = col
                break
    return assign


def _balanced_kmeans(feats: torch.Tensor, groups: int, generator: torch.Generator,
                     iterations: int) -> list[torch.Tensor]:
    x = torch.nn.functional.normalize(feats, dim=1)  # (n, D)
    n = x.shape[0]
    size = n // groups
    centres = x[torch.randperm(n, generator=generator)[:groups]].clone()  # (G, D)
    assign = None
    for _ in range(iterations):
        scores = (x @ centres.t()).numpy()  # cosine similarity (n, G)
        new = _balanced_assign(scores, size)
        if assign is not None and np.array_equal(new, assign):
            break
        assign = new
        index = torch.from_numpy(assign)
        sums = torch.zeros_like(centres).index_add_(0, index, x)
        centres = torch.nn.functional.normalize(sums, dim=1)
    index = torch.from_numpy(assign)
    return [torch.nonzero(index == g).flatten() for g in range(groups)]
