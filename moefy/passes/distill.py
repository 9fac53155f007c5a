"""Training utilities for converted models: auxiliary losses, freezing, distillation.

    moe_model, dense teacher, data ⇒ (a few hundred steps of AdamW on what ``train`` names,
    loss = distance of the student's outputs to the teacher's) ⇒ moe_model, loss log

A step whose loss or gradients are not finite changes nothing (it is checked before the
optimizer runs; buffers the forward nudged are put back) and stops ``distill`` with
``NonFiniteLossError``: one bad batch never leaves NaN weights behind.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from moefy.errors import NonFiniteLossError, TrainingInputError, first_line
from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN, SparseLinear
from moefy.layers.shard import refuse_sharded
from moefy.passes.base import Pass, PassResult
from moefy.passes.calibrate import Progress
from moefy.passes.stages import Converted, Request, Statistics
from moefy.passes.trace import batch_inputs

TRAINABLE = ("experts", "routers", "moe", "all")
_log = logging.getLogger(__name__)
_convert_log = logging.getLogger("moefy.convert")  # DistillForBudget speaks as convert


def _check_module(value, what: str, fn: str) -> None:
    if not isinstance(value, nn.Module):
        raise TrainingInputError(f"{fn}: {what} must be a torch.nn.Module, got "
                                 f"{type(value).__name__}")


def _check_number(value, what: str, fn: str, *, positive: bool = False,
                  at_most: float | None = None) -> None:
    ok = (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value) and (value > 0 if positive else value >= 0)
          and (at_most is None or value <= at_most))
    if not ok:
        bound = "> 0" if positive else ">= 0"
        bound += "" if at_most is None else f" and <= {at_most:g}"
        raise TrainingInputError(f"{fn}: {what} must be a finite number {bound}, got {value!r}")


def _moes(model: nn.Module, fn: str, *, neuron: bool = False) -> list[nn.Module]:
    """The model's MoE layers (with ``neuron``, also its single-neuron layers: what
    ``freeze`` and ``distill`` train); raises when there is none."""
    _check_module(model, "model", fn)
    kinds = (MoE, NeuronFFN, SparseLinear) if neuron else (MoE,)
    moes = [m for m in model.modules() if isinstance(m, kinds)]
    if not moes:
        raise TrainingInputError(f"{fn}: {type(model).__name__} holds no moefy.MoE layer: "
                                 "convert it first (moefy.convert)")
    return moes


def aux_loss(model: nn.Module, balance: float = 1e-2, z: float = 1e-3) -> torch.Tensor:
    """Sum over the model's MoE layers of their routers' auxiliary losses from the last
    training-mode forward: ``balance`` · Switch load-balancing loss (E·Σ_e f_e·P_e, 1.0 when
    perfectly balanced) + ``z`` · router z-loss (mean logsumexp² of the logits).

    >>> moe = MoE(8, 16, num_experts=4, top_k=2).train()
    >>> _ = moe(torch.randn(10, 8))
    >>> bool(aux_loss(moe) > 0)
    True
    """
    moes = _moes(model, "aux_loss")
    _check_number(balance, "balance", "aux_loss")
    _check_number(z, "z", "aux_loss")
    total = None
    for m in moes:
        if m.last_aux is None:
            continue
        part = balance * m.last_aux["balance"] + z * m.last_aux["z"]
        total = part if total is None else total + part
    if total is None:
        raise TrainingInputError(
            "aux_loss: no MoE layer ran a training-mode forward since it was built: call "
            "model.train() and run a forward first")
    return total


def freeze(model: nn.Module, train: str = "moe") -> list[str]:
    """Make only part of the model trainable; returns the names of the trainable parameters.

    ``train``: "experts" (the routed and shared experts of every MoE, and the weights of
    every single-neuron layer), "routers" (router weights), "moe" (both), "all"
    (everything).

    >>> moe = MoE(8, 16, num_experts=4, top_k=2)
    >>> freeze(moe, "routers")
    ['router.weight']
    """
    if not isinstance(train, str) or train not in TRAINABLE:
        raise TrainingInputError(f"freeze: train must be one of {TRAINABLE}, got {train!r}")
    moes = _moes(model, "freeze", neuron=True)
    chosen: set[int] = set()
    for m in moes:
        for name, p in m.named_parameters():
            is_router = name.startswith(("router.", "router_noise."))
            if train == "moe" or (train == "routers") == is_router:
                chosen.add(id(p))
    names = []
    for name, p in model.named_parameters():
        p.requires_grad_(train == "all" or id(p) in chosen)
        if p.requires_grad:
            names.append(name)
    return names


def _first_float(out) -> torch.Tensor:
    for t in tree_leaves(out):
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            return t
    raise TrainingInputError("distill: the model's output holds no floating-point tensor to "
                             "distil; pass loss=")


def _default_loss(student_out, teacher_out, batch) -> torch.Tensor:
    """Mean squared error of the first float output (hidden states or logits), relative to the
    teacher's variance, over real tokens when the batch has an ``attention_mask``."""
    s, t = _first_float(student_out).float(), _first_float(teacher_out).float()
    if s.shape != t.shape:
        raise TrainingInputError(f"distill: the student's output has shape {tuple(s.shape)}, "
                                 f"the teacher's {tuple(t.shape)}; pass loss= to compare them")
    if s.numel() == 0:
        raise TrainingInputError("distill: a batch holds no tokens (its output is empty); "
                                 "leave empty batches out of data")
    err = (s - t).pow(2).mean(-1)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.shape == err.shape:
        if not bool(mask.any()):
            raise TrainingInputError("distill: a batch is all padding (its attention_mask is "
                                     "all zero); leave such batches out of data")
        err = (err * mask).sum() / mask.sum()
    else:
        err = err.mean()
    return err / t.var(unbiased=False).clamp_min(1e-12)


