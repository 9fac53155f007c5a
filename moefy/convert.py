"""``moefy.convert``: dense model ⇒ MoE model, as one explicit pipeline of passes."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Iterable

import torch
import torch.nn as nn

from moefy.config import MoEConfig
from moefy.errors import (
    AlreadyConvertedError,
    ConversionError,
)
from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN, SparseLinear
from moefy.layers.peer import PEER
from moefy.passes import trace
from moefy.passes.calibrate import Calibrate
from moefy.passes.distill import DistillForBudget
from moefy.passes.neuron import AllocateBudget, ReadHeadByRows, SparsifyProjections
from moefy.passes.neuron_static import PruneStatic
from moefy.passes.plan import (
    CheckBeforeChange,
    FindFFNs,
    MakeDynamic,
    PlanRewrite,
    Select,
    TraceHosts,
    TraceUnits,
)
from moefy.passes.stages import Converted, Request
from moefy.passes.swap import BuildAndRewrite, restore
from moefy.passes.verify import RunDense, Verify

_log = logging.getLogger(__name__)


def convert(model: nn.Module, config: MoEConfig, *, example_inputs=None, calibration_data=None,
            inplace: bool = False, verify: bool = True, explain: bool = False,
            progress: bool | None = None) -> nn.Module:
    """Rewrite every feed-forward block of ``model`` into a ``moefy.MoE`` (``moefy.PEER`` for
    ``method="peer"``).

    Args:
        model: a dense model (Hugging Face models need no example inputs).
        config: a ``MoEConfig``.
        example_inputs: a tuple of positional tensors or a dict of keyword tensors.
        calibration_data: an iterable of inputs like ``example_inputs`` (a DataLoader works),
            streamed once in bounded memory (padding tokens are skipped via
            ``attention_mask``). Split conversions then choose shared experts by activation
            frequency, group neurons that fire together (``partition="coactivation"``),
            compensate skipped experts by their mean output and fit the router; PEER
            conversions fit their product keys and query on them.
        inplace: change ``model`` itself instead of a copy.
        verify: where the method preserves the function (upcycle; split with
            top_k == num_experts), check the converted model's outputs against the dense one.
        explain: print every candidate projection and why it was taken or rejected.
        progress: show calibration progress on stderr (default: when stderr is a terminal).

    Returns the converted model: the same class as ``model`` with its FFN modules swapped.
    When an FFN runs inline in a larger forward with no module to swap, the smallest module
    that runs it becomes a ``GraphModule`` of its exported graph with the FFN replaced by a
    call of its MoE (graph mode; it keeps that module's attributes); only an FFN inline in the
    model's own forward makes the whole result a ``GraphModule``.

    >>> mlp = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16))
    >>> moe = convert(mlp, MoEConfig(num_experts=4, top_k=4), example_inputs=(torch.randn(2, 16),))
    >>> isinstance(moe[0], MoE)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert expects an nn.Module, got {type(model).__name__}")
    if not isinstance(config, MoEConfig):
        raise TypeError(f"convert expects a moefy.MoEConfig, got {type(config).__name__}")
    if config.partition == "coactivation" and config.method == "split" and (
            calibration_data is None):
        raise ConversionError("partition='coactivation' needs calibration_data: an iterable of "
                              "model inputs (tuples or dicts of tensors, e.g. a DataLoader)")
    if calibration_data is None and config.method == "split" and (
            config.router_init in ("fit", "representative") or config.compensate):
        what = (f"compensate={config.compensate!r}" if config.compensate
                else f"router_init={config.router_init!r}")
        raise ConversionError(f"{what} needs calibration_data: an iterable of model inputs")
    if calibration_data is None and config.fit_steps and config.method == "split":
        raise ConversionError(f"fit_steps={config.fit_steps} trains each layer on calibration "
                              "tokens: pass calibration_data, or fit_steps=0")
    if calibration_data is None and config.peer_fit_steps:
        raise ConversionError(f"peer_fit_steps={config.peer_fit_steps} fits PEER's keys and query "
                              "on calibration tokens: pass calibration_data, or peer_fit_steps=0")
    if config.minutes is not None and calibration_data is None:
        raise ConversionError(f"minutes={config.minutes} spends the time left after building "
                              "on distillation over calibration batches: pass "
                              "calibration_data, or minutes=None")
    if config.minutes is not None and inplace:
        raise ConversionError("minutes= distils the converted model towards the dense one, "
                              "which inplace=True would overwrite: convert a copy "
                              "(inplace=False), or minutes=None")
    if (_fits_with_gradients(config, calibration_data) or config.minutes is not None) and (
            torch.is_inference_mode_enabled()
            or any(p.is_inference() for p in model.parameters())):
        where = ("convert was called under torch.inference_mode()"
                 if torch.is_inference_mode_enabled() else
                 "the model's weights are inference tensors (made under torch.inference_mode())")
        raise ConversionError(
            f"{where}, and this conversion fits routers or keys with gradients on the "
            "calibration data, which inference mode forbids: call convert under "
            "torch.no_grad() instead (and build the model outside inference_mode), or set "
            "fit_steps=0 with router_init other than 'fit' (split) / peer_fit_steps=0 (peer)")
    existing = [name for name, m in model.named_modules()
                if isinstance(m, (MoE, PEER, NeuronFFN, SparseLinear))]
    if existing:
        raise AlreadyConvertedError(
            f"the model already holds {len(existing)} moefy MoE layer(s) ({', '.join(existing[:4])}"
            f"{', ...' if len(existing) > 4 else ''}): every FFN is already converted. Convert "
            "the original dense model instead.")

    if example_inputs is None and calibration_data is not None:
        # trace with inputs shaped like the calibration batches (same keys and dtypes), not
        # with ones made up from the config
        calibration_data, example_inputs = _peek(calibration_data)
    with _CONVERTING:  # torch.export is not thread-safe: one conversion at a time
        started = time.perf_counter()  # the budget (config.minutes) counts from here
        return _convert(model, config, example_inputs, calibration_data, inplace, verify,
                        explain, progress, started)


