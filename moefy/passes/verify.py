"""Verification: the dense model's outputs before the change ⇒ the converted model checked
against them.

    dense model, example inputs ──RunDense──▶ reference outputs (recorded before any change)
    converted model ──Verify──▶ every expert active == dense; as configured == dense where the
                                configuration preserves the function, else finite outputs
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from moefy.config import MoEConfig
from moefy.errors import ConversionError, VerificationError, first_line
from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN, SparseLinear, every_row_kept
from moefy.layers.peer import PEER
from moefy.layers.tokens import token_ids
from moefy.passes.base import Pass, PassResult
from moefy.passes.peer import all_experts
from moefy.passes.stages import Converted, Reference, Request, Statistics

_log = logging.getLogger("moefy.convert")


class RunDense(Pass):
    """dense model, example inputs ⇒ its outputs, recorded before anything changes (so that
    verification compares with the dense model even in place). Weights not loaded (meta),
    empty example tensors, inputs the model does not take and, for hash routers, the lack of
    token ids are errors here."""

    def __init__(self, keep: bool = True):
        self.keep = keep

    def call(self, s: Request) -> PassResult:
        if any(p.is_meta for p in s.model.parameters()):
            raise ConversionError("the model's weights are on the meta device (not loaded): "
                                  "load or materialise them (model.to_empty(...) and a "
                                  "state_dict) before converting")
        empty = [tuple(t.shape) for t in tree_leaves((s.args, s.kwargs))
                 if isinstance(t, torch.Tensor) and t.numel() == 0]
        if empty:
            raise ConversionError(f"example input(s) of shape {empty} are empty: pass example "
                                  "inputs with at least two entries in every dimension that "
                                  "varies (batch, sequence)")
        if s.config.router == "hash":
            token_ids(s.args, s.kwargs)  # raises now, not on the converted model's first call
        try:
            dense_outputs = outputs(s.model, s.args, s.kwargs)
        except Exception as exc:  # whatever the model raises: these inputs do not fit it
            raise ConversionError(
                f"{type(s.model).__name__} does not run on the example inputs "
                f"({describe(s.args, s.kwargs)}): {type(exc).__name__}: {first_line(exc)}. "
                "Pass example_inputs matching its forward() (a tuple of tensors or a dict of "
                "keyword tensors, of the dtypes it expects).") from exc
        if not self.keep:
            return PassResult(False, output=Reference(None))
        bad = [i for i, t in enumerate(dense_outputs)
               if t.is_floating_point() and not torch.isfinite(t).all()]
        if bad:
            raise VerificationError(
                f"the dense model's output(s) {bad} hold NaN or Inf on the example inputs, so "
                "the conversion cannot be verified against it: pass example_inputs on which "
                "the dense model is finite, or verify=False. Nothing was changed.")
        return PassResult(False, {"outputs": len(dense_outputs)},
                          Reference(tuple(dense_outputs)))


class Verify(Pass):
    """converted model ⇒ checked against the dense outputs recorded before the change.

    Always: with every routed expert active (top_k = E, no capacity limit, softmax-or-sum
    weights), the experts must reproduce the dense model — this checks the carving of the
    weights whatever the routing. Then, where the configuration preserves the function by
    design (upcycle or a split with top_k = E, with a router that gives each token weights
    summing to one over whole copies and drops nothing), the model exactly as configured.
    Otherwise its outputs are checked finite and the log says what was checked."""

    needs = (Reference, Statistics, Converted)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled

    def call(self, s: Request, reference: Reference, stats: Statistics,
             converted: Converted) -> PassResult:
        if not self.enabled:
            return PassResult(False)
        target = converted.target
        moes = [m for m in target.modules() if isinstance(m, MoE)]
        peers = [m for m in target.modules() if isinstance(m, PEER)]
        sparse = [m for m in target.modules() if isinstance(m, (NeuronFFN, SparseLinear))]
        refitted = (s.config.fit_steps > 0 and s.config.method == "split" and bool(stats.stats)
                    or any(isinstance(m, NeuronFFN) and m.selection == "static"
                           and m.conversion.get("share_keep", 1.0) < 1 for m in sparse))
        # a layer fit (fit_steps) retrains the experts, a static neuron set drops neurons and
        # refits down: no longer a carve
        if not refitted:
            with (_every_expert_active(moes), _every_peer_expert_active(peers),
                  every_row_kept(sparse)):
                _compare(reference.outputs, outputs(target, s.args, s.kwargs),
                         "with every expert active")
        why_not = _not_preserving(s.config) or _peer_not_preserving(peers)
        got = outputs(target, s.args, s.kwargs)
        if why_not is None:
            _compare(reference.outputs, got, "as configured")
            checked = "exact: outputs equal the dense model's as configured"
        else:
            bad = [i for i, t in enumerate(got)
                   if t.is_floating_point() and not torch.isfinite(t).all()]
            if bad:
                raise VerificationError(
                    f"the converted model's output(s) {bad} hold NaN or Inf on the example "
                    "inputs while the dense model's are finite")
            checked = (f"not function-preserving by design ({why_not}): checked that "
                       + ("" if refitted else "the experts reproduce the dense model with "
                          "every expert active, and that ")
                       + "the routed model's outputs are finite")
        _log.info("verification: %s", checked)
        for m in moes + peers + sparse:
            m.conversion = m.conversion.with_(verified=checked)
        # what the model computes is unchanged; each layer's record now holds the outcome
        return PassResult(False, {"outputs_checked": len(got),
                                  "layers_recorded": len(moes) + len(peers) + len(sparse)})


def _not_preserving(config: MoEConfig) -> str | None:
    """Why the configured routing does not reproduce the dense FFN, or None when it does."""
    if config.capacity_factor is not None:
        return "a capacity factor drops assignments"
    if config.router == "expert_choice":
        return "expert choice gives some tokens fewer experts"
    if config.method == "peer":
        return None  # per layer: _peer_not_preserving
    if config.method == "neuron":
        active = 1.0 if config.active is None else config.active
        if active >= 1:
            return None
        if config.selection == "static":
            return f"active={active}: each FFN keeps that share of its neurons, down refit"
        return f"active={active}: calibrated thresholds read that share of the projection weights"
    if config.method == "split":
        if config.top_k < config.num_experts:
            return f"top_k={config.top_k} of {config.num_experts} experts"
        if config.router in ("topp", "hash"):
            return f"router={config.router!r} may leave experts out"
        return None
    if config.granularity > 1 and config.router in ("topp", "hash", "sigmoid"):
        return (f"router={config.router!r} with granularity={config.granularity} may select "
                "part of a copy")
    return None


def _peer_not_preserving(peers: list[PEER]) -> str | None:
    """Why converted PEER layers do not reproduce their dense FFNs, or None when each
    retrieves all of its N experts (heads · top_k = N: each head owns a block of rows)."""
    short = [m for m in peers if m.heads * m.top_k < m.num_experts]
    if not short:
        return None
    m = short[0]
    return (f"PEER retrieves heads·top_k = {m.heads * m.top_k} of {m.num_experts} "
            "single-neuron experts per token")


@contextlib.contextmanager
def _every_peer_expert_active(peers: list[PEER]):
    """Each PEER layer temporarily evaluates all N experts at weight 1 straight from its
    tables (no retrieval): a converted FFN's carving must then give the dense FFN."""
    try:
        for m in peers:
            m.forward = (lambda layer: lambda x, mask=None: all_experts(layer, x))(m)
        yield
    finally:
        for m in peers:
            m.__dict__.pop("forward", None)


