"""moefy.PEER in one run: against its unavoidable FLOPs and against the straightforward version.

Prints one table (issue 12, "Speed it must reach"):
- this machine's dense-GEMM rate, measured in the same run (torch.mm, median of repeats);
- the layer's unavoidable FLOPs per forward — the query networks (T·H·h·d multiply-adds), the
  sub-key scores (T·h·(n₁+n₂)·d/2) and the h·k single-neuron experts (T·h·k·2·H, ×1.5 gated) —
  and the ideal time they take at that rate;
- moefy.PEER's forward (eval, no_grad) and forward+backward (train mode, a fixed random
  gradient of the output), with a breakdown timed stage by stage through the layer's stage
  methods (queries, sub-key scores, product-key top-k, weights, experts; sub-key scores and
  top-k also together as the forward runs them, ``_search``, where the layer has it);
- the straightforward implementation (written here): the SAME product-key retrieval (the
  layer's own stage methods), then the gathered expert weights materialised per token —
  ``down[ids]`` and ``up[ids]`` as (T, h, k, H) tensors (``F.embedding``, as ``nn.Embedding``
  does) — and two einsums for the dots and the weighted sum. Only the expert part differs, so
  the speed-up is the fused experts op's;
- peak memory of each, forward and forward+backward, each in a fresh process: peak RSS above
  the RSS once parameters and inputs exist (Linux /proc: VmHWM, reset through clear_refs);
  on CUDA, ``torch.cuda.max_memory_allocated`` above the allocated bytes before the call.

    python benchmarks/bench_peer.py                     # issue 12's size (~2 GiB of tables)
    python benchmarks/bench_peer.py --experts 65536 --tokens 256     # a quick look
    python benchmarks/bench_peer.py --device cuda --dtype bfloat16  # the same table on a GPU
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import moefy  # noqa: E402
from moefy.activations import get_activation  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
IMPLS = ("moefy.PEER", "straightforward")
MODES = ("forward", "fwd+bwd")
SEARCH = "search, as forward runs it"  # sub-key scores + top-k (the layer may block them)
STAGES = ("queries", "sub-key scores", "top-k (product keys)", SEARCH, "weights (softmax)",
          "experts: moefy fused op", "experts: materialised")
GOAL_FORWARD, GOAL_TRAIN, GOAL_SPEEDUP = 1.5, 3.0, 3.0


# ----------------------------------------------------------------------------- set-up


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=1024**2, help="N, a perfect square")
    p.add_argument("--hidden", type=int, default=256, help="H")
    p.add_argument("--heads", type=int, default=8, help="h")
    p.add_argument("--top-k", type=int, default=16, help="k per head")
    p.add_argument("--tokens", type=int, default=2048, help="T")
    p.add_argument("--key-dim", type=int, default=None, help="d (default: the layer's)")
    p.add_argument("--gated", action="store_true", help="gated single-neuron experts")
    p.add_argument("--dense-grads", action="store_true",
                   help="dense gradients for the expert tables (default: sparse=True, the "
                        "SparseAdam set-up; a dense gradient writes 2 tables' worth per step)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=5, help="timed calls per block (two blocks)")
    p.add_argument("--gemm", default=None,
                   help="M,K,N of the dense-GEMM rate (default 2048,1024,4096 on CPU, "
                        "8192,8192,8192 on CUDA)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory runs")
    p.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # "impl:mode"
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible to this torch build "
                f"({torch.__version__})")
    if args.gemm is None:
        args.gemm = "2048,1024,4096" if args.device == "cpu" else "8192,8192,8192"
    try:
        args.gemm_shape = tuple(int(s) for s in args.gemm.split(","))
    except ValueError:
        args.gemm_shape = ()
    if len(args.gemm_shape) != 3 or min(args.gemm_shape) < 1:
        p.error(f"--gemm wants three positive ints M,K,N, got {args.gemm!r}")
    return args


def child_argv(args: argparse.Namespace) -> list[str]:
    """The size arguments that rebuild the same layer and input in a fresh process."""
    argv = ["--experts", str(args.experts), "--hidden", str(args.hidden), "--heads",
            str(args.heads), "--top-k", str(args.top_k), "--tokens", str(args.tokens),
            "--threads", str(args.threads), "--device", args.device, "--dtype", args.dtype]
    if args.key_dim is not None:
        argv += ["--key-dim", str(args.key_dim)]
    if args.gated:
        argv.append("--gated")
    if args.dense_grads:
        argv.append("--dense-grads")
    return argv


def build(args: argparse.Namespace) -> tuple[moefy.PEER, torch.Tensor, torch.Tensor]:
    """The layer (seeded), an input (T, H) and a fixed output gradient (T, H)."""
    torch.manual_seed(0)
    dtype = DTYPES[args.dtype]
    layer = moefy.PEER(args.hidden, args.experts, heads=args.heads, top_k=args.top_k,
                       key_dim=args.key_dim, gated=args.gated, sparse=not args.dense_grads)
    layer = layer.to(device=args.device, dtype=dtype)
    x = torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype)
    gy = torch.randn_like(x) / math.sqrt(x.numel())  # a fixed random dL/dy
    return layer, x, gy


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def medians(impls: dict[str, Callable[[], object]], rounds: int, device: str
            ) -> dict[str, float]:
    """Median seconds per call. Each implementation runs in a block of its own, the blocks
    twice (forward then reverse order) so drift of the machine hits all alike; two unrecorded
    calls open each block so OpenMP's spinning threads from the previous block settle."""
    for fn in impls.values():  # warm-up: lazy initialisation, JIT, first-touch of buffers
        fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in impls}
    order = list(impls)
    for names in (order, order[::-1]):
        for name in names:
            for r in range(-2, rounds):
                sync(device)
                t0 = time.perf_counter()
                impls[name]()
                sync(device)
                if r >= 0:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


