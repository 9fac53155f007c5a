"""Expert parallelism at its edges, each against one process on the same tokens: fewer experts
than ranks (ranks holding none), bfloat16 weights and autocast, torch.compile, deepcopy and
state_dict of a sharded model, moefy.report, 3-D input, inference_mode and eval with grads.

All cases run in ONE spawn of 4 gloo processes (start-up dominates the cost); each rank
records every case's outcome, and one test per case reads them, so a failing case neither
hides the others nor hangs the rest (the gloo timeout turns a stuck collective into an
error)."""

from __future__ import annotations

import contextlib
import copy
import datetime
import pickle
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import moefy
from moefy.distributed import expert_parallel
from moefy.errors import ExpertParallelError

H, I = 16, 8
WORLD = 4
EXPERT_TENSORS = ("w_in", "w_gate", "w_out", "b_in", "b_gate", "b_out")
# (experts, top_k) with fewer experts than the 4 ranks: ranks 2, 3 (E=2) or 3 (E=3) hold none
FEW_EXPERTS = ((2, 1), (2, 2), (3, 1), (3, 3))


def _layer(E: int = 6, k: int = 2, **kw) -> moefy.MoE:
    torch.manual_seed(0)
    return moefy.MoE(H, I, E, k, gated=True, shared_expert_size=4, **kw).train()


def _tokens(rank: int, shape=(), dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + rank)
    count = (5, 0, 7, 4)[rank]  # rank 1 sends nothing
    return torch.randn(*shape, count, H, generator=g).to(dtype)


def _cotangent(y: torch.Tensor, rank: int) -> torch.Tensor:
    return torch.randn(y.shape, generator=torch.Generator().manual_seed(7 + rank)).to(y.dtype)


def _run(model, x: torch.Tensor, rank: int, ctx=contextlib.nullcontext):
    """Output, input gradient and parameter gradients of Σ (y · c).sum() for one forward."""
    x = x.clone().requires_grad_(torch.is_grad_enabled())
    with ctx():
        y = model(x)
    if y.requires_grad:
        (y.float() * _cotangent(y, rank).float()).sum().backward()
    grads = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
             for n, p in model.named_parameters()}
    return y.detach(), x.grad, grads


