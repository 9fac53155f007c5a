"""``moefy.export_onnx``: a converted model ⇒ an ONNX file, checked against PyTorch.

    model ──torch.export (every input dim Dim.AUTO)──▶ ExportedProgram
          ──torch.onnx (dynamo) + moefy::expert_ffn lowered per target──▶ ONNX model
          ──onnx.checker (full) → shape inference → ONNX Runtime vs PyTorch on the example
            inputs and on inputs of another token count──▶ file (written only when it passed)
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxscript.optimizer
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_leaves, tree_unflatten

from moefy.errors import MoefyError
from moefy.layers.moe import MoE
from moefy.onnx.lowering import ort_expressible, translation_table
from moefy.passes.trace import auto_dynamic_shapes, split_inputs
from moefy.runtime.session import Session

TARGETS = ("ort", "standard")
KERNELS = {"ort": ("loop", "moe_op"), "standard": ("buffers",)}  # first: the default
# Max |ONNX Runtime − PyTorch| relative to the output's largest magnitude, per target.
TOLERANCE = {"ort": 1e-4, "standard": 1e-4}
# Opset 23 turns scaled_dot_product_attention into ONNX's Attention op, which ONNX Runtime
# (>= 1.23) runs as one fused kernel: all-MiniLM-L6-v2 at 32 x 128 runs ~10% faster than at
# the exporter's default (20 in torch 2.13), dense and MoE alike. Target "standard" keeps the
# exporter's default, which TensorRT's parser reads.
DEFAULT_OPSET = {"ort": 23, "standard": None}
MIN_OPSET = 18  # the lowerings are written against opset 18


class ExportError(MoefyError):
    """The model cannot be exported as asked, or the export failed validation."""


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and measured."""

    path: Path
    target: str
    moe_layers: int
    opset: int
    kernel: str
    max_diff: list[float] = field(default_factory=list)  # per validation input, relative
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs=None, *,
                target: str = "ort", kernel: str | None = None, opset: int | None = None,
                dynamic: bool = True, validate: bool = True) -> ExportResult:
    """Export ``model`` to ONNX with every MoE lowered for ``target``.

    Args:
        model: a model holding ``moefy.MoE`` layers (a model with none exports as plain
            ``torch.onnx`` would, with a warning).
        path: the .onnx file to write; nothing is left there when export or validation fails.
        example_inputs: a tuple of positional tensors or a dict of keyword tensors
            (optional for Hugging Face models).
        target: "ort" — for ONNX Runtime (data-dependent shapes allowed); "standard" —
            standard ONNX ops only, static per-expert buffers (capacity from the token count
            and the layer's ``capacity_factor``; dropless when None), in the subset TensorRT
            parses. Router and always-on part are ordinary nodes in both.
        kernel: how target "ort" runs the experts. "loop" (default): per expert, NonZero
            picks its assignments, Gather → MatMul → activation → × weight → MatMul, then one
            Gather by the inverse permutation and a sum over the k slots; only routed work,
            any activation, exact GELU (ONNX Runtime's BiasGelu); on its CPU EP faster than
            the fused kernel for batches of thousands of tokens, slower for a few tokens
            through many experts (``benchmarks/bench_onnx.py``).
            "moe_op": one ``com.microsoft.MoE`` node per layer (ONNX Runtime's grouped
            kernel, the one to try on its CUDA EP); GELU in tanh form, SwiGLU only among gated
            activations.
            Target "standard" has one kernel, "buffers".
        opset: ONNX opset, 18 or newer (default: 23 for target "ort", whose Attention op
            ONNX Runtime runs fused; the exporter's default for "standard").
        dynamic: keep batch / sequence / token axes dynamic (else the example's sizes).
        validate: full ``onnx.checker``, shape inference, then ONNX Runtime against PyTorch on
            the example inputs and on inputs whose dynamic dimensions (those the export kept
            dynamic: batch, sequence, tokens) differ by a few entries; raises
            ``ExportError`` with the largest difference when outside the target's tolerance.

    >>> moe = MoE(16, 8, num_experts=4, top_k=2).eval()
    >>> import tempfile, os
    >>> out = export_onnx(moe, os.path.join(tempfile.mkdtemp(), "m.onnx"),
    ...                   (torch.randn(5, 16),))
    >>> out.max_diff[0] < 1e-4
    True
    """
    if target not in TARGETS:
        raise ValueError(f"export_onnx: target must be one of {TARGETS}, got {target!r}")
    kernel = KERNELS[target][0] if kernel is None else kernel
    if kernel not in KERNELS[target]:
        raise ValueError(f"export_onnx: target={target!r} has kernels {KERNELS[target]}, got "
                         f"kernel={kernel!r}")
    if opset is None:
        opset = DEFAULT_OPSET[target]
    elif not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ValueError(f"export_onnx: opset must be an int >= {MIN_OPSET} (the MoE lowerings "
                         f"use opset-{MIN_OPSET} ops), got {opset!r}")
    path = Path(path)
    if path.suffix != ".onnx":
        raise ValueError(f"export_onnx: path should end in .onnx, got {str(path)!r}")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportError(f"cannot write {path}: {parent} is not a writable directory")
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    notes = _check_lowerable(moes, target, kernel)
    if not moes:
        warnings.warn(f"{type(model).__name__} holds no moefy.MoE layer: exporting it as plain "
                      "torch.onnx would", stacklevel=2)
    args, kwargs = split_inputs(model, example_inputs)

    modes = [(m, m.training) for m in model.modules()]
    workdir = Path(tempfile.mkdtemp(prefix=".moefy-export-", dir=parent))
    try:
        model.eval()
        tmp = workdir / path.name
        dynamic_shapes = auto_dynamic_shapes(model, args, kwargs) if dynamic else None
        try:
            ep = torch.export.export(model, args, kwargs=kwargs, strict=False,
                                     dynamic_shapes=dynamic_shapes)
            big = sum(p.numel() * p.element_size() for p in model.parameters()) > 1.8e9
            program = torch.onnx.export(ep, (), None, dynamo=True, opset_version=opset,
                                        custom_translation_table=translation_table(target, kernel),
                                        optimize=False, verbose=False)
            # the exporter's own optimize() also runs onnxscript's opset-23 fusions, whose
            # RotaryEmbedding keeps Hugging Face's batch-1 cos/sin caches, which ONNX Runtime
            # rejects for larger batches; constant folding and dead-code removal only
            onnxscript.optimizer.optimize_ir(program.model)
            program.save(str(tmp), external_data=big)
        except Exception as exc:  # the exporter raises many types; report them as one
            raise ExportError(f"torch.onnx could not export {type(model).__name__} for "
                              f"target={target!r}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}") from exc
        result = ExportResult(path, target, len(moes), _opset(tmp), kernel, notes=notes)
        if validate:
            result.tolerance = TOLERANCE[target]
            # ONNX Runtime's MoE computes GELU in its tanh form: check the lowering against
            # the model with that GELU (exact up to rounding), then measure the drift from
            # the erf-GELU model it stands for (a routing decision near a tie can flip).
            _check_onnx(tmp)
            session = Session(tmp, device="cpu")
            other = _other_size(ep, args, kwargs) if dynamic else None
            cases = [(args, kwargs)] + ([other] if other is not None else [])
            tanh = [m for _, m in moes if kernel == "moe_op" and m.activation == "gelu"]
            with _activation(tanh, "gelu_tanh"):
                result.max_diff = _compare(model, session, cases, result.tolerance)
            if tanh:
                drift = _compare(model, session, cases, float("inf"))
                result.notes.append(f"drift from the erf-GELU model on the validation inputs: "
                                    f"{max(drift):.1e} relative to the largest output")
        for f in workdir.iterdir():  # only now does anything appear at ``path``
            os.replace(f, parent / f.name)
        return result
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        for m, training in modes:
            m.training = training


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