# ----------------------------------------------------------------------------- ideal


def gemm_samples(shape: tuple[int, int, int], device: str, dtype: torch.dtype,
                 rounds: int) -> list[float]:
    """Seconds per torch.mm (M, K) @ (K, N), one sample per call."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(k, n, device=device, dtype=dtype)
    out = torch.empty(m, n, device=device, dtype=dtype)
    samples = []
    for r in range(-2, 2 * rounds):
        sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        if r >= 0:
            samples.append(time.perf_counter() - t0)
    return samples


def onednn_gemm_samples(shape: tuple[int, int, int], rounds: int) -> list[float]:
    """Seconds per oneDNN GEMM of the same shape, weights prepacked (CPU float32 only): the
    fastest GEMM torch offers on this machine, as the layer's own query and sub-key GEMMs
    use it."""
    m, k, n = shape
    a, w = torch.randn(m, k), torch.randn(n, k)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, m)
    samples = []
    for r in range(-2, 2 * rounds):
        t0 = time.perf_counter()
        torch.ops.mkldnn._linear_pointwise(a, packed, None, "none", [], "")
        if r >= 0:
            samples.append(time.perf_counter() - t0)
    return samples


def unavoidable_flops(layer: moefy.PEER, tokens: int) -> dict[str, float]:
    """FLOPs (2 per multiply-add) of one forward that no implementation can skip."""
    h, d, k, H = layer.heads, layer.key_dim, layer.top_k, layer.hidden_size
    n1, n2 = layer.grid
    experts = 2 * tokens * h * k * 2 * H * (1.5 if layer.gated else 1.0)  # u·x and g·v (+ g·x)
    return {"queries": 2 * tokens * H * h * d,
            "sub-key scores": 2 * tokens * h * (n1 + n2) * (d // 2),
            "experts": experts}


# ----------------------------------------------------------------------------- the two versions


def fused_experts(layer: moefy.PEER, x: torch.Tensor, ids: torch.Tensor,
                  w: torch.Tensor) -> torch.Tensor:
    """moefy's experts op, called exactly as the layer's forward calls it."""
    from moefy.runtime.peer import peer_experts

    return peer_experts(x, ids.flatten(1), w.flatten(1), layer.down, layer.up,
                        down_bias=layer.down_bias, gate=layer.gate, activation=layer.activation,
                        sparse=layer.sparse)


def materialised_experts(layer: moefy.PEER, x: torch.Tensor, ids: torch.Tensor,
                         w: torch.Tensor) -> torch.Tensor:
    """The straightforward experts: every token's retrieved rows copied out as (T, h, k, H)
    tensors, then one einsum for the dots u·x and one for the weighted sum of the v's."""
    act = get_activation(layer.activation).fn
    u = F.embedding(ids, layer.down, sparse=layer.sparse)  # (T, h, k, H)
    a = torch.einsum("td,thkd->thk", x, u)  # (T, h, k)
    if layer.down_bias is not None:
        a = a + layer.down_bias[ids]
    if layer.gate is not None:
        g = F.embedding(ids, layer.gate, sparse=layer.sparse)  # (T, h, k, H)
        a = act(torch.einsum("td,thkd->thk", x, g)) * a
    else:
        a = act(a)
    v = F.embedding(ids, layer.up, sparse=layer.sparse)  # (T, h, k, H)
    return torch.einsum("thk,thkd->td", a * w, v)  # (T, H)


