"""``moefy.export_onnx``: a converted model ⇒ an ONNX file, checked against PyTorch.

    model, example inputs ──checked, run once eagerly──▶ (a typed error before any export)
          ──torch.export under no_grad (batch / sequence dims dynamic)──▶ ExportedProgram
          ──torch.onnx (dynamo) + moefy::expert_ffn lowered per target──▶ ONNX model
            (a PEER layer needs no lowering: its retrieval and experts trace to standard ops;
            nor do NeuronFFN / SparseLinear: their threshold selection traces as masked dense
            standard ops, the thresholds as initializers)
          ──declared input / output dims fixed where the program has a static size──▶
          ──onnx.checker (full) → shape inference → ONNX Runtime vs PyTorch, token by token
            (near-tie routing and scores at a threshold excused, counted), on the example
            inputs and on inputs of another
            token count──▶ file (written only when it passed)

All work happens in a hidden ``.moefy-export-<pid>-*`` folder beside the target, removed on
any exception (KeyboardInterrupt included); folders that killed exports left behind are
removed by the next export into that directory once their process is gone
(``moefy.onnx.workdir``). The comparison with PyTorch is ``moefy.onnx.validate``'s.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxscript.optimizer
import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_leaves

from moefy.errors import (
    ExportError,
    ExportInputError,
    ExportValidationError,
    MoefyError,
    TraceError,
    first_line,
)
from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN, SparseLinear
from moefy.layers.peer import PEER
from moefy.layers.shard import refuse_sharded
from moefy.onnx.lowering import moe_op_expressible, ort_expressible, translation_table
from moefy.onnx.validate import validate_in_onnxruntime
from moefy.onnx.workdir import check_target, publish, remove_stale_workdirs, workdir
from moefy.passes.trace import export_model, split_inputs

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
# Above this many parameter bytes the weights go to an external data file (protobuf's 2 GB cap)
EXTERNAL_DATA_BYTES = 1.8e9
# A work folder older than this whose process is gone was left by a killed export
STALE_AFTER_S = 3600.0


@dataclass
class ExportResult:
    """What ``export_onnx`` wrote and measured."""

    path: Path
    target: str
    moe_layers: int  # layers of experts: moefy.MoE, moefy.PEER and NeuronFFN
    opset: int
    kernel: str  # how MoE experts run; PEER layers are standard ops under every kernel
    max_diff: list[float] = field(default_factory=list)  # per validation input, relative
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)
    peer_layers: int = 0  # how many of moe_layers are PEER
    neuron_layers: int = 0  # how many of moe_layers are NeuronFFN (method="neuron")
    sparse_projections: int = 0  # SparseLinear layers beside them (not in moe_layers)


def export_onnx(model: nn.Module, path: str | os.PathLike, example_inputs=None, *,
                target: str = "ort", kernel: str | None = None, opset: int | None = None,
                dynamic: bool = True, validate: bool = True) -> ExportResult:
    """Export ``model`` to ONNX with every MoE lowered for ``target``.

    Args:
        model: a model holding ``moefy.MoE`` or ``moefy.PEER`` layers (a model with none
            exports as plain ``torch.onnx`` would, with a warning). A PEER layer exports as
            standard ops under every target: query ``Gemm`` (its eval BatchNorm folded in),
            sub-key ``MatMul``s, ``TopK`` (k static) per half, the k² candidate sums (``Add``
            with broadcast), ``TopK``, ids by integer ``Div`` / ``Mod``, ``GatherElements``,
            the weights (``Softmax`` / ``Sigmoid``), then ``Gather`` of each retrieved
            expert's rows, ``MatMul``s and a weighted sum, slots of weight 0 masked
            (``Where``); the tables are initializers. The model is exported in eval mode (its
            training flags are restored afterwards): a PEER's query BatchNorm with its
            running statistics, folded into plain ops (a note says so for a layer that was
            training). ``method="neuron"``'s NeuronFFN / SparseLinear layers export as their
            masked dense expression under every target and kernel: ``Abs``, ``Mul``,
            ``LessOrEqual``, ``Not``, ``Where``, ``MatMul``, thresholds as initializers.
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
            ``ExportToleranceError`` with the largest difference when outside the target's
            tolerance (``ExportShapeError`` when outputs differ in number or shape). Compared
            token by token: a token whose top-k router scores tie within float error in some
            MoE layer may go to other experts in ONNX Runtime, and one with a score within
            float error of a neuron layer's threshold may keep or drop that entry otherwise,
            so where an output keeps one row per token (e.g. (batch, sequence, hidden)) such
            a token's row is excused and counted in ``notes``; nothing else is.

    Errors (``moefy.errors``, all ``ExportError``; nothing is written when one is raised):
    ``ExportInputError`` for bad arguments or example inputs, or a model that does not run on
    them; ``ExportError`` itself for layers no target lowers and for the exporter failing;
    ``ExportValidationError`` (and the two above) when the result fails validation.

    >>> moe = MoE(16, 8, num_experts=4, top_k=2).eval()
    >>> import tempfile, os
    >>> out = export_onnx(moe, os.path.join(tempfile.mkdtemp(), "m.onnx"),
    ...                   (torch.randn(5, 16),))
    >>> out.max_diff[0] < 1e-4
    True
    """
    if not isinstance(model, nn.Module):
        raise ExportInputError(f"export_onnx: model must be a torch.nn.Module, got "
                               f"{type(model).__name__}")
    refuse_sharded(model, "export_onnx", ExportInputError)
    if target not in TARGETS:
        raise ExportInputError(f"export_onnx: target must be one of {TARGETS}, got {target!r}")
    kernel = KERNELS[target][0] if kernel is None else kernel
    if kernel not in KERNELS[target]:
        raise ExportInputError(f"export_onnx: target={target!r} has kernels "
                               f"{KERNELS[target]}, got kernel={kernel!r}")
    if opset is None:
        # the default, and where the exporter cannot translate something at it (opset 23's
        # Attention takes no multi-query attention, e.g. Falcon), its own default opset
        opsets = [DEFAULT_OPSET[target]] + ([None] if DEFAULT_OPSET[target] else [])
    elif not isinstance(opset, int) or isinstance(opset, bool) or opset < MIN_OPSET:
        raise ExportInputError(f"export_onnx: opset must be an int >= {MIN_OPSET} (the MoE "
                               f"lowerings use opset-{MIN_OPSET} ops), got {opset!r}")
    else:
        opsets = [opset]
    if not isinstance(path, str | os.PathLike):
        raise ExportInputError(f"export_onnx: path must be a str or os.PathLike ending in "
                               f".onnx, got {type(path).__name__}")
    path = Path(path)
    parent = check_target(path)
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    peers = [(name, m) for name, m in model.named_modules() if isinstance(m, PEER)]
    neurons = [(name, m) for name, m in model.named_modules()
               if isinstance(m, NeuronFFN | SparseLinear)]
    notes = (_check_lowerable(moes, target, kernel) + _check_peers(peers, kernel)
             + _check_neurons(neurons, kernel))
    if not moes and not peers and not neurons:
        warnings.warn(f"{type(model).__name__} holds no moefy.MoE, moefy.PEER or neuron "
                      "layer: exporting it as plain torch.onnx would", stacklevel=2)
    try:
        args, kwargs = split_inputs(model, example_inputs)
    except MoefyError as exc:  # the tracer's wording, under export's own error type
        raise ExportInputError(f"export_onnx: {exc}") from exc
    _check_example_inputs(args, kwargs)
    if dynamic:
        notes += _size_one_notes(args, kwargs)
    remove_stale_workdirs(parent, STALE_AFTER_S)

    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        # Gradients off: with them on, some models (BEiT's relative position bias, mT5) fail
        # inside the exporter's decomposition, and nothing here needs them.
        with torch.no_grad():
            _runs_eagerly(model, args, kwargs)
            with workdir(parent) as folder:
                result = _export(model, path, folder, args, kwargs, moes, notes, target,
                                 kernel, opsets, dynamic, validate, [m for _, m in neurons])
                ffns = sum(isinstance(m, NeuronFFN) for _, m in neurons)
                result.moe_layers += len(peers) + ffns
                result.peer_layers, result.neuron_layers = len(peers), ffns
                result.sparse_projections = len(neurons) - ffns
                publish(folder, parent)
        return result
    finally:
        for m, training in modes:
            m.training = training


def _export(model, path, folder, args, kwargs, moes, notes, target, kernel, opsets, dynamic,
            validate, neurons) -> ExportResult:
    """Export into ``folder`` and validate there; nothing is written beside it. ``opsets``:
    the opset to export at, then fallbacks tried when the exporter fails at it."""
    tmp = folder / path.name
    try:  # batch and sequence dims dynamic (auto_dynamic_shapes), the rest static
        ep = export_model(model, args, kwargs, dynamic=dynamic)
    except TraceError as exc:
        raise ExportError(f"export_onnx: {exc}") from exc
    big = sum(p.numel() * p.element_size() for p in model.parameters()) > EXTERNAL_DATA_BYTES
    for i, opset in enumerate(opsets):
        try:
            program = torch.onnx.export(
                ep, (), None, dynamo=True, opset_version=opset, optimize=False, verbose=False,
                custom_translation_table=translation_table(target, kernel))
            # the exporter's own optimize() also runs onnxscript's opset-23 fusions, whose
            # RotaryEmbedding keeps Hugging Face's batch-1 cos/sin caches, which ONNX Runtime
            # rejects for larger batches; constant folding and dead-code removal only
            onnxscript.optimizer.optimize_ir(program.model)
            _declare_static_dims(program.model, ep)
            program.save(str(tmp), external_data=big)
            break
        except Exception as exc:  # the exporter raises many types; report them as one
            if i + 1 < len(opsets):
                notes.append(f"the exporter failed at opset {opset} ({type(exc).__name__}: "
                             f"{first_line(exc)[:200]}); exported at "
                             f"{opsets[i + 1] or 'its default opset'} instead")
                continue
            raise ExportError(
                f"torch.onnx could not export {type(model).__name__} for target={target!r} "
                f"(opset {opset or 'default'}): {type(exc).__name__}: {first_line(exc)}\n"
                "The model runs eagerly on these inputs, so this is a limit of the exporter: "
                "try the other target, another opset, dynamic=False, or report the "
                "model.") from exc
    result = ExportResult(path, target, len(moes), _opset(tmp), kernel, notes=notes)
    if validate:
        result.tolerance = TOLERANCE[target]
        _check_onnx(tmp)
        result.max_diff, validation_notes = validate_in_onnxruntime(
            model, tmp, ep, args, kwargs, [m for _, m in moes], kernel=kernel,
            tolerance=result.tolerance, dynamic=dynamic, neurons=neurons)
        result.notes += validation_notes
    return result


def _check_example_inputs(args: tuple, kwargs: dict) -> None:
    """Tensors, or the plain Python values a forward() takes as flags; anything else (numpy
    arrays, lists of numbers, strings) is refused with what to pass instead."""
    leaves, _ = tree_flatten((args, kwargs))
    for leaf in leaves:
        if isinstance(leaf, np.ndarray):
            raise ExportInputError("export_onnx: example_inputs hold a numpy array; pass torch "
                                   "tensors (torch.from_numpy(a))")
        if not isinstance(leaf, torch.Tensor | bool | int | float | type(None)):
            raise ExportInputError(
                "export_onnx: example_inputs must be a tuple of positional tensors or a dict "
                f"of keyword tensors, found a {type(leaf).__name__} ({leaf!r:.60})")
    if not any(isinstance(leaf, torch.Tensor) for leaf in leaves):
        raise ExportInputError("export_onnx: example_inputs hold no tensor; pass the tensors "
                               "the model's forward() takes, e.g. (torch.randn(8, hidden),)")
    empty = [tuple(t.shape) for t in leaves if isinstance(t, torch.Tensor) and 0 in t.shape]
    if empty:
        raise ExportInputError(f"export_onnx: example input(s) of shape {empty} have a "
                               "dimension of size 0; pass example inputs with at least two "
                               "entries in every dimension that varies (batch, sequence)")


def _size_one_notes(args: tuple, kwargs: dict) -> list[str]:
    """A dimension of size 1 in the example is fixed to 1 in the export (torch.export
    specialises it): say so, since dynamic=True promised other sizes."""
    shapes = [tuple(t.shape) for t in tree_leaves((args, kwargs))
              if isinstance(t, torch.Tensor) and t.dim() and t.shape[0] == 1]
    if not shapes:
        return []
    return [f"example input(s) {shapes} have batch size 1: the export fixes that dimension to "
            "1; export with a batch of 2 or more to keep it dynamic"]


def _runs_eagerly(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """One forward before exporting: inputs the model cannot take (wrong dtype, width, names)
    fail here with the model's own words, not deep inside torch.export."""
    try:
        model(*args, **kwargs)
    except Exception as exc:  # anything the model raises means these inputs do not fit it
        shapes = [(tuple(t.shape), str(t.dtype).removeprefix("torch."))
                  for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        raise ExportInputError(
            f"export_onnx: {type(model).__name__} does not run on the example inputs "
            f"{shapes}: {type(exc).__name__}: {first_line(exc)}\nPass inputs that the model's "
            "forward() takes (dtype, shapes and names as in training or inference).") from exc


def _declare_static_dims(model, ep: torch.export.ExportedProgram) -> None:
    """Declare the graph's inputs and outputs with the sizes the exported program fixed.

    The exporter may name a specialised dimension symbolically (the hidden width came out as
    a dim called "16"): ONNX Runtime then accepts any width and the graph's reshapes silently
    re-chunk the tokens. A dimension is dynamic in the ONNX graph only where it is a symbol in
    the program."""
    import onnx_ir as ir
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes}
    for value in [*model.graph.inputs, *model.graph.outputs]:
        val = vals.get(value.name)
        if not isinstance(val, torch.Tensor):
            continue
        declared_dims = [None] * val.dim() if value.shape is None else list(value.shape.dims)
        if len(declared_dims) != val.dim():
            continue
        dims = []
        for declared, size in zip(declared_dims, val.shape, strict=True):
            if isinstance(size, int):
                dims.append(size)
            elif isinstance(declared, int) or (isinstance(declared, ir.SymbolicDim)
                                               and declared.value is not None):
                dims.append(declared)
            else:  # unknown in the graph, a symbol in the program: name it so
                dims.append(ir.SymbolicDim(str(size)))
        value.shape = ir.Shape(dims)


