"""Tracing: dense nn.Module ⇒ torch.export graph(s) whose nodes know their modules.

``torch.export`` (non-strict) of the whole model. Nodes carry ``meta["nn_module_stack"]`` and
parameter placeholders map to parameter names through the graph signature — together they tie
every matched node back to module and parameter names. Hugging Face models get example inputs
built from their config when none are given (token ids, images, Whisper's log-mel frames,
raw audio; ``decoder_input_ids`` for encoder-decoders), and ``use_cache=False`` (a cache object
in the output breaks export). A model that does not export as a whole (data-dependent control
flow at the top) is traced as its largest submodules that do, each with the inputs it received
(``record_calls``).

Only batch and sequence dimensions are ever dynamic (``auto_dynamic_shapes``); finding FFNs
needs none, so the first export is static (several times faster) and the graphs that graph mode
returns, or that calibration batches run through, are exported with them dynamic.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.utils._pytree import tree_map

from moefy.errors import TraceError, first_line

ExampleInputs = tuple | dict


def hf_example_inputs(model: nn.Module, tokens: int = 8) -> dict[str, torch.Tensor]:
    """Inputs for a Hugging Face model built from its config (batch 2 — a batch of 1 would be
    specialised into the graph — of ``tokens`` tokens): token ids, images, log-mel
    spectrograms or raw audio by the model's main input, plus ``decoder_input_ids`` for
    encoder-decoders."""
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        raise TraceError(
            f"{type(model).__name__} is not a Hugging Face model and no example_inputs were "
            "given: pass example_inputs=(tensor, ...) or a dict of keyword tensors")
    vocab = int(getattr(config, "vocab_size", 100) or 100)
    ids = torch.randint(0, min(vocab, 1000), (2, tokens))
    if main == "input_ids":
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    elif main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = size if isinstance(size, int) else size[0]
        channels = getattr(config, "num_channels", 3)
        inputs = {"pixel_values": torch.randn(2, channels, size, size)}
    elif main == "input_features" and hasattr(config, "num_mel_bins") and hasattr(
            config, "max_source_positions"):
        # Whisper: (batch, mel bins, frames); its encoder takes exactly two frames per
        # position (a stride-2 convolution, then max_source_positions positions)
        frames = 2 * int(config.max_source_positions)
        inputs = {"input_features": torch.randn(2, int(config.num_mel_bins), frames)}
    elif main == "input_values" and hasattr(config, "conv_kernel"):
        # raw audio (wav2vec2, HuBERT): enough samples for ``tokens`` frames after the
        # feature encoder's strided convolutions
        samples = tokens
        for kernel, stride in reversed(list(zip(config.conv_kernel, config.conv_stride,
                                                 strict=True))):
            samples = (samples - 1) * stride + kernel
        inputs = {"input_values": torch.randn(2, samples)}
    else:
        raise TraceError(
            f"cannot build example inputs for {type(model).__name__} (main input {main!r}); "
            "pass example_inputs")
    if getattr(config, "is_encoder_decoder", False):
        inputs["decoder_input_ids"] = ids.clone()
    return inputs


def split_inputs(model: nn.Module, example_inputs: ExampleInputs | None
                 ) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) to call ``model`` with; HF defaults and ``use_cache=False`` filled in."""
    if example_inputs is None:
        example_inputs = hf_example_inputs(model)
    if isinstance(example_inputs, Mapping):  # a dict, or a tokenizer's BatchEncoding
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


def batch_inputs(model: nn.Module, batch, where: str, error: type[Exception] = TraceError
                 ) -> tuple[tuple, dict[str, Any]]:
    """``split_inputs`` for one batch of a data iterable (calibration, distillation, report
    data): a DataLoader's list of collated tensors counts as a tuple; anything but a tuple,
    dict or tensor raises ``error`` naming ``where`` (e.g. "distill: batch 3")."""
    if isinstance(batch, list):  # a DataLoader collates a dataset of tuples into lists
        batch = tuple(batch)
    if not isinstance(batch, (tuple, Mapping, torch.Tensor)):
        raise error(f"{where} is a {type(batch).__name__}; each batch must be a tuple of "
                    "positional tensors, a dict of keyword tensors, or a tensor")
    return split_inputs(model, batch)


# Inputs whose every dimension is batch or sequence (token ids and their masks), and
# float inputs that hold a sequence of samples rather than features.
_TOKEN_INPUTS = {"input_values"}


def _dynamic_dims(name: str | None, t: torch.Tensor) -> set[int]:
    """Dimensions of input ``t`` that really vary between calls: batch and sequence.

    Integer and boolean tensors (token ids, masks, positions) vary in every dimension.
    Float tensors are data: (B, F) and (T, F) vary in the first, (B, S, H) in the first two,
    and anything with 4 or more dimensions (images: B, C, H, W) only in the batch. Whisper's
    spectrogram (B, mel, frames) keeps its mel bins and frame count (the encoder takes one
    fixed length)."""
    if not t.is_floating_point() and not t.is_complex():
        return set(range(t.dim()))
    if name in _TOKEN_INPUTS:
        return set(range(min(t.dim(), 2)))
    if name == "input_features" or t.dim() >= 4:
        return {0} if t.dim() else set()
    return set(range(min(t.dim(), 2 if t.dim() == 3 else 1)))