def search(layer: moefy.PEER, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-key scores and product-key top-k as the layer's forward runs them: its ``_search``
    (blocks of tokens, a sparse backward) where it has one, else the two contract stages."""
    if hasattr(layer, "_search"):
        return layer._search(q)
    return layer._retrieve(*layer._subkey_scores(q))


def straightforward_forward(layer: moefy.PEER, x: torch.Tensor) -> torch.Tensor:
    """The layer's own retrieval, then the materialised experts."""
    q = layer._queries(x)  # (T, h, d)
    scores, ids = search(layer, q)  # (T, h, k) each
    y = materialised_experts(layer, x, ids, layer._weights(scores))
    return y if layer.out_bias is None else y + layer.out_bias


def forward_of(impl: str, layer: moefy.PEER) -> Callable[[torch.Tensor], torch.Tensor]:
    return layer if impl == "moefy.PEER" else (lambda x: straightforward_forward(layer, x))


def clear_grads(layer: moefy.PEER, *leaves: torch.Tensor) -> None:
    for t in (*layer.parameters(), *leaves):
        t.grad = None  # as optimizer.zero_grad(set_to_none=True) does between steps


# ----------------------------------------------------------------------------- stage by stage


def stage_calls(layer: moefy.PEER, x: torch.Tensor, train: bool
                ) -> dict[str, Callable[[], object]]:
    """One call per stage on precomputed inputs of that stage. Forward: eval mode, no_grad.
    Training: train mode, each stage's inputs are leaves and its float outputs get fixed
    random gradients, so each call is that stage's forward plus its backward."""
    layer.train(train)
    with torch.no_grad():  # the inputs of every stage, computed once
        q = layer._queries(x)
        s_a, s_b = layer._subkey_scores(q)
        scores, ids = layer._retrieve(s_a, s_b)
        w = layer._weights(scores)
    stages: dict[str, tuple[Callable, tuple[torch.Tensor, ...]]] = {
        "queries": (layer._queries, (x,)),
        "sub-key scores": (layer._subkey_scores, (q,)),
        "top-k (product keys)": (layer._retrieve, (s_a, s_b)),
        SEARCH: (lambda q_: search(layer, q_), (q,)),
        "weights (softmax)": (layer._weights, (scores,)),
        "experts: moefy fused op": (lambda x_, w_: fused_experts(layer, x_, ids, w_), (x, w)),
        "experts: materialised": (lambda x_, w_: materialised_experts(layer, x_, ids, w_),
                                  (x, w)),
    }
    if not train:
        def no_grad(fn, inputs):
            def call():
                with torch.no_grad():
                    return fn(*inputs)
            return call
        return {name: no_grad(fn, inputs) for name, (fn, inputs) in stages.items()}

    def with_backward(fn, inputs):
        leaves = tuple(t.detach().requires_grad_() for t in inputs)
        outs = fn(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        outs = [o for o in outs if o.is_floating_point()]  # the ids of top-k have no gradient
        grads = [torch.randn_like(o) for o in outs]
        del outs

        def call():
            clear_grads(layer, *leaves)
            res = fn(*leaves)
            res = res if isinstance(res, tuple) else (res,)
            torch.autograd.backward([o for o in res if o.is_floating_point()], grads)
        return call
    return {name: with_backward(fn, inputs) for name, (fn, inputs) in stages.items()}


def whole_calls(layer: moefy.PEER, x: torch.Tensor, gy: torch.Tensor, train: bool
                ) -> dict[str, Callable[[], object]]:
    layer.train(train)
    if not train:
        def no_grad(fn):
            def call():
                with torch.no_grad():
                    return fn(x)
            return call
        return {impl: no_grad(forward_of(impl, layer)) for impl in IMPLS}
    leaf = x.detach().requires_grad_()  # the layer sits inside a network: x needs its gradient

    def step(fn):
        def call():
            clear_grads(layer, leaf)
            fn(leaf).backward(gy)
        return call
    return {impl: step(forward_of(impl, layer)) for impl in IMPLS}


def agreement(layer: moefy.PEER, x: torch.Tensor, gy: torch.Tensor) -> dict[str, float]:
    """max |Δ| of the straightforward version against moefy: output (eval) and dL/dx (train)."""
    layer.eval()
    with torch.no_grad():
        dy = (straightforward_forward(layer, x) - layer(x)).abs().max().item()
    layer.train()
    grads = []
    for impl in IMPLS:
        leaf = x.detach().requires_grad_()
        clear_grads(layer, leaf)
        forward_of(impl, layer)(leaf).backward(gy)
        grads.append(leaf.grad)
    clear_grads(layer)
    return {"y": dy, "dx": (grads[0] - grads[1]).abs().max().item()}


# ----------------------------------------------------------------------------- memory


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} (peak RSS needs Linux)")


def memory_child(args: argparse.Namespace) -> None:
    """In a fresh process: one call of one implementation; prints peak RSS above the RSS
    with parameters and inputs allocated, as one JSON line."""
    impl, mode = args.memory_child.split(":")
    torch.set_num_threads(args.threads)
    layer, x, gy = build(args)
    layer.train(mode == "fwd+bwd")
    fn = forward_of(impl, layer)
    with torch.no_grad():  # loads the kernels' libraries and starts OpenMP's threads
        fn(x[:2])
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux ≥ 4.0)
    base = _proc_status_kib("VmRSS")
    if mode == "forward":
        with torch.no_grad():
            fn(x)
    else:
        fn(x.requires_grad_()).backward(gy)
    peak = _proc_status_kib("VmHWM")
    print(json.dumps({"base": base * 1024, "peak_above": (peak - base) * 1024}))