def _check_lowerable(moes: list[tuple[str, MoE]], target: str, kernel: str) -> list[str]:
    notes = []
    for name, m in moes:
        if m.router_type == "expert_choice":
            raise ExportError(f"{name}: router='expert_choice' gives tokens a data-dependent "
                              "number of experts; no export target expresses it")
        if m.w_in.dtype != torch.float32:
            raise ExportError(f"{name or type(m).__name__}: export_onnx lowers float32 "
                              f"experts, this layer is {m.w_in.dtype}; export model.float()")
        if kernel == "moe_op":
            if m.router_type == "hash" and m.top_k > 1:
                raise ExportError(f"{name}: router='hash' with top_k > 1 may choose one expert "
                                  "twice for a token, which ONNX Runtime's MoE op cannot "
                                  "express; use kernel='loop' or target='standard'")
            why = ort_expressible(m.activation, m.gated)
            if why:
                raise ExportError(f"{name}: kernel='moe_op' cannot express {why}; use "
                                  "kernel='loop' or target='standard'")
            if m.activation == "gelu" and not m.gated:
                notes.append(f"{name or type(m).__name__}: ONNX Runtime's MoE computes GELU in "
                             "its tanh form; this layer uses erf-GELU (difference per "
                             "activation ≤ 5e-4)")
    return notes


def _opset(path: Path) -> int:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


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


def _check_onnx(path: Path) -> None:
    """Full ``onnx.checker`` and shape inference."""
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred")))
        path.with_suffix(".inferred").unlink()
    except Exception as exc:  # checker and inference raise their own types
        raise ExportError(f"the exported model fails ONNX's checks: {exc}") from exc


def _compare(model: nn.Module, session: Session, cases: list[tuple[tuple, dict]],
             tol: float) -> list[float]:
    """ONNX Runtime vs PyTorch on each (args, kwargs): the largest difference relative to the
    largest output, per case; ``ExportError`` above ``tol``."""
    diffs = []
    for a, k in cases:
        with torch.no_grad():
            ref = [t for t in tree_leaves(model(*a, **k)) if isinstance(t, torch.Tensor)]
        feeds = dict(zip(session.input_names,
                         [t for t in tree_leaves((a, k)) if isinstance(t, torch.Tensor)],
                         strict=False))
        got = list(session.run(feeds).values())
        if len(got) != len(ref):
            raise ExportError(f"the ONNX model returns {len(got)} outputs, PyTorch {len(ref)}")
        worst = 0.0
        for r, g in zip(ref, got, strict=True):
            r = r.detach().float().numpy()
            g = np.asarray(g, dtype=np.float32)
            if r.shape != g.shape:
                raise ExportError(f"output shape {g.shape} from ONNX Runtime, {r.shape} from "
                                  "PyTorch")
            scale = max(float(np.abs(r).max()), 1e-12)
            worst = max(worst, float(np.abs(g - r).max()) / scale)
        if not worst <= tol:
            shapes = [tuple(t.shape) for t in tree_leaves((a, k)) if isinstance(t, torch.Tensor)]
            raise ExportError(f"ONNX Runtime differs from PyTorch by {worst:.2e} (relative to "
                              f"the largest output), above the tolerance {tol:.0e}; inputs "
                              f"{shapes}")
        diffs.append(worst)
    return diffs