def _check_lowerable(moes: list[tuple[str, MoE]], target: str, kernel: str) -> list[str]:
    """Refuse, before anything is traced, the layers no lowering of ``target`` can express;
    return notes on approximations the lowering makes."""
    notes = []
    for name, m in moes:
        name = name or type(m).__name__
        if m.router_type == "expert_choice":
            raise ExportError(f"{name}: router='expert_choice' gives tokens a data-dependent "
                              "number of experts; no export target expresses it")
        cf = m.capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, int | float)
                               or not math.isfinite(cf) or cf <= 0):
            # inf is not read as "dropless": the user meant something, and None says it
            raise ExportInputError(f"{name}: capacity_factor must be None (dropless) or a "
                                   f"finite number > 0, got {cf!r}; set "
                                   "layer.capacity_factor = None for no capacity limit")
        if m.activation == "custom":
            # a custom activation module: the layer's forward runs the experts as plain torch
            # ops, which the exporter translates itself; no moefy lowering is involved
            notes.append(f"{name}: custom activation; its experts export as ordinary ONNX "
                         f"ops, not through kernel {kernel!r}")
            continue
        if m.w_in.dtype != torch.float32:
            raise ExportInputError(f"{name}: export_onnx lowers float32 experts, this layer is "
                                   f"{m.w_in.dtype}; export model.float()")
        if kernel == "moe_op":
            if m.router_type == "hash" and m.top_k > 1:
                raise ExportError(f"{name}: router='hash' with top_k > 1 may choose one expert "
                                  "twice for a token, which ONNX Runtime's MoE op cannot "
                                  "express; use kernel='loop' or target='standard'")
            why = (moe_op_expressible(m.hidden_size, m.output_size)
                   or ort_expressible(m.activation, m.gated))
            if why:
                raise ExportError(f"{name}: kernel='moe_op' cannot express {why}; use "
                                  "kernel='loop' or target='standard'")
            if m.activation == "gelu" and not m.gated:
                notes.append(f"{name or type(m).__name__}: ONNX Runtime's MoE computes GELU in "
                             "its tanh form; this layer uses erf-GELU (difference per "
                             "activation ≤ 5e-4)")
    return notes