def peak_memory_cpu(args: argparse.Namespace) -> dict[tuple[str, str], int]:
    # A fixed glibc mmap threshold: every block of 128 KiB or more is mapped when allocated and
    # unmapped when freed, so RSS follows the live tensors. With glibc's default (a threshold
    # that grows to 32 MiB after the first large free) freed blocks stay in the heap and the
    # result would depend on what ran before the base reading.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
    out = {}
    for impl in IMPLS:
        for mode in MODES:
            cmd = [sys.executable, str(Path(__file__).resolve()), *child_argv(args),
                   "--memory-child", f"{impl}:{mode}"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode != 0:
                raise RuntimeError(f"peak-memory run {impl} {mode} failed "
                                   f"(status {done.returncode}):\n{done.stderr[-3000:]}")
            out[impl, mode] = json.loads(done.stdout.strip().splitlines()[-1])["peak_above"]
    return out


def peak_memory_cuda(layer: moefy.PEER, x: torch.Tensor, gy: torch.Tensor
                     ) -> dict[tuple[str, str], int]:
    out = {}
    for impl in IMPLS:
        for mode in MODES:
            layer.train(mode == "fwd+bwd")
            fn = forward_of(impl, layer)
            leaf = x.detach().requires_grad_(mode == "fwd+bwd")
            clear_grads(layer)
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            if mode == "forward":
                with torch.no_grad():
                    fn(leaf)
            else:
                fn(leaf).backward(gy)
            torch.cuda.synchronize()
            out[impl, mode] = torch.cuda.max_memory_allocated() - base
            clear_grads(layer)
    return out


# ----------------------------------------------------------------------------- table


def fmt_time(s: float) -> str:
    return f"{s * 1e6:.0f} µs" if s < 1e-3 else f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s"


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if abs(b) >= 2**30 else f"{b / 2**20:.1f} MiB"


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def print_table(args: argparse.Namespace, layer: SimpleNamespace, res: dict) -> None:
    n1, n2 = layer.grid
    h, k, H, T = layer.heads, layer.top_k, layer.hidden_size, args.tokens
    threads = f", {args.threads} threads" if args.device == "cpu" else ""
    print(f"moefy.PEER: N = {layer.num_experts} ({n1}×{n2}) experts, H = {H}, heads {h}, "
          f"top-k {k}, key_dim {layer.key_dim}{', gated' if layer.gated else ''}, T = {T}; "
          f"{args.device} {args.dtype}{threads}; expert tables' gradients "
          f"{'dense' if args.dense_grads else 'sparse'}; torch {torch.__version__}")
    m, kk, n = args.gemm_shape
    print(f"dense GEMM (torch.mm {m}×{kk} @ {kk}×{n}, median of {res['gemm_samples']} before "
          f"and after the layer): {res['rate'] / 1e9:.1f} GFLOP/s")
    fl = res["flops"]
    parts = " + ".join(f"{name} {v / 1e9:.3g}" for name, v in fl.items())
    print(f"unavoidable GFLOP per forward: {parts} = {sum(fl.values()) / 1e9:.3g} "
          f"→ ideal {fmt_time(res['ideal'])} at that rate")
    if "rate_best" in res:
        print(f"oneDNN GEMM, prepacked weights, same shape: {res['rate_best'] / 1e9:.1f} "
              f"GFLOP/s → ideal {fmt_time(sum(fl.values()) / res['rate_best'])} at that rate "
              "(the layer's GEMMs run on oneDNN)")
    print()

    fwd, trn = res["stages"]["forward"], res["stages"]["fwd+bwd"]
    whole_f, whole_t = res["whole"]["forward"], res["whole"]["fwd+bwd"]
    flops_of = {"queries": fl["queries"], "sub-key scores": fl["sub-key scores"],
                SEARCH: fl["sub-key scores"],
                "experts: moefy fused op": fl["experts"], "experts: materialised": fl["experts"]}
    header = (f"{'stage (timed alone)':<30} {'forward':>10} {'share':>6} {'GFLOP/s':>8} "
              f"{'fwd+bwd':>10} {'share':>6}")
    print(header)
    print("-" * len(header))
    for name in STAGES:
        impl = "straightforward" if name == "experts: materialised" else "moefy.PEER"
        rate = f"{flops_of[name] / fwd[name] / 1e9:8.1f}" if name in flops_of else f"{'—':>8}"
        print(f"{name:<30} {fmt_time(fwd[name]):>10} {fwd[name] / whole_f[impl]:6.0%} {rate} "
              f"{fmt_time(trn[name]):>10} {trn[name] / whole_t[impl]:6.0%}")
    path = ("queries", SEARCH, "weights (softmax)", "experts: moefy fused op")
    sum_f, sum_t = sum(fwd[n_] for n_ in path), sum(trn[n_] for n_ in path)
    print(f"{'moefy sum (q+search+w+experts)':<30} {fmt_time(sum_f):>10} "
          f"{sum_f / whole_f['moefy.PEER']:6.0%} {'':>8} {fmt_time(sum_t):>10} "
          f"{sum_t / whole_t['moefy.PEER']:6.0%}")
    print("share: of the whole forward / forward+backward of the same implementation, below")
    print()

    ideal, mem = res["ideal"], res.get("memory")
    unit = T * h * k * H * DTYPES[args.dtype].itemsize  # one (T, h, k, H) tensor
    def peak(impl: str, mode: str) -> str:
        return f"{fmt_bytes(mem[impl, mode])} (×{mem[impl, mode] / unit:.2f})" if mem else "—"

    header = (f"{'implementation':<30} {'forward':>10} {'/ideal':>6} {'fwd+bwd':>10} "
              f"{'/ideal':>6} {'peak forward':>19} {'peak fwd+bwd':>19}")
    print(header)
    print("-" * len(header))
    for impl in IMPLS:
        label = "moefy.PEER" if impl == "moefy.PEER" else "straightforward (materialised)"
        print(f"{label:<30} {fmt_time(whole_f[impl]):>10} {whole_f[impl] / ideal:6.2f} "
              f"{fmt_time(whole_t[impl]):>10} {whole_t[impl] / ideal:6.2f} "
              f"{peak(impl, 'forward'):>19} {peak(impl, 'fwd+bwd'):>19}")
    sp_f = whole_f["straightforward"] / whole_f["moefy.PEER"]
    sp_t = whole_t["straightforward"] / whole_t["moefy.PEER"]
    print(f"{'speed-up of moefy':<30} {sp_f:9.2f}× {'':>6} {sp_t:9.2f}×")
    agree = res["agreement"]
    print("straightforward: the layer's own retrieval; down[ids], up[ids] (T, h, k, H) by "
          "F.embedding; two einsums")
    print(f"straightforward vs moefy: max|Δy| {agree['y']:.2e}, max|Δ dL/dx| {agree['dx']:.2e}")
    what = ("peak RSS above the RSS once parameters and inputs exist, a fresh process each"
            if args.device == "cpu" else "torch.cuda.max_memory_allocated above the bytes before")
    print(f"peak: {what}; (×n): n (T, h, k, H) tensors of {fmt_bytes(unit)}")
    print(f"memory budget (issue 12): parameters {fmt_bytes(res['param_bytes'])} + a small "
          f"multiple of {fmt_bytes(unit)}")
    print()
    f_ratio, t_ratio = whole_f["moefy.PEER"] / ideal, whole_t["moefy.PEER"] / ideal
    goals = [f"forward/ideal {f_ratio:.2f} ≤ {GOAL_FORWARD}: {verdict(f_ratio <= GOAL_FORWARD)}",
             f"fwd+bwd/ideal {t_ratio:.2f} ≤ {GOAL_TRAIN}: {verdict(t_ratio <= GOAL_TRAIN)}",
             f"speed-up ≥ {GOAL_SPEEDUP:g}×: forward {verdict(sp_f >= GOAL_SPEEDUP)}, "
             f"fwd+bwd {verdict(sp_t >= GOAL_SPEEDUP)}"]
    if mem:
        lower = [mem["moefy.PEER", m_] < mem["straightforward", m_] for m_ in MODES]
        goals.append(f"lower peak memory: forward {verdict(lower[0])}, fwd+bwd "
                     f"{verdict(lower[1])}")
    print("issue 12 goals (ideal at torch.mm's rate): " + "; ".join(goals))
    if "rate_best" in res:
        best = sum(res["flops"].values()) / res["rate_best"]
        f_best, t_best = whole_f["moefy.PEER"] / best, whole_t["moefy.PEER"] / best
        print(f"against the oneDNN rate: forward/ideal {f_best:.2f} ≤ {GOAL_FORWARD}: "
              f"{verdict(f_best <= GOAL_FORWARD)}; fwd+bwd/ideal {t_best:.2f} ≤ {GOAL_TRAIN}: "
              f"{verdict(t_best <= GOAL_TRAIN)}")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark, prints the table and returns the numbers behind it."""
    args = parse_args(argv)
    if args.memory_child:
        memory_child(args)
        return {}
    torch.set_num_threads(args.threads)
    if args.device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 there means float32
    dtype = DTYPES[args.dtype]
    res: dict = {}
    samples = gemm_samples(args.gemm_shape, args.device, dtype, args.rounds)
    layer, x, gy = build(args)
    res["param_bytes"] = sum(p.numel() * p.element_size() for p in layer.parameters())
    shape = SimpleNamespace(num_experts=layer.num_experts, grid=layer.grid, heads=layer.heads,
                            top_k=layer.top_k, hidden_size=layer.hidden_size,
                            key_dim=layer.key_dim, gated=layer.gated)  # for the table
    res["flops"] = unavoidable_flops(layer, args.tokens)
    res["stages"], res["whole"] = {}, {}
    for mode, train in (("forward", False), ("fwd+bwd", True)):
        res["stages"][mode] = medians(stage_calls(layer, x, train), args.rounds, args.device)
        res["whole"][mode] = medians(whole_calls(layer, x, gy, train), args.rounds, args.device)
        clear_grads(layer)
    res["agreement"] = agreement(layer, x, gy)
    # the GEMM rate again after the layer, so drift of the machine during the run shows in it
    samples += gemm_samples(args.gemm_shape, args.device, dtype, args.rounds)
    m, k, n = args.gemm_shape
    res["gemm_samples"] = len(samples)
    res["rate"] = 2 * m * k * n / statistics.median(samples)
    res["ideal"] = sum(res["flops"].values()) / res["rate"]
    if args.device == "cpu" and args.dtype == "float32" and hasattr(
            torch.ops.mkldnn, "_reorder_linear_weight"):
        best = 2 * m * k * n / statistics.median(onednn_gemm_samples(args.gemm_shape,
                                                                     args.rounds))
        res["rate_best"] = max(best, res["rate"])
    if not args.no_memory:
        if args.device == "cuda":
            res["memory"] = peak_memory_cuda(layer, x, gy)
        else:
            del layer, x, gy  # the children allocate their own: keep the machine's memory free
            gc.collect()
            res["memory"] = peak_memory_cpu(args)
    print_table(args, shape, res)
    return res


if __name__ == "__main__":
    main()