def _inputs(model: nn.Module, batch, index: int) -> tuple[tuple, dict]:
    return batch_inputs(model, batch, f"distill: batch {index}", TrainingInputError)


def _batches(data: Iterable, one_shot: bool) -> Iterator[tuple[int, object]]:
    """(index, batch), re-iterating ``data`` as needed; a one-shot iterator ends when spent."""
    index = 0
    for _ in itertools.count():
        empty = True
        for batch in data:
            empty = False
            yield index, batch
            index += 1
        if empty and index == 0:
            raise TrainingInputError("distill: data yielded no batches")
        if empty or one_shot:
            return


def _finite_gradients(params: list[nn.Parameter]) -> bool:
    # the sum of squares in float32 also overflows where AdamW's second moment would; one
    # host synchronisation for all tensors
    squares = [p.grad.detach().float().pow(2).sum() for p in params if p.grad is not None]
    if not squares:
        return True
    device = squares[0].device
    return bool(torch.isfinite(torch.stack([q.to(device) for q in squares]).sum()))


def _step_loss(model: nn.Module, teacher: nn.Module, loss_fn: Callable, aux: float, batch,
               index: int) -> torch.Tensor:
    args, kwargs = _inputs(model, batch, index)
    try:
        with torch.no_grad():
            target = teacher(*args, **kwargs)
    except Exception as exc:  # whatever the teacher raises: the batch does not fit it
        raise TrainingInputError(
            f"distill: the teacher ({type(teacher).__name__}) does not run on batch {index}: "
            f"{type(exc).__name__}: {first_line(exc)}. "
            "The teacher must take the same inputs as the model (the dense model it was "
            "converted from)") from exc
    value = loss_fn(model(*args, **kwargs), target, kwargs if kwargs else args)
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise TrainingInputError(f"distill: loss must return a scalar tensor, got "
                                 f"{type(value).__name__}")
    if not value.requires_grad:
        raise TrainingInputError(
            "distill: the loss does not depend on any trainable parameter: a custom loss "
            "that detaches the student's output, or nothing trainable in what train= names "
            "(a hash router has no trained router weights: use train='experts' or 'moe')")
    if aux and any(isinstance(m, MoE) for m in model.modules()):  # routers to balance
        value = value + aux * aux_loss(model)
    return value