def _check_peers(peers: list[tuple[str, PEER]], kernel: str) -> list[str]:
    """Refuse, before anything is traced, PEER layers the export cannot validate; return
    notes saying how the PEER layers export."""
    if not peers:
        return []
    for name, m in peers:
        if m.down.dtype != torch.float32:
            raise ExportInputError(f"{name or 'PEER'}: export_onnx exports float32 PEER layers, "
                                   f"this one is {m.down.dtype}; export model.float()")
    names = ", ".join(name or type(m).__name__ for name, m in peers)
    notes = [f"{len(peers)} PEER layer(s) ({names}): product-key retrieval (TopK, k static) "
             "and the retrieved experts (Gather, weighted sum) exported as standard ONNX ops"
             + ("; kernel 'moe_op' (com.microsoft.MoE) applies to moefy.MoE layers only"
                if kernel == "moe_op" else "")]
    # export_onnx exports the eval-mode function (as for every module); for PEER that means
    # the query BatchNorm with its running statistics, not the batch's
    notes += [f"{name or type(m).__name__}: in training mode; exported in eval mode (query "
              "BatchNorm with its running statistics, folded into plain ops)"
              for name, m in peers if m.training and m.query_norm is not None]
    return notes


def _check_neurons(neurons: list[tuple[str, NeuronFFN | SparseLinear]],
                   kernel: str) -> list[str]:
    """Refuse, before anything is traced, neuron layers the export cannot validate; return a
    note saying how they export. Their selection is a threshold per score, not a top-k over
    experts, which ONNX Runtime's MoE op cannot express: under every kernel they are the
    masked dense expression of ``moefy.runtime.neuron`` in standard ops."""
    if not neurons:
        return []
    for name, m in neurons:
        if isinstance(m, NeuronFFN) and m.selection == "sequence":
            raise ExportInputError(
                f"{name or 'NeuronFFN'}: selection='sequence' picks its neurons from the "
                "prompt and keeps them between calls (the decoding steps read that set), "
                "which one stateless ONNX graph cannot express; export a conversion with "
                "selection='input' or 'gate'")
        weight = m.weight_t if isinstance(m, SparseLinear) else m.w_in_t
        if weight.dtype != torch.float32:
            raise ExportInputError(f"{name or type(m).__name__}: export_onnx exports float32 "
                                   f"neuron layers, this one is {weight.dtype}; export "
                                   "model.float()")
    ffns = sum(isinstance(m, NeuronFFN) for _, m in neurons)
    return [f"{ffns} NeuronFFN and {len(neurons) - ffns} SparseLinear layer(s): threshold "
            "selection exported as standard ONNX ops (Abs, Mul, LessOrEqual, Not, Where, "
            "MatMul; the thresholds are initializers), which read every weight"
            + ("; kernel 'moe_op' (com.microsoft.MoE) applies to moefy.MoE layers only"
               if kernel == "moe_op" else "")]


def _opset(path: Path) -> int:
    import onnx
    model = onnx.load(str(path), load_external_data=False)
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _check_onnx(path: Path) -> None:
    """Full ``onnx.checker`` and shape inference."""
    import onnx
    try:
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes_path(str(path), str(path.with_suffix(".inferred")))
        path.with_suffix(".inferred").unlink()
    except Exception as exc:  # checker and inference raise their own types
        raise ExportValidationError(f"the exported model fails ONNX's checks: {exc}") from exc