def _fits_with_gradients(config: MoEConfig, calibration_data) -> bool:
    if calibration_data is None:
        return False
    if config.method == "split":
        return config.fit_steps > 0 or config.router_init in (None, "fit")
    if config.method == "neuron":  # the allocation's Fisher costs take one backward pass
        return config.active is not None and config.active < 1
    return config.method == "peer" and config.peer_fit_steps != 0


_CONVERTING = threading.RLock()  # re-entrant: a calibration generator may itself convert


def _peek(data) -> tuple[Iterable, object]:
    """(the same stream, its first batch as example inputs) without consuming a batch."""
    iterator = iter(data)
    first = next(iterator, None)
    if first is None:
        raise ConversionError("calibration_data yielded no batches")
    if isinstance(first, list):  # a DataLoader collates tuples into lists
        first = tuple(first)
    return itertools.chain([first], iterator), first


def _convert(model, config, example_inputs, calibration_data, inplace, verify, explain,
             progress, started) -> nn.Module:
    request = Request(model, config, *trace.split_inputs(model, example_inputs),
                      calibration_data=calibration_data, inplace=inplace, explain=explain,
                      progress=progress, started=started)
    pipeline = [
        RunDense(keep=verify),  # inputs that do not fit fail here, in the model's own words
        TraceUnits(),  # graphs first: everything after reads structure, not class names
        FindFFNs(),  # matches and the reason for every rejected candidate
        TraceHosts(),  # an FFN inline in a submodule: that module becomes a graph of its own
        PlanRewrite(),  # needs the graph's module scopes; decides surgery or graph mode
        MakeDynamic(),  # graph mode returns its graph: it must take other batch sizes
        Select(),  # after planning, so only / skip see the final FFN names
        CheckBeforeChange(),  # every failure that input can cause, before anything changes
        Calibrate(),  # statistics the split builder reads
        BuildAndRewrite(),  # one FFN at a time: peak memory is the result plus one FFN
        PruneStatic(),  # neuron, selection "static": one neuron set per FFN, down refit
        SparsifyProjections(),  # neuron: the other projections of the FFNs' blocks
        ReadHeadByRows(),  # neuron: a causal LM's head, dense, read by moefy's row kernel
        AllocateBudget(),  # neuron: thresholds that spend config.active where it costs least
        Verify(enabled=verify),  # compares the finished model with the dense one
        DistillForBudget(),  # last: spends what is left of config.minutes
    ]
    stages: dict[type, object] = {}  # the newest stage of each type
    results = []  # (pass, PassResult) in order
    try:
        for step in pipeline:
            result = step(request, *(stages[t] for t in step.needs))
            if result.output is not None:
                stages[type(result.output)] = result.output
            results.append((type(step).__name__, result))
    except BaseException:
        if Converted in stages:  # in place, a failure after the swap leaves the model as it was
            restore(model, stages[Converted].originals)
        raise
    if explain:
        for name, result in results:
            print(f"moefy: {name}: {result.describe()}")
    target = stages[Converted].target
    for m in target.modules():  # a neuron set picked from calibration text is not the
        if isinstance(m, NeuronFFN):  # caller's: the first prompt picks its own
            m.forget()
    return target
