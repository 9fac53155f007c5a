"""Tracing: dense nn.Module ⇒ torch.export graph(s) whose nodes know their modules.

``torch.export`` (non-strict) of the whole model. Nodes carry ``meta["nn_module_stack"]`` and
parameter placeholders map to parameter names through the graph signature — together they tie
every matched node back to module and parameter names. Hugging Face models get example inputs
built from their config when none are given, and ``use_cache=False`` (a cache object in the
output breaks export). A model that does not export as a whole (data-dependent control flow
at the top) is traced as its largest submodules that do.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from moefy.errors import TraceError

ExampleInputs = tuple | dict


def hf_example_inputs(model: nn.Module, tokens: int = 8) -> dict[str, torch.Tensor]:
    """Inputs for a Hugging Face model built from its config (batch 2 — a batch of 1 would be
    specialised into the graph — of ``tokens`` tokens)."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise TraceError(
            f"{type(model).__name__} is not a Hugging Face model and no example_inputs were "
            "given: pass example_inputs=(tensor, ...) or a dict of keyword tensors")
    if main == "input_ids":
        vocab = int(getattr(config, "vocab_size", 100) or 100)
        ids = torch.randint(0, min(vocab, 1000), (2, tokens))
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if getattr(config, "is_encoder_decoder", False):
            inputs["decoder_input_ids"] = ids.clone()
        return inputs
    if main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        return {"pixel_values": torch.randn(2, channels, size, size)}
    raise TraceError(
        f"cannot build example inputs for {type(model).__name__} (main input {main!r}); "
        "pass example_inputs")


def split_inputs(model: nn.Module, example_inputs: ExampleInputs | None
                 ) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) to call ``model`` with; HF defaults and ``use_cache=False`` filled in."""
    if example_inputs is None:
        example_inputs = hf_example_inputs(model)
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, tuple):
        args, kwargs = example_inputs, {}
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        raise TraceError(
            "example_inputs must be a tuple of positional tensors or a dict of keyword tensors, "
            f"got {type(example_inputs).__name__}")
    config = getattr(model, "config", None)
    takes_use_cache = "use_cache" in inspect.signature(model.forward).parameters
    if takes_use_cache and hasattr(config, "use_cache") and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """``dynamic_shapes`` for torch.export marking every dimension of every tensor input
    Dim.AUTO (export keeps dynamic what the model allows and specialises the rest)."""
    def auto(t):
        return {i: torch.export.Dim.AUTO for i in range(t.dim())} if isinstance(
            t, torch.Tensor) else None

    if not kwargs:
        return tuple(tree_map(auto, a) for a in args)
    # with keyword inputs, dynamic_shapes is keyed by forward()'s parameter names
    bound = inspect.signature(model.forward).bind_partial(*args, **kwargs).arguments
    return {name: tree_map(auto, value) for name, value in bound.items()}


def export_model(model: nn.Module, args: tuple, kwargs: dict) -> torch.export.ExportedProgram:
    """dense model ⇒ ExportedProgram (ATen graph, nn_module_stack on every node)."""
    # Grad mode stays on: under no_grad some modules (nn.TransformerEncoderLayer) switch to a
    # fused fast path that hides their FFN inside one opaque op. Every tensor dimension is
    # Dim.AUTO, so the graph (graph mode's result, calibration runs) takes other batch and
    # sequence sizes wherever the model allows it.
    dynamic = auto_dynamic_shapes(model, args, kwargs)
    try:
        return torch.export.export(model, args, kwargs=kwargs, strict=False,
                                   dynamic_shapes=dynamic)
    except Exception as exc:  # export raises many types; all mean "cannot trace"
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}\n"
            "Check that the model runs on the example inputs; pass example_inputs matching "
            "its forward() (a tuple of tensors or a dict of keyword tensors).") from exc


@dataclass
class TracedUnit:
    """A module of the model and its exported graph; ``path`` "" is the whole model."""

    path: str
    module: nn.Module
    ep: torch.export.ExportedProgram


def record_calls(model: nn.Module, args: tuple, kwargs: dict,
                 paths: set[str] | None = None) -> dict[str, tuple[tuple, dict]]:
    """Run ``model`` once (eagerly, no grad) and return each module's first (args, kwargs)."""
    calls: dict[str, tuple[tuple, dict]] = {}
    handles = []

    def hook_for(path):
        def hook(module, a, k):
            calls.setdefault(path, (a, dict(k)))
        return hook

    for path, module in model.named_modules():
        if paths is None or path in paths:
            handles.append(module.register_forward_pre_hook(hook_for(path), with_kwargs=True))
    try:
        with torch.no_grad():
            model(*args, **kwargs)
    except Exception as exc:  # any failure here means the inputs do not fit the model
        raise TraceError(f"{type(model).__name__} does not run on the example inputs: "
                         f"{type(exc).__name__}: {exc}") from exc
    finally:
        for h in handles:
            h.remove()
    return calls


def trace_units(model: nn.Module, args: tuple, kwargs: dict) -> list[TracedUnit]:
    """The whole model as one exported graph; when it does not export, the largest
    submodules that do (top-down), each with the inputs it received on the example inputs."""
    try:
        return [TracedUnit("", model, export_model(model, args, kwargs))]
    except TraceError as whole:
        error = whole
    calls = record_calls(model, args, kwargs)
    units: list[TracedUnit] = []
    for path, module in model.named_modules():
        if not path or path not in calls or any(path.startswith(u.path + ".") for u in units):
            continue
        if next(module.parameters(), None) is None:
            continue
        try:
            ep = export_model(module, *calls[path])
        except TraceError:
            continue
        units.append(TracedUnit(path, module, ep))
    if not units:
        raise TraceError(f"{error}\nNo submodule exported on its own either.") from error
    return units