@torch.enable_grad()  # a caller under torch.no_grad() still means "train"
def distill(model: nn.Module, teacher: nn.Module, data: Iterable, *, steps: int,
            lr: float = 1e-4, train: str = "moe", loss: Callable | None = None,
            aux: float = 0.0, max_seconds: float | None = None, warmup: float = 0.05,
            progress: bool | None = None) -> list[float]:
    """Fine-tune ``model`` (a converted MoE model) to reproduce ``teacher`` (the dense model).

    Cycles through ``data`` (an iterable of inputs, re-iterated as needed; a one-shot
    iterator such as a generator is used once, and training stops when it runs out) for
    ``steps`` AdamW steps (linear warm-up, cosine decay), updating only what ``train`` names
    (see ``freeze``; the original ``requires_grad`` flags are restored afterwards). Dropout
    stays off; MoE layers run in training mode (router gradients, auxiliary losses).

    Args:
        loss: ``loss(student_out, teacher_out, batch) -> scalar``; default: MSE of the first
            float output relative to the teacher's variance, over unpadded tokens.
        aux: weight of ``aux_loss(model)`` added to the loss (0: none).
        max_seconds: stop early after this much wall time.

    Returns the loss after each step. A non-finite loss or gradient raises
    ``moefy.errors.NonFiniteLossError`` with the weights as they were before that step (its
    ``log`` holds the losses of the steps that were applied).

    >>> dense = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    >>> import moefy
    >>> moe = moefy.convert(dense, moefy.MoEConfig(num_experts=4, top_k=2),
    ...                     example_inputs=(torch.randn(4, 8),))
    >>> log = distill(moe, dense, [(torch.randn(16, 8),)], steps=3, lr=1e-3, progress=False)
    >>> len(log)
    3
    """
    # every argument is checked before anything changes
    _check_module(teacher, "teacher", "distill")
    moes = _moes(model, "distill", neuron=True)
    # its steps would leave the replicated weights apart on every rank
    refuse_sharded(model, "distill", TrainingInputError,
                   "distill trains in one process. Distil before sharding, or write the "
                   "training loop with moefy.distributed.reduce_gradients after each "
                   "backward (examples/train_ep.py)")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise TrainingInputError(f"distill: steps must be a positive int, got {steps!r}")
    _check_number(lr, "lr", "distill", positive=True)
    _check_number(aux, "aux", "distill")
    _check_number(warmup, "warmup", "distill", at_most=1.0)
    if max_seconds is not None:
        _check_number(max_seconds, "max_seconds", "distill", positive=True)
    if loss is not None and not callable(loss):
        raise TrainingInputError(f"distill: loss must be callable(student_out, teacher_out, "
                                 f"batch) or None, got {type(loss).__name__}")
    if progress is not None and not isinstance(progress, bool):
        raise TrainingInputError(f"distill: progress must be True, False or None, got "
                                 f"{progress!r}")
    if isinstance(data, (torch.Tensor, dict, str, bytes)) or not isinstance(data, Iterable):
        raise TrainingInputError(
            f"distill: data must be an iterable of batches (a list of input tuples or dicts, "
            f"or a DataLoader), got {type(data).__name__}; one batch x is [(x,)]")
    if not isinstance(train, str) or train not in TRAINABLE:
        raise TrainingInputError(f"distill: train must be one of {TRAINABLE}, got {train!r}")
    if model is teacher:
        raise TrainingInputError("distill: model and teacher are the same module; pass the "
                                 "dense model that was converted as the teacher")
    loss_fn = loss or _default_loss
    flags = {id(p): p.requires_grad for p in model.parameters()}
    modes = [(m, m.training) for m in itertools.chain(model.modules(), teacher.modules())]
    names = freeze(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
        raise TrainingInputError(f"distill: nothing to train with train={train!r}")
    # what a training forward may nudge besides the weights (router balancing biases)
    buffers = [b for m in moes for b in m.buffers() if b.is_floating_point()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(steps * warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    log: list[float] = []
    bar = Progress("distill", progress, total=steps)
    start = time.perf_counter()
    one_shot = isinstance(data, Iterator)
    try:
        model.eval()
        teacher.eval()
        for m in moes:
            m.train()
        batches = _batches(data, one_shot)
        for step in range(steps):
            item = next(batches, None)
            if item is None:
                _log.warning("distill: data ran out after %d batches (it cannot be iterated "
                             "again); stopped after %d of %d steps (pass a list or a "
                             "DataLoader to cycle through it)", step, step, steps)
                break
            index, batch = item
            saved = [b.clone() for b in buffers]
            opt.zero_grad(set_to_none=True)
            try:
                value = _step_loss(model, teacher, loss_fn, aux, batch, index)
                finite = bool(torch.isfinite(value.detach()))
                if finite:
                    value.backward()
                    finite = _finite_gradients(params)
                if not finite:
                    what = "gradient" if bool(torch.isfinite(value.detach())) else "loss"
                    err = NonFiniteLossError(
                        f"distill: step {step + 1} (batch {index} of data) gave a non-finite "
                        f"{what} (loss {value.item()}); nothing was updated at that step, the "
                        f"weights are those after step {step}. Check that batch for NaN/Inf, "
                        "or lower lr")
                    err.log = log
                    raise err
            except BaseException:
                # the step failed before the optimizer ran: put back what the forward nudged
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    for b, old in zip(buffers, saved, strict=True):
                        b.copy_(old)
                raise
            opt.step()
            sched.step()
            log.append(value.item())
            bar.update(f"loss {log[-1]:.4g} ({len(names)} tensors)")
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                _log.info("distill: stopped after %d steps (max_seconds=%s)", step + 1,
                          max_seconds)
                break
    finally:
        bar.close()
        opt.zero_grad(set_to_none=True)  # no gradients left behind on the weights
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        for m, training in modes:
            m.training = training
        for m in moes:  # the last step's auxiliary losses would keep its autograd graph alive
            m.last_aux = None
    return log


def _logits_kl(student_out, teacher_out, batch) -> torch.Tensor:
    """KL(teacher ‖ student) of the per-token output distributions over real tokens: what a
    language model's quality depends on (an MSE on logits weighs every vocabulary entry
    alike)."""
    s = student_out.logits.float().log_softmax(-1)
    t = teacher_out.logits.float().log_softmax(-1)
    kl = (t.exp() * (t - s)).sum(-1)  # (B, S)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if not isinstance(mask, torch.Tensor) or mask.shape != kl.shape:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1.0)


def _budget_loss(student_out, teacher_out, batch) -> torch.Tensor:
    """KL on logits for models that return ``.logits`` (language models), else the default
    relative MSE of the first float output."""
    if isinstance(getattr(teacher_out, "logits", None), torch.Tensor):
        return _logits_kl(student_out, teacher_out, batch)
    return _default_loss(student_out, teacher_out, batch)


DISTILL_TOKENS = 1024  # tokens per distillation step: a short budget buys more, smaller steps
DISTILL_LR = 1e-4  # AdamW on the MoE parts; see the README for what short budgets reach


def _rebatch(batches: list, tokens: int) -> list:
    """Dict batches of (B, S) tensors cut along B into batches of about ``tokens`` tokens
    (at least one row each; pieces that are all padding are left out); other batches are
    kept as they are."""
    out = []
    for b in batches:
        ids = b.get("input_ids") if isinstance(b, dict) else None
        if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and all(
                isinstance(v, torch.Tensor) and v.shape[:1] == ids.shape[:1]
                for v in b.values())):
            out.append(b)
            continue
        rows = max(1, tokens // max(1, ids.shape[1]))
        for i in range(0, ids.shape[0], rows):
            part = {k: v[i:i + rows] for k, v in b.items()}
            mask = part.get("attention_mask")
            if isinstance(mask, torch.Tensor) and not bool(mask.any()):
                continue  # all padding: nothing to learn from, and no loss to average
            out.append(part)
    return out


def distill_for(model: nn.Module, teacher: nn.Module, data, seconds: float, *,
                lr: float | None = None, progress: bool | None = None) -> dict:
    """Distil ``model`` towards ``teacher`` for about ``seconds`` of wall time (the budget
    recipes and ``moefy convert --distill-minutes``). ``distill``'s learning-rate schedule
    (warm-up, cosine decay) is laid out over its ``steps``: two probe steps measure the step
    time, and the rest of the budget becomes a step count (a quarter more, as steps vary;
    ``max_seconds`` ends it on time).
    Returns {"steps", "seconds", "loss_first", "loss_last"} (the mean loss of the first and
    of the last two steps)."""
    start = time.perf_counter()
    lr = DISTILL_LR if lr is None else lr
    data = _rebatch(data, DISTILL_TOKENS)
    if not data:
        return {"steps": 0, "why": "no calibration batch has a real (unpadded) token"}
    probe = 2  # the first step also pays one-time costs: time the second alone
    log = distill(model, teacher, data, steps=1, lr=lr, loss=_budget_loss, progress=False)
    second = time.perf_counter()
    if second - start < seconds:
        log += distill(model, teacher, data, steps=1, lr=lr, loss=_budget_loss,
                       progress=False)
    per_step = time.perf_counter() - second
    left = seconds - (time.perf_counter() - start)
    if left > per_step and len(log) == probe:
        # steps vary in length (batches of other sizes): plan 25% more than the probe step
        # suggests and let max_seconds end it, the learning rate then ~10% of its peak
        log += distill(model, teacher, data, steps=max(1, int(1.25 * left / per_step)), lr=lr,
                       loss=_budget_loss, max_seconds=left, progress=progress)
    head, tail = log[:probe], log[-probe:]
    return {"steps": len(log), "seconds": time.perf_counter() - start,
            "loss_first": sum(head) / len(head), "loss_last": sum(tail) / len(tail)}


class DistillForBudget(Pass):
    """converted model ⇒ the same, distilled towards the dense model on the calibration
    batches for what is left of ``config.minutes``. Each layer's record says what was done."""

    needs = (Statistics, Converted)

    def call(self, r: Request, stats: Statistics, converted: Converted) -> PassResult:
        config = r.config
        if config.minutes is None:
            return PassResult(False)
        left = config.minutes * 60.0 - (time.perf_counter() - r.started)
        moes = [m for m in converted.target.modules()
                if isinstance(m, MoE | NeuronFFN | SparseLinear)]
        exact = (config.method == "upcycle" or (
            config.active in (None, 1) if config.method == "neuron" else
            all(m.top_k >= m.num_experts for m in moes if isinstance(m, MoE))))
        if exact or left <= 1.0 or not stats.batches:
            why = ("the conversion is exact: nothing to distil" if exact else
                   "no calibration batch was kept" if not stats.batches else
                   f"building took {config.minutes * 60.0 - left:.0f} s, the whole budget "
                   f"of {config.minutes:g} min")
            (_convert_log.info if exact else _convert_log.warning)(
                "minutes=%g: no distillation (%s)", config.minutes, why)
            info = {"steps": 0, "why": why}
        else:
            try:
                info = distill_for(converted.target, r.model, list(stats.batches), left,
                                   progress=r.progress)
            except NonFiniteLossError as exc:
                # distill keeps the weights of the last good step: the conversion stands
                _convert_log.warning("minutes=%g: distillation stopped: %s", config.minutes,
                                     first_line(exc))
                info = {"steps": len(exc.log), "why": f"stopped: {first_line(exc)}"}
            if info.get("steps") and "loss_first" in info:
                _convert_log.info("minutes=%g: distilled %d steps in %.0f s, loss %.4g -> %.4g",
                                  config.minutes, info["steps"], info["seconds"],
                                  info["loss_first"], info["loss_last"])
        for m in moes:
            m.conversion = m.conversion.with_(distill=info)
        # the record keeps the why and the losses; the result counts what was done
        return PassResult(bool(info.get("steps")), {"steps": info.get("steps", 0),
                                                    "seconds": info.get("seconds", 0.0)})