@contextlib.contextmanager
def _every_expert_active(moes: list[MoE]):
    """Each MoE temporarily routes every token to every expert: softmax weights (sum for
    splits), no capacity limit, compensation off (nothing is skipped)."""
    saved = [(m, m.router_type, m.top_k, m.capacity_factor) for m in moes]
    try:
        for m in moes:
            m.router_type = "softmax"
            m.capacity_factor = None
            m.top_k = m.num_experts
        yield
    finally:
        for m, router, k, cf in saved:
            m.router_type, m.top_k, m.capacity_factor = router, k, cf


def outputs(model: nn.Module, args: tuple, kwargs: dict) -> list[torch.Tensor]:
    """The model's output tensors in eval mode, without gradients; every module's training
    flag is restored afterwards."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            return [t for t in tree_leaves(model(*args, **kwargs))
                    if isinstance(t, torch.Tensor)]
    finally:
        for m, training in modes:
            m.training = training


def _compare(ref: list[torch.Tensor], got: list[torch.Tensor], how: str,
             rtol: float = 1e-5) -> None:
    if len(ref) != len(got):
        raise VerificationError(f"the converted model returns {len(got)} tensors, the dense "
                                f"model {len(ref)}")
    for i, (r, g) in enumerate(zip(ref, got, strict=True)):
        if not r.is_floating_point():
            continue
        if r.shape != g.shape:
            raise VerificationError(f"output {i} has shape {tuple(g.shape)}, the dense model's "
                                    f"{tuple(r.shape)}")
        # relative to the output's largest magnitude; half precision rounds each sum anew
        tol = rtol * 10 if r.dtype in (torch.float32, torch.float64) else 3e-2
        scale = r.abs().max().float().clamp_min(1e-12)
        err = ((g.float() - r.float()).abs().max() / scale).item()
        if not err <= tol:
            raise VerificationError(
                f"output {i} differs from the dense model {how}: max difference {err:.2e} "
                f"relative to its largest value (tolerance {tol:.0e} for {r.dtype}). This is a "
                "moefy bug: please report it with the model; verify=False skips the check.")


def describe_batch(batch) -> str:
    if isinstance(batch, dict):
        return describe((), batch)
    if isinstance(batch, (tuple, list)):
        return describe(tuple(batch), {})
    if isinstance(batch, torch.Tensor):
        return describe((batch,), {})
    return f"a {type(batch).__name__}"


def describe(args: tuple, kwargs: dict) -> str:
    """Shapes and dtypes of the tensors among inputs, for error messages."""
    def one(t) -> str:
        return (f"{tuple(t.shape)} {str(t.dtype).replace('torch.', '')}"
                if isinstance(t, torch.Tensor) else type(t).__name__)

    parts = [one(a) for a in args] + [f"{k}={one(v)}" for k, v in kwargs.items()
                                      if isinstance(v, torch.Tensor)]
    return ", ".join(parts) or "no tensors"
