"""Training utilities for converted models: auxiliary losses, freezing, distillation.

    moe_model, dense teacher, data ⇒ (a few hundred steps of AdamW on what ``train`` names,
    loss = distance of the student's outputs to the teacher's) ⇒ moe_model, loss log
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from moefy.calibrate import Progress
from moefy.layers.moe import MoE
from moefy.passes.trace import split_inputs

TRAINABLE = ("experts", "routers", "moe", "all")


def _moes(model: nn.Module) -> list[MoE]:
    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        raise ValueError(f"{type(model).__name__} holds no moefy.MoE layer: convert it first")
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
    total = None
    for m in _moes(model):
        if m.last_aux is None:
            continue
        part = balance * m.last_aux["balance"] + z * m.last_aux["z"]
        total = part if total is None else total + part
    if total is None:
        raise ValueError("no MoE layer ran a training-mode forward since it was built: call "
                         "model.train() and run a forward first")
    return total


def freeze(model: nn.Module, train: str = "moe") -> list[str]:
    """Make only part of the model trainable; returns the names of the trainable parameters.

    ``train``: "experts" (the routed and shared experts of every MoE), "routers" (router
    weights), "moe" (both), "all" (everything).
    """
    if train not in TRAINABLE:
        raise ValueError(f"freeze: train must be one of {TRAINABLE}, got {train!r}")
    moes = _moes(model)
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
    raise ValueError("the model's output holds no floating-point tensor to distil; pass loss=")


def _default_loss(student_out, teacher_out, batch) -> torch.Tensor:
    """Mean squared error of the first float output (hidden states or logits), relative to the
    teacher's variance, over real tokens when the batch has an ``attention_mask``."""
    s, t = _first_float(student_out).float(), _first_float(teacher_out).float()
    err = (s - t).pow(2).mean(-1)
    mask = batch.get("attention_mask") if isinstance(batch, dict) else None
    if isinstance(mask, torch.Tensor) and mask.shape == err.shape:
        err = (err * mask).sum() / mask.sum().clamp_min(1)
    else:
        err = err.mean()
    return err / t.var().clamp_min(1e-12)


def distill(model: nn.Module, teacher: nn.Module, data: Iterable, *, steps: int,
            lr: float = 1e-4, train: str = "moe", loss: Callable | None = None,
            aux: float = 0.0, max_seconds: float | None = None, warmup: float = 0.05,
            progress: bool | None = None) -> list[float]:
    """Fine-tune ``model`` (a converted MoE model) to reproduce ``teacher`` (the dense model).

    Cycles through ``data`` (an iterable of inputs, re-iterated as needed) for ``steps``
    AdamW steps (linear warm-up, cosine decay), updating only what ``train`` names (see
    ``freeze``; the original ``requires_grad`` flags are restored afterwards). Dropout stays
    off; MoE layers run in training mode (router gradients, auxiliary losses).

    Args:
        loss: ``loss(student_out, teacher_out, batch) -> scalar``; default: MSE of the first
            float output relative to the teacher's variance, over unpadded tokens.
        aux: weight of ``aux_loss(model)`` added to the loss (0: none).
        max_seconds: stop early after this much wall time.

    Returns the loss after each step.

    >>> dense = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8))
    >>> import moefy
    >>> moe = moefy.convert(dense, moefy.MoEConfig(num_experts=4, top_k=2),
    ...                     example_inputs=(torch.randn(4, 8),))
    >>> log = distill(moe, dense, [(torch.randn(16, 8),)], steps=3, lr=1e-3, progress=False)
    >>> len(log)
    3
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"distill: steps must be a positive int, got {steps!r}")
    moes = _moes(model)
    loss_fn = loss or _default_loss
    flags = {id(p): p.requires_grad for p in model.parameters()}
    modes = [(m, m.training) for m in itertools.chain(model.modules(), teacher.modules())]
    names = freeze(model, train)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"distill: nothing to train with train={train!r}")
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warm = max(1, int(steps * warmup))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + math.cos(math.pi * i / steps)))
    log: list[float] = []
    bar = Progress("distill", progress)
    start = time.perf_counter()
    try:
        model.eval()
        teacher.eval()
        for m in moes:
            m.train()
        batches = _cycle(data)
        for step in range(steps):
            batch = next(batches)
            args, kwargs = split_inputs(model, batch)
            with torch.no_grad():
                target = teacher(*args, **kwargs)
            out = model(*args, **kwargs)
            value = loss_fn(out, target, kwargs if kwargs else args)
            if aux:
                value = value + aux * aux_loss(model)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            sched.step()
            log.append(value.item())
            bar.update(f"step {step + 1}/{steps}, loss {log[-1]:.4g} ({len(names)} tensors)")
            if max_seconds is not None and time.perf_counter() - start > max_seconds:
                break
    finally:
        bar.close()
        for p in model.parameters():
            p.requires_grad_(flags.get(id(p), True))
        for m, training in modes:
            m.training = training
    return log


def _cycle(data: Iterable):
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("distill: data yielded no batches")
