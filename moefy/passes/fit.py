"""What is fitted from calibration statistics, apart from carving the weights (passes/build):

    reservoir of FFN inputs x, dense FFN f  ⇒  router      (rank experts by what skipping costs)
                                           ⇒  compensation (low-rank linear map of x onto
                                                            what the routed experts miss)
                                           ⇒  layer fit    (Adam on the whole layer vs f)

Each fit returns what it measured on held-out calibration tokens; ``check_finite`` refuses a
fitted layer with a non-finite parameter before it is swapped into a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from moefy.errors import ConversionError
from moefy.layers.moe import MoE
from moefy.passes.calibrate import FFNStats
from moefy.runtime.experts import ExpertWeights, expert_forward

if TYPE_CHECKING:
    from moefy.passes.build import DenseWeights


def check_finite(moe: nn.Module, name: str) -> None:
    """Raise ``ConversionError`` naming every non-finite parameter or buffer of ``moe``."""
    bad = [n for n, t in [*moe.named_parameters(), *moe.named_buffers()]
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ConversionError(
            f"{name}: the converted layer has non-finite values in {', '.join(bad)}. The dense "
            "FFN's weights or the calibration data hold NaN/Inf or values too large to fit "
            "(moefy skips non-finite calibration tokens): check them, or convert without "
            "calibration_data. Nothing was changed.")


def dense_forward(dense: DenseWeights, x: torch.Tensor) -> torch.Tensor:
    """The dense FFN on rows ``x`` (float32): the dispatch's own expert forward, on the FFN
    as a single expert."""
    one = [None if t is None else t.float()[None] for t in (
        dense.w_in, dense.w_out, dense.w_gate, dense.b_in, dense.b_gate, dense.b_out)]
    return expert_forward(x, ExpertWeights(*one, dense.activation), 0)


@torch.enable_grad()
def fit_layer(moe: MoE, dense: DenseWeights, x: torch.Tensor, steps: int,
              generator: torch.Generator, lr: float = 1e-3, batch: int = 1024) -> dict:
    """Train the layer (experts, router, shared part) to reproduce the dense FFN on the
    calibration tokens: Adam on random mini-batches of 90% of them, MSE relative to the
    target's variance; measured on the other 10%."""
    x = x.to(moe.w_in.device, moe.w_in.dtype)  # the reservoir lives on the CPU
    with torch.no_grad():
        target = dense_forward(dense, x.float()).to(x.dtype)
    held = max(1, x.shape[0] // 10)
    xt, tt = x[:-held], target[:-held]
    scale = tt.float().var().clamp_min(1e-12)
    mode = moe.training
    moe.train()
    opt = torch.optim.Adam(moe.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        rows = torch.randint(0, xt.shape[0], (min(batch, xt.shape[0]),), generator=generator)
        loss = (moe(xt[rows]) - tt[rows]).float().pow(2).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    moe.train(mode)
    with torch.no_grad():
        moe.eval()
        err = (moe(x[-held:]) - target[-held:]).norm() / target[-held:].norm()
        moe.train(mode)
    return {"rel_err_fitted": float(err)}


@torch.no_grad()
def fit_compensation(moe: MoE, dense: DenseWeights, x: torch.Tensor, rank: int) -> dict:
    """Least-squares low-rank linear map of the token onto what the routed MoE still misses
    (dense(x) − moe(x)), installed in ``moe.shared``; reduced-rank ridge regression on 90% of
    the calibration tokens, measured on the other 10%."""
    x = x.to(moe.w_in.device, torch.float32)  # the reservoir lives on the CPU
    mode = moe.training
    moe.eval()
    target = dense_forward(dense, x)
    residual = target - moe(x.to(moe.w_in.dtype)).float()  # (T, O)
    held = max(1, x.shape[0] // 10)
    xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)  # intercept
    xt, rt = xa[:-held], residual[:-held]
    gram = xt.t() @ xt
    gram.diagonal().add_(1e-3 * gram.diagonal().mean())
    coef = torch.linalg.solve(gram, xt.t() @ rt)  # (H + 1, O)
    fitted = xt @ coef
    rank = max(1, min(rank, x.shape[1], rt.shape[1]))
    # principal output directions of the fit: eigenvectors of its (O, O) Gram matrix
    basis = torch.linalg.eigh(fitted.t() @ fitted).eigenvectors.flip(1)[:, :rank]  # (O, r)
    coef = coef @ basis @ basis.t()
    down = (coef[:-1] @ basis).t()  # (r, H)
    norm = target[-held:].norm()
    before = residual[-held:].norm() / norm
    after = (residual[-held:] - xa[-held:] @ coef).norm() / norm
    dtype = moe.w_in.dtype
    moe.shared.set_compensation(down.to(dtype), basis.to(dtype), coef[-1].to(dtype))
    moe.train(mode)
    return {"rel_err_calibration": float(before), "rel_err_compensated": float(after)}


def set_router(moe: MoE, dense: DenseWeights, groups: list[torch.Tensor], init: str,
               stats: FFNStats | None, generator: torch.Generator) -> dict:
    """Initialise a split MoE's router; returns what was measured (router recall).

    - similarity: each expert's centre, the mean direction of its neurons' input weights
      (the gate's for gated FFNs, which decides what fires) — training-free;
    - representative (CMoE): the input weights of each expert's most typical neuron (the one
      most co-marked with the rest of its group): the logit is that neuron's pre-activation;
    - fit: a linear router trained on the calibration reservoir to rank experts by how far
      each expert's output on the token is from its mean (what skipping it would cost).
    """
    key = (dense.w_gate if dense.w_gate is not None else dense.w_in).float()
    bias, info = None, {}
    if init == "representative":
        corr = stats.correlation()
        reps = [idx[corr[idx][:, idx].sum(1).argmax()] for idx in groups]
        weight = key[torch.stack(reps)]
    else:
        unit = nn.functional.normalize(key, dim=1)
        weight = torch.stack([unit[idx].mean(0) for idx in groups])
    if stats is not None and stats.inputs.shape[0] >= 16:
        x = stats.inputs.to(key.device)
        cost = _skip_cost(moe, x)  # (T, E)
        held = max(1, x.shape[0] // 10)
        info["router_recall_init"] = _recall(x[-held:] @ weight.t(), cost[-held:], moe.top_k)
        if init == "fit":
            weight, bias = _fit_router(x[:-held], cost[:-held], moe.top_k, generator)
            info["router_recall"] = _recall(x[-held:] @ weight.t() + bias, cost[-held:],
                                            moe.top_k)
        else:
            info["router_recall"] = info["router_recall_init"]
    moe.router.weight.copy_(weight.to(moe.router.weight.dtype))
    if bias is not None:
        moe.router.bias = nn.Parameter(bias.to(moe.router.weight.dtype))
    return info


def _skip_cost(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """‖f_e(x) − c_e‖ per token and expert (T, E): the output lost when e is not chosen."""
    ew = moe.expert_weights()
    ew = type(ew)(*(None if t is None else t.detach().float() for t in ew[:6]), ew.activation)
    return torch.stack([expert_forward(x, ew, e).norm(dim=-1) for e in range(moe.num_experts)],
                       dim=1)


def _recall(logits: torch.Tensor, cost: torch.Tensor, k: int) -> float:
    """Mean overlap of the router's top-k with the top-k by true cost (1.0: oracle)."""
    chosen = torch.zeros_like(cost).scatter_(1, logits.topk(k, dim=1).indices, 1.0)
    oracle = torch.zeros_like(cost).scatter_(1, cost.topk(k, dim=1).indices, 1.0)
    return float((chosen * oracle).sum() / oracle.sum())


@torch.enable_grad()
def _fit_router(x: torch.Tensor, cost: torch.Tensor, k: int, generator: torch.Generator,
                steps: int = 200, batch: int = 4096) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear router trained to put the k costliest experts on top: binary cross-entropy
    on top-k membership, Adam on random mini-batches. About a second on CPU."""
    target = torch.zeros_like(cost).scatter_(1, cost.topk(k, dim=1).indices, 1.0)
    scale = x.norm(dim=1).mean().clamp_min(1e-6)
    xs = x / scale
    w = x.new_zeros(cost.shape[1], x.shape[1], requires_grad=True)  # (E, H)
    bias = x.new_zeros(cost.shape[1], requires_grad=True)
    opt = torch.optim.Adam([w, bias], lr=0.05)
    for _ in range(steps):
        rows = torch.randint(0, xs.shape[0], (min(batch, xs.shape[0]),), generator=generator)
        logits = xs[rows] @ w.t() + bias
        loss = nn.functional.binary_cross_entropy_with_logits(logits, target[rows])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return w.detach() / scale, bias.detach()