def _compare(make, rank: int, world: int, *, shape=(), dtype=torch.float32,
             ctx=contextlib.nullcontext, tol=(1e-5, 1e-5), grad_tol=(1e-4, 1e-5), label=""):
    """The sharded layer on this rank's tokens equals one process running every rank's tokens
    in turn: outputs and input grads per rank, replicated grads per rank, expert grads summed
    over the ranks' tokens and sliced to this rank's block."""
    runs = [_run(torch.nn.Sequential(make()), _tokens(r, shape, dtype), r, ctx)
            for r in range(world)]
    model = expert_parallel(torch.nn.Sequential(make()))
    y, dx, grads = _run(model, _tokens(rank, shape, dtype), rank, ctx)
    want_y, want_dx, _ = runs[rank]
    assert y.dtype == want_y.dtype, f"{label}: dtype {y.dtype} != one process {want_y.dtype}"
    rtol, atol = tol
    torch.testing.assert_close(y, want_y, rtol=rtol, atol=atol, msg=lambda m: f"{label} {m}")
    if want_dx is not None:
        torch.testing.assert_close(dx, want_dx, rtol=rtol, atol=atol,
                                   msg=lambda m: f"{label} dx {m}")
    shard = model[0].shard
    rtol, atol = grad_tol
    for name, got in grads.items():
        if name.split(".")[1] in EXPERT_TENSORS:
            want = sum(run[2][name] for run in runs)[shard.start:shard.stop]
        else:
            want = runs[rank][2][name]
        assert got.shape == want.shape, f"{label} {name}: {got.shape} != {want.shape}"
        torch.testing.assert_close(got, want, rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{label} {name} {m}")
    return model


def _few_experts(rank, world):
    for E, k in FEW_EXPERTS:
        model = _compare(lambda E=E, k=k: _layer(E, k), rank, world, label=f"E={E} k={k}")
        shard = model[0].shard
        assert model[0].w_in.shape[0] == shard.stop - shard.start
        assert (shard.stop - shard.start == 0) == (rank >= E)  # the last ranks hold none
        with torch.no_grad():  # inference: the plain exchange and the packed kernels
            x = _tokens(rank)
            torch.testing.assert_close(model.eval()(x), _layer(E, k).eval()(x))


def _bf16_weights(rank, world):
    _compare(lambda: _layer().to(torch.bfloat16), rank, world, dtype=torch.bfloat16,
             tol=(2e-2, 2e-2), grad_tol=(5e-2, 5e-2), label="bf16")


def _bf16_autocast(rank, world):
    def ctx():
        return torch.autocast("cpu", dtype=torch.bfloat16)

    _compare(_layer, rank, world, ctx=ctx, tol=(2e-2, 2e-2), grad_tol=(5e-2, 5e-2),
             label="autocast")


def _compiled(rank, world):
    """torch.compile (aot_eager: dynamo and AOTAutograd's traced backward; inductor's code
    generation adds ~7 s per rank here) around a sharded model: the same outputs and
    gradients as the same sharded model uncompiled."""
    model = expert_parallel(torch.nn.Sequential(_layer()))
    eager = _run(model, _tokens(rank), rank)
    model.zero_grad(set_to_none=True)
    compiled = _run(torch.compile(model, backend="aot_eager"), _tokens(rank), rank)
    torch.testing.assert_close(compiled[:2], eager[:2], rtol=1e-5, atol=1e-6)
    # the compiled wrapper names its parameters "_orig_mod.<name>"
    torch.testing.assert_close(list(compiled[2].values()), list(eager[2].values()),
                               rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()


def _deepcopy(rank, world):
    """A deep copy of a sharded model is a working sharded model on the same group."""
    model = expert_parallel(torch.nn.Sequential(_layer()))
    twin = copy.deepcopy(model)
    assert twin[0].shard.group is model[0].shard.group
    assert twin[0].w_in.data_ptr() != model[0].w_in.data_ptr()
    for got, want in zip(_run(twin, _tokens(rank), rank), _run(model, _tokens(rank), rank),
                         strict=True):
        torch.testing.assert_close(got, want)
    # pickling (torch.save of the module) cannot carry the process group: a typed refusal
    with pytest.raises(ExpertParallelError, match="cannot be pickled"):
        pickle.dumps(model)


def _state_dict(rank, world):
    """state_dict of a shard holds this rank's block of experts (and the replicated rest);
    loading it into another sharded copy gives the same layer."""
    whole = _layer().state_dict()
    model = expert_parallel(torch.nn.Sequential(_layer()))
    shard = model[0].shard
    state = model.state_dict()
    for name, value in whole.items():
        want = value[shard.start:shard.stop] if name.split(".")[0] in EXPERT_TENSORS else value
        torch.testing.assert_close(state[f"0.{name}"], want, rtol=0, atol=0)
    torch.manual_seed(1)  # different weights, sharded in step on every rank
    other = expert_parallel(torch.nn.Sequential(
        moefy.MoE(H, I, 6, 2, gated=True, shared_expert_size=4).train()))
    assert not torch.equal(other[0].w_out, model[0].w_out)
    other.load_state_dict(state)
    x = _tokens(rank)
    torch.testing.assert_close(other(x), model(x), rtol=0, atol=0)


def _report(rank, world):
    """moefy.report of a sharded model describes the whole layer, as one process does (a
    layer big enough for its parameter count in millions to show the shard)."""
    def make():
        torch.manual_seed(0)
        return moefy.MoE(H, 1024, 8, 2, gated=True).train()

    model = expert_parallel(torch.nn.Sequential(make()))
    got, want = moefy.report(model).layers[0], moefy.report(make()).layers[0]
    assert want["params"] == "0.41M"  # 8 experts of 3·16·1024 weights, 2·1024 + 16 biases
    for key in ("E", "k", "shared", "params", "active"):
        assert got[key] == want[key], f"{key}: sharded {got[key]} vs one process {want[key]}"
    data = [(_tokens(rank),)]  # measured on this rank's tokens: as one process on them
    got, want = moefy.report(model, data).layers[0], moefy.report(make(), data).layers[0]
    assert got["tokens"] == want["tokens"]
    for key in ("usage", "uneven", "max load", "rel err"):
        # a rank without tokens has no usage or error (None), as one process
        assert got[key] == (None if want[key] is None else
                            pytest.approx(want[key], rel=1e-5, abs=1e-6)), key
    torch.testing.assert_close(got["load"], want["load"])


def _input_3d(rank, world):
    _compare(_layer, rank, world, shape=(2,), label="3-D")  # (2, T, H), rank 1: (2, 0, H)


def _inference_mode(rank, world):
    model = expert_parallel(torch.nn.Sequential(_layer()))
    for mode in ("train", "eval"):
        getattr(model, mode)()
        x = _tokens(rank)
        with torch.inference_mode():
            y = model(x)
            want = getattr(_layer(), mode)()(x)
        assert not y.requires_grad
        torch.testing.assert_close(y, want, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, mode=mode: f"{mode} {m}")


def _eval_with_grads(rank, world):
    _compare(lambda: _layer().eval(), rank, world, label="eval")


CASES = {"few_experts": _few_experts, "bf16_weights": _bf16_weights,
         "bf16_autocast": _bf16_autocast, "compile": _compiled, "deepcopy": _deepcopy,
         "state_dict": _state_dict, "report": _report, "input_3d": _input_3d,
         "inference_mode": _inference_mode, "eval_with_grads": _eval_with_grads}


def _worker(rank: int, world: int, init: str, out: str) -> None:
    # a case that fails on one rank only would leave the others waiting in a collective:
    # the timeout turns that into an error there too
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=20))
    outcomes = {}
    try:
        for name, case in CASES.items():
            try:
                case(rank, world)
                outcomes[name] = None
            except Exception:  # recorded and reported by the case's own test
                outcomes[name] = traceback.format_exc()
            dist.barrier()
    finally:
        torch.save(outcomes, f"{out}-{rank}")
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("edges")
    out = str(tmp / "outcome")
    mp.start_processes(_worker, args=(WORLD, f"file://{tmp / 'store'}", out), nprocs=WORLD,
                       start_method="spawn", join=True)
    return [torch.load(f"{out}-{r}", weights_only=True) for r in range(WORLD)]


def _expect(outcomes: list[dict], name: str) -> None:
    failed = [f"rank {r}:\n{o[name]}" for r, o in enumerate(outcomes) if o.get(name)]
    assert not failed, "\n".join(failed)


@pytest.mark.parametrize("name", list(CASES))
def test_expert_parallel_edge_matches_one_process(outcomes, name):
    _expect(outcomes, name)
