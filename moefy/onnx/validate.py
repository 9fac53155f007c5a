"""ONNX Runtime vs PyTorch, token by token: how ``export_onnx`` validates an exported graph.

    model, exported program, example inputs, .onnx file
          ──inputs of another token count (every dynamic dim grown by a few entries)──▶ cases
          ──ONNX Runtime and PyTorch per case; each MoE layer's routing margin per token,
            each neuron layer's nearest score to its threshold per token──▶
          ──|ORT − PyTorch| relative to the largest output; a near-tie token's row excused──▶
            (largest difference per case, notes) or ExportToleranceError / ExportShapeError

A token whose top-k router scores tie within float error (``NEAR_TIE``) may go to other experts
in ONNX Runtime than in PyTorch; so may a token with a score of a neuron layer (``NeuronFFN``,
``SparseLinear``) within float error of its threshold (``NEAR_THRESHOLD``) keep or drop that
entry otherwise. Where an output keeps one row per token such a row is excused and counted in
the notes. Nothing else is.
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from moefy.errors import (
    ExportShapeError,
    ExportToleranceError,
    ExportValidationError,
    SessionError,
)
from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN, SparseLinear
from moefy.runtime.session import Session

# A token whose top-k router scores tie within this (relative to its largest |score|) may be
# routed to other experts by ONNX Runtime than by PyTorch through float rounding alone
NEAR_TIE = 1e-4
# A score within this of its threshold (relative to the threshold) may be kept by one runtime
# and dropped by the other: the score itself is computed alike (Abs, Mul in float32), from an
# input that earlier layers' rounding moved by ~1e-7 of its scale. Exact ties are common, not
# rare: a threshold is a quantile of calibration scores, so a token seen there (e.g. at the
# first layer, whose input is its embedding alone) scores exactly the threshold again. Tight,
# because a wide model has thousands of scores per token: a loose margin would excuse them all.
NEAR_THRESHOLD = 1e-5


def validate_in_onnxruntime(model: nn.Module, path, ep: torch.export.ExportedProgram,
                            args: tuple, kwargs: dict, moes: list[MoE], *, kernel: str,
                            tolerance: float, dynamic: bool,
                            neurons: list[NeuronFFN | SparseLinear] = ()
                            ) -> tuple[list[float], list[str]]:
    """Run the graph at ``path`` in ONNX Runtime against ``model`` on the example inputs and,
    with ``dynamic``, on inputs of another size: the largest difference per input (relative
    to the largest output) and notes. Raises ``ExportToleranceError`` above ``tolerance``,
    ``ExportShapeError`` on outputs that differ in number or shape, ``ExportValidationError``
    when ONNX Runtime cannot load or run the graph. ``moes``: the model's MoE layers, whose
    near-tie tokens are excused; ``kernel``: the one they were lowered with; ``neurons``: the
    model's NeuronFFN / SparseLinear layers, whose tokens with a score at a threshold are
    excused.

    >>> import os, tempfile
    >>> from moefy.onnx.export import export_onnx
    >>> from moefy.passes.trace import export_model
    >>> moe, x = MoE(16, 8, num_experts=4, top_k=2).eval(), torch.randn(5, 16)
    >>> out = export_onnx(moe, os.path.join(tempfile.mkdtemp(), "m.onnx"), (x,), validate=False)
    >>> diffs, notes = validate_in_onnxruntime(moe, out.path, export_model(moe, (x,), {}),
    ...                                        (x,), {}, [moe], kernel=out.kernel,
    ...                                        tolerance=1e-4, dynamic=True)
    >>> max(diffs) < 1e-4
    True
    """
    # ONNX Runtime's MoE computes GELU in its tanh form: check the lowering against
    # the model with that GELU (exact up to rounding), then measure the drift from
    # the erf-GELU model it stands for (a routing decision near a tie can flip).
    other = _other_size(ep, args, kwargs) if dynamic else None
    cases = [(args, kwargs)] + ([other] if other is not None else [])
    tanh = [m for m in moes if kernel == "moe_op" and m.activation == "gelu"]
    try:
        session = Session(path, device="cpu")
        names = _input_names(ep)
        with _activation(tanh, "gelu_tanh"):
            max_diff, notes = _compare(model, session, names, cases, tolerance, moes,
                                       neurons)
        if tanh:
            drift, _ = _compare(model, session, names, cases, float("inf"), moes, neurons)
            notes.append(f"drift from the erf-GELU model on the validation inputs: "
                         f"{max(drift):.1e} relative to the largest output")
    except SessionError as exc:  # ONNX Runtime cannot load or run what was exported
        raise ExportValidationError(f"the exported model does not run in ONNX Runtime: "
                                    f"{exc}") from exc
    return max_diff, notes


@contextlib.contextmanager
def _activation(moes: list[MoE], name: str):
    saved = [m.activation for m in moes]
    try:
        for m in moes:
            m.activation = name
        yield
    finally:
        for m, a in zip(moes, saved, strict=True):
            m.activation = a


def _other_size(ep: torch.export.ExportedProgram, args: tuple,
                kwargs: dict) -> tuple[tuple, dict] | None:
    """The same inputs with every dimension the exported program kept dynamic grown by a few
    entries (shrunk where its range allows no growth): other batch and sequence lengths, or
    other token counts. None when no dimension is dynamic."""
    leaves, spec = tree_flatten((args, kwargs))
    users = set(ep.graph_signature.user_inputs)
    shapes = [n.meta["val"].shape for n in ep.graph.nodes
              if n.op == "placeholder" and n.name in users]
    tensors = [i for i, t in enumerate(leaves) if isinstance(t, torch.Tensor)]
    if len(shapes) != len(tensors):
        return None
    grown = False
    for i, shape in zip(tensors, shapes, strict=True):
        t = leaves[i]
        for axis, size in enumerate(shape):
            expr = getattr(getattr(size, "node", None), "expr", None)
            bounds = ep.range_constraints.get(expr)
            if bounds is None:  # specialised, or derived from another dimension
                continue
            n = t.shape[axis]
            step = min(3, n)
            if n + step <= bounds.upper:
                t = torch.cat([t, t.narrow(axis, 0, step)], dim=axis)
            elif n - step >= max(bounds.lower, 1) and step < n:
                t = t.narrow(axis, 0, n - step)
            else:
                continue
            grown = True
        leaves[i] = t
    return tree_unflatten(leaves, spec) if grown else None


def _input_names(ep: torch.export.ExportedProgram) -> list[str]:
    """The graph input name of each tensor input, in the order of the inputs' tensor leaves
    (the ONNX graph names its inputs after these placeholders; it may drop unused ones)."""
    users = set(ep.graph_signature.user_inputs)
    return [n.name for n in ep.graph.nodes if n.op == "placeholder" and n.name in users
            and isinstance(n.meta.get("val"), torch.Tensor)]


def _compare(model: nn.Module, session: Session, names: list[str],
             cases: list[tuple[tuple, dict]], tol: float, moes: list[MoE],
             neurons=()) -> tuple[list[float], list[str]]:
    """ONNX Runtime vs PyTorch on each (args, kwargs), token by token: per case the largest
    difference relative to the largest output, and notes; ``ExportToleranceError`` above
    ``tol``. A token above ``tol`` whose routing nearly tied in an MoE layer it passed, or
    with a score at a neuron layer's threshold (``_near_ties``), is excused and counted in
    the notes instead: float rounding alone can send it to other experts (keep or drop that
    entry) in ONNX Runtime. Nothing else is excused."""
    diffs, excused, excused_diff = [], 0, 0.0
    for a, k in cases:
        with torch.no_grad(), _near_tie_tokens(moes, neurons) as near:
            ref = [t for t in tree_leaves(model(*a, **k)) if isinstance(t, torch.Tensor)]
        near_tie = _near_ties(near)  # (token grid) bool, or None
        tensors = [t for t in tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
        # by name: an input the graph dropped (unused by the model) must not shift the others
        feeds = dict(zip(names, tensors, strict=True)) if len(names) == len(tensors) else dict(
            zip(session.input_names, tensors, strict=False))
        got = list(session.run(feeds, ignore_extra=True).values())  # the graph may drop some
        if len(got) != len(ref):
            raise ExportShapeError(f"the ONNX model returns {len(got)} outputs, PyTorch "
                                   f"{len(ref)}")
        worst, skipped = 0.0, None
        for r, g in zip(ref, got, strict=True):
            r = r.detach().float().numpy()
            g = np.asarray(g, dtype=np.float32)
            if r.shape != g.shape:
                raise ExportShapeError(f"output shape {g.shape} from ONNX Runtime, {r.shape} "
                                       "from PyTorch")
            if r.size == 0:  # zero tokens: equal shapes are all there is to compare
                continue
            diff = _relative_diff(r, g)
            # one row per token (e.g. (batch, sequence, hidden) on a (batch, sequence) grid):
            # a near-tie token's row may differ (other experts give finite values, never NaN);
            # an output without such rows (pooled) may not
            if near_tie is not None and r.ndim > near_tie.ndim and (
                    r.shape[:near_tie.ndim] == near_tie.shape):
                rows = diff.reshape(*near_tie.shape, -1).max(-1)
                skip = near_tie & (rows > tol) & np.isfinite(rows)
                skipped = skip if skipped is None else skipped | skip
                excused_diff = max(excused_diff, float(rows[skip].max(initial=0.0)))
                diff = rows[~skip]
            worst = max(worst, float(diff.max(initial=0.0)))
        if not worst <= tol:
            shapes = [tuple(t.shape) for t in tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
            raise ExportToleranceError(
                f"ONNX Runtime differs from PyTorch by {worst:.2e} (relative to the largest "
                f"output), above the tolerance {tol:.0e}; inputs {shapes}. Tokens whose top-k "
                "router scores nearly tie (or with a score at a threshold) are excused only in "
                "outputs with one row per token; this difference is elsewhere: report it")
        excused += 0 if skipped is None else int(skipped.sum())
        diffs.append(worst)
    what = " or ".join(
        ([f"whose top-k router scores tie within {NEAR_TIE:.0e} of their scale"] if moes
         else []) + ([f"with a score within {NEAR_THRESHOLD:.0e} of a neuron layer's "
                      "threshold"] if neurons else []))
    notes = [f"validation excused {excused} token(s) {what} (float rounding can route such a "
             "token to other experts, or keep an entry the other drops, in ONNX Runtime than "
             f"in PyTorch): they differ by up to {excused_diff:.1e}; every other token is "
             "within the tolerance"] if excused else []
    return diffs, notes


def _relative_diff(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    """|got - ref| relative to the largest finite |ref|; 0 where both hold the same infinity
    or both NaN, inf where only one is NaN (NaN would compare as within any tolerance)."""
    finite = np.abs(ref[np.isfinite(ref)])
    scale = max(float(finite.max(initial=0.0)), 1e-12)
    with np.errstate(invalid="ignore"):  # inf - inf
        diff = np.nan_to_num(np.abs(got - ref), nan=np.inf)
    diff[(got == ref) | (np.isnan(got) & np.isnan(ref))] = 0.0
    return diff / scale


@contextlib.contextmanager
def _near_tie_tokens(moes: list[MoE], neurons=()):
    """Within the block, every forward of a layer in ``moes`` or ``neurons`` appends (its
    token grid: the input's shape without the hidden dim, per token whether it came near
    another choice: ``_routing_margin`` <= ``NEAR_TIE``, ``_threshold_margin`` <=
    ``NEAR_THRESHOLD``) to the yielded list. The hooks are removed on exit."""
    calls = []

    def record(layer, args, kwargs, output):
        x = args[0] if args else kwargs["x"]
        flat = x.reshape(-1, x.shape[-1])
        near = (_routing_margin(layer, flat) <= NEAR_TIE if isinstance(layer, MoE)
                else _threshold_margin(layer, flat) <= NEAR_THRESHOLD)
        calls.append((tuple(x.shape[:-1]), near))
    hooks = [m.register_forward_hook(record, with_kwargs=True) for m in [*moes, *neurons]]
    try:
        yield calls
    finally:
        for h in hooks:
            h.remove()


def _threshold_margin(layer: NeuronFFN | SparseLinear, x: torch.Tensor) -> torch.Tensor:
    """How near each token (x: (T, H)) came to keeping or dropping an entry otherwise, (T,):
    the smallest |score − threshold| over the layer's selections, relative to the threshold
    (the scores as the layer computes them: ``|x_j|·scale_j``; a NeuronFFN's second selection
    on its neurons as computed from the kept inputs). inf where a threshold keeps everything
    (< 0); NaN scores are kept by both runtimes, so they count as far."""
    def margin(scores: torch.Tensor, threshold: torch.Tensor) -> torch.Tensor:
        t = float(threshold)
        if t < 0 or not scores.numel():
            return torch.full(scores.shape[:1], math.inf)
        gap = (scores.float() - t).abs().nan_to_num(nan=math.inf)
        return gap.amin(-1) / max(t, torch.finfo(torch.float32).tiny)

    if isinstance(layer, SparseLinear):
        return margin(layer.scores(x), layer.threshold)
    first = margin(x.abs() * layer.in_scale, layer.in_threshold)
    a = layer.hidden(x)  # (T, F): h (selection "input") or act(g) ("gate")
    return torch.minimum(first, margin(a.abs() * layer.h_scale, layer.h_threshold))


def _routing_margin(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """How near each token (x: (T, H)) came to other experts, (T,): the gap between the k-th
    and (k+1)-th of the scores the router ranks (logits; σ(logits) + selection_bias for
    "sigmoid"), relative to the token's largest |score|. "topp" also orders the k and cuts
    them where the probability mass reaches ``top_p``: every gap among them and the distance
    of the mass to ``top_p`` count. inf where no score decides (hash, k = E). Under a capacity
    factor a token's drops depend on the tokens before it: their smallest margin counts."""
    if moe.router_type == "hash":
        return torch.full(x.shape[:1], math.inf)
    logits = moe.select(x).logits.float()  # (T, E)
    scores = logits
    if moe.router_type == "sigmoid":
        scores = torch.sigmoid(logits) + moe.selection_bias
    ranked, order = scores.sort(-1, descending=True)  # (T, E)
    gaps = ranked[:, :-1] - ranked[:, 1:]  # (T, E - 1)
    k = moe.top_k
    gaps = gaps[:, :k] if moe.router_type == "topp" else gaps[:, k - 1:k]
    margin = torch.cat([gaps, torch.full_like(ranked[:, :1], math.inf)], 1).amin(-1)
    margin = margin / ranked.abs().amax(-1).clamp_min(torch.finfo(torch.float32).tiny)
    if moe.router_type == "topp":
        probs = torch.softmax(logits, -1).gather(1, order[:, :k])  # (T, k)
        mass_before = probs.cumsum(-1) - probs
        margin = torch.minimum(margin, (mass_before - moe.top_p).abs().amin(-1))
    if moe.capacity_factor is not None and margin.numel():
        margin = torch.cummin(margin, 0).values  # first come, first served
    return margin


def _near_ties(calls: list[tuple[tuple, torch.Tensor]]) -> np.ndarray | None:
    """Which tokens came near another choice in any layer (``_near_tie_tokens``), on the
    token grid every layer saw ((batch, sequence) in a transformer); None without such
    layers, or when layers saw different grids (which token is which is unknown then)."""
    if not calls or len({grid for grid, _ in calls}) != 1:
        return None
    near = torch.stack([n for _, n in calls]).any(0)  # (T,), near in some layer
    return near.reshape(calls[0][0]).numpy()