def auto_dynamic_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """``dynamic_shapes`` for torch.export: the batch and sequence dimensions of every tensor
    input are Dim.AUTO (export keeps them dynamic where the model allows it), every other
    dimension (hidden width, an image's channels, height and width, mel bins) is static.

    Marking everything AUTO made exports slow (MaxViT-like image models: minutes instead of
    a second) and gave image models a dynamic height and width that they do not honour."""
    def dims(name):
        def spec(t):
            if not isinstance(t, torch.Tensor):
                return None
            # a size-1 dimension is specialised by export anyway (0/1 specialisation)
            dynamic = [i for i in sorted(_dynamic_dims(name, t)) if t.shape[i] != 1]
            return {i: torch.export.Dim.AUTO for i in dynamic} or None
        return spec

    if not kwargs:
        return tuple(tree_map(dims(None), a) for a in args)
    # with keyword inputs, dynamic_shapes is keyed by forward()'s parameter names; keywords
    # that land in a ``**kwargs`` parameter count as parameters of their own (see
    # ``explicit_signature``)
    bound = _bind(model, args, kwargs)
    return {name: tree_map(dims(name), value) for name, value in bound.items()}


def _bind(model: nn.Module, args: tuple, kwargs: dict) -> dict[str, Any]:
    """forward()'s arguments by name, with ``**kwargs`` entries as top-level names."""
    signature = inspect.signature(model.forward)
    bound = dict(signature.bind_partial(*args, **kwargs).arguments)
    for name, param in signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and name in bound:
            bound.update(bound.pop(name))
    return bound


@contextlib.contextmanager
def explicit_signature(model: nn.Module, args: tuple, kwargs: dict):
    """Within the block, ``model.forward`` names every keyword of this call as a parameter.

    torch.export (2.13) mis-pairs inputs with ``dynamic_shapes`` when a keyword lands in a
    ``**kwargs`` parameter (Hugging Face layers take ``use_cache`` so): it lists the keyword
    both inside ``kwargs`` and on its own, and fails with "Must provide a tree_name". The
    call itself, and so the exported program's input structure, stays the same."""
    signature = inspect.signature(model.forward)
    var_kw = [p for p in signature.parameters.values()
              if p.kind is inspect.Parameter.VAR_KEYWORD]
    extra = [k for k in kwargs if k not in signature.parameters]
    if not var_kw or not extra:
        yield
        return
    original = model.forward
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    params += [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in extra]

    def forward(*a, **k):
        return original(*a, **k)

    forward.__signature__ = signature.replace(parameters=params)
    own = vars(model).get("forward")  # a forward the user set on the instance, if any
    model.forward = forward  # an instance attribute, undone below in every case
    try:
        yield
    finally:
        if own is None:
            del model.forward
        else:
            model.forward = own


def export_model(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
                 ) -> torch.export.ExportedProgram:
    """dense model ⇒ ExportedProgram (ATen graph, nn_module_stack on every node).

    ``dynamic``: batch and sequence dimensions stay symbolic (``auto_dynamic_shapes``), so
    the graph runs on other batch and sequence sizes (graph mode's result, calibration).
    A static export is 2-4x faster and is all that finding and planning FFNs need."""
    # Grad mode stays on: under no_grad some modules (nn.TransformerEncoderLayer) switch to a
    # fused fast path that hides their FFN inside one opaque op.
    try:
        with explicit_signature(model, args, kwargs):
            shapes = auto_dynamic_shapes(model, args, kwargs) if dynamic else None
            return torch.export.export(model, args, kwargs=kwargs, strict=False,
                                       dynamic_shapes=shapes)
    except Exception as exc:  # export raises many types; all mean "cannot trace"
        raise TraceError(
            f"torch.export could not trace {type(model).__name__}: {type(exc).__name__}: "
            f"{first_line(exc)}\n"
            "Check that the model runs on the example inputs; pass example_inputs matching "
            "its forward() (a tuple of tensors or a dict of keyword tensors).") from exc


@dataclass
class TracedUnit:
    """A module of the model and its exported graph; ``path`` "" is the whole model."""

    path: str
    module: nn.Module
    ep: torch.export.ExportedProgram
    dynamic: bool = True  # batch and sequence symbolic (else the example's sizes)


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


def trace_units(model: nn.Module, args: tuple, kwargs: dict, dynamic: bool = True
                ) -> list[TracedUnit]:
    """The whole model as one exported graph; when it does not export, the largest
    submodules that do (top-down), each with the inputs it received on the example inputs."""
    try:
        return [TracedUnit("", model, export_model(model, args, kwargs, dynamic), dynamic)]
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
            ep = export_model(module, *calls[path], dynamic)
        except TraceError:
            continue
        units.append(TracedUnit(path, module, ep, dynamic))
    if not units:
        raise TraceError(f"{error}\nNo submodule exported on its own either.") from error
    return units
