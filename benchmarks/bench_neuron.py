"""Decode (batch-1) projections that read only the weights they use, against the dense ones.

Prints, from one run:
- the machine's read bandwidth: the median time of ``torch.sum`` over a 512 MB float32
  tensor (all threads), the roof every row below is held against;
- SmolLM2-135M shapes (hidden 576, FFN 1536; attention 576 → 576; the LM head 576 → 49152),
  one token, keeping 100%, 50% and 25% of the input channels / neurons: dense ``F.linear``
  (T = 1), the same weight read in place by moefy's ``rows_linear``, moefy's
  ``sparse_input_linear``, ``neuron_ffn`` and ``input_sparse_ffn`` (a whole FFN of selection
  "input" in one call) (the public functions, as a layer calls them):
  median time, the weight bytes each reads, the GB/s achieved, that as a share of the
  measured bandwidth, and the speed-up over dense. The weights cycle through copies that
  together exceed the last-level cache (``--pool-mb``), so every call reads from memory as a
  decoder does, rather than from a cache that still holds the previous call's rows;
- what a call costs when it reads nothing (every entry dropped): the fixed per-call cost,
  as the public function and as the bare C++ op;
- the token sweep that sets ``KERNEL_MAX_TOKENS``: the C++ kernel against the masked dense
  path at 50% kept, 1 to 32 tokens;
- a whole decoder's projections per token: ``--layers`` layers of 4 attention-size linears
  and one gated FFN, dense (``F.linear``, and ``rows_linear``) against 50% kept
  (``sparse_input_linear`` and one ``input_sparse_ffn`` per layer), to show what the per-call
  overhead leaves of the bytes saved.

    python benchmarks/bench_neuron.py              # about a minute on 2 cores
    python benchmarks/bench_neuron.py --threads 1 --repeats 100
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from moefy.activations import get_activation  # noqa: E402
from moefy.runtime import neuron  # noqa: E402
from moefy.runtime.kernels import neuron_kernels_available  # noqa: E402

H, FFN, VOCAB = 576, 1536, 49152  # SmolLM2-135M
KEEPS = (1.0, 0.5, 0.25)
SWEEP_TOKENS = (1, 2, 4, 8, 16, 32)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="torch CPU threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=300, help="timed calls per measurement")
    p.add_argument("--pool-mb", type=int, default=256,
                   help="weight copies cycled per shape, in MB (> the last-level cache)")
    p.add_argument("--layers", type=int, default=30, help="decoder layers (SmolLM2: 30)")
    p.add_argument("--activation", default="silu", help="the FFN's activation")
    return p.parse_args(argv)


def median_s(fn: Callable[[], object], repeats: int, warmup: int = 20) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def read_bandwidth(repeats: int) -> float:
    """Bytes per second of ``torch.sum`` over 512 MB (written first: untouched pages would
    all map the one zero page and read from cache)."""
    t = torch.ones(128 << 20)
    seconds = median_s(lambda: t.sum(), repeats, warmup=2)
    return t.numel() * 4 / seconds


class Pool:
    """Copies of one weight, handed out in turn, so that a call never finds the previous
    call's weights in cache."""

    def __init__(self, make: Callable[[], torch.Tensor], one_bytes: int, pool_bytes: int):
        self.copies = [make() for _ in range(max(2, -(-pool_bytes // one_bytes)))]
        self.i = 0

    def __call__(self) -> torch.Tensor:
        self.i = (self.i + 1) % len(self.copies)
        return self.copies[self.i]


def call_with_next(fn: Callable, *args):
    """``fn(*args)`` with each ``Pool`` among the arguments replaced by its next copy."""
    return fn(*(a() if isinstance(a, Pool) else a for a in args))


def masked_input_linear(x, wt, scale, threshold):
    """The masked dense expression ``sparse_input_linear`` takes past KERNEL_MAX_TOKENS."""
    return torch.where(x.abs() * scale > threshold, x, 0.0) @ wt


def masked_neuron_ffn(x, g, w_up, w_down_t, coef, threshold, act):
    """The masked dense expression ``neuron_ffn`` takes past KERNEL_MAX_TOKENS."""
    a = act.fn(g)
    return torch.where(a.abs() * coef > threshold, a * (x @ w_up.T), 0.0) @ w_down_t


def threshold_keeping(scores: torch.Tensor, keep: float) -> float:
    if keep >= 1.0:
        return -1.0
    return float(torch.quantile(scores.flatten().double(), 1.0 - keep))


def row(name: str, keep: float, seconds: float, nbytes: float, bandwidth: float,
        dense_s: float) -> str:
    rate = nbytes / seconds
    return (f"{name:<34} {keep:>5.0%} {seconds * 1e6:>9.1f} {nbytes / 1e6:>8.2f} "
            f"{rate / 1e9:>7.1f} {rate / bandwidth:>7.0%} {dense_s / seconds:>7.2f}x")


HEADER = (f"{'op (T = 1)':<34} {'kept':>5} {'time µs':>9} {'MB read':>8} {'GB/s':>7} "
          f"{'of BW':>7} {'vs dense':>8}")


def linear_rows(name: str, K: int, N: int, args, bandwidth: float,
                keeps=KEEPS) -> list[str]:
    """Dense ``F.linear``, dense ``rows_linear`` (the same weight read in place by moefy's
    row kernel) and ``sparse_input_linear`` (scale = ones) for K → N."""
    pool_bytes = args.pool_mb << 20
    weight = Pool(lambda: torch.randn(N, K) / K**0.5, K * N * 4, pool_bytes)  # (N, K)
    wt = Pool(lambda: torch.randn(K, N) / K**0.5, K * N * 4, pool_bytes)  # (K, N)
    x, scale = torch.randn(1, K), torch.ones(K)
    dense_s = median_s(lambda: F.linear(x, weight()), args.repeats)
    rows_s = median_s(lambda: neuron.rows_linear(x, weight()), args.repeats)
    op = functools.partial(call_with_next, neuron.sparse_input_linear)
    lines = [row(f"{name}: dense F.linear", 1.0, dense_s, K * N * 4, bandwidth, dense_s),
             row(f"{name}: dense rows_linear", 1.0, rows_s, K * N * 4, bandwidth, dense_s)]
    if not keeps:
        return lines
    for keep in keeps:
        thr = threshold_keeping(x.abs() * scale, keep)
        kept = int((x.abs() * scale > thr).sum())
        s = median_s(functools.partial(op, x, wt, scale, thr), args.repeats)
        lines.append(row(f"{name}: sparse_input_linear", kept / K, s, kept * N * 4,
                         bandwidth, dense_s))
    return lines


def ffn_rows(args, bandwidth: float) -> list[str]:
    """A gated FFN's up and down projections, the gate computed by the caller: dense
    ``act(g) * F.linear(x, up)`` then ``F.linear(·, down)``, against ``neuron_ffn``."""
    pool_bytes = args.pool_mb << 20
    one = 2 * FFN * H * 4
    up = Pool(lambda: torch.randn(FFN, H) / H**0.5, FFN * H * 4, pool_bytes // 2)
    down = Pool(lambda: torch.randn(H, FFN) / FFN**0.5, FFN * H * 4, pool_bytes // 2)
    down_t = Pool(lambda: torch.randn(FFN, H) / FFN**0.5, FFN * H * 4, pool_bytes // 2)
    act = get_activation(args.activation).fn
    x, g, coef = torch.randn(1, H), torch.randn(1, FFN), torch.ones(FFN)

    def dense():
        return F.linear(act(g) * F.linear(x, up()), down())

    dense_s = median_s(dense, args.repeats)
    lines = [row("FFN up+down: dense", 1.0, dense_s, one, bandwidth, dense_s)]
    scores = act(g).abs() * coef
    for keep in KEEPS:
        thr = threshold_keeping(scores, keep)
        kept = int((scores > thr).sum())
        call = functools.partial(call_with_next, neuron.neuron_ffn, x, g, up, None, down_t,
                                 coef, thr, args.activation)
        s = median_s(call, args.repeats)
        lines.append(row("FFN up+down: neuron_ffn", kept / FFN, s, kept * 2 * H * 4,
                         bandwidth, dense_s))
    return lines


def input_ffn_rows(args, bandwidth: float) -> list[str]:
    """A whole gated FFN of selection "input" (gate, up and down; as a NeuronFFN runs it):
    dense against ``input_sparse_ffn`` (one call), the same share kept of x and of h."""
    pool_bytes = args.pool_mb << 20
    one = 3 * FFN * H * 4
    w_in = Pool(lambda: torch.randn(2 * FFN, H) / H**0.5, 2 * FFN * H * 4, pool_bytes // 2)
    down = Pool(lambda: torch.randn(H, FFN) / FFN**0.5, FFN * H * 4, pool_bytes // 2)
    w_in_t = Pool(lambda: torch.randn(H, 2 * FFN) / H**0.5, 2 * FFN * H * 4, pool_bytes // 2)
    down_t = Pool(lambda: torch.randn(FFN, H) / FFN**0.5, FFN * H * 4, pool_bytes // 2)
    act = get_activation(args.activation).fn
    x, in_scale, h_scale = torch.randn(1, H), torch.ones(H), torch.ones(FFN)

    def dense():
        g, u = F.linear(x, w_in()).chunk(2, dim=-1)
        return F.linear(act(g) * u, down())

    dense_s = median_s(dense, args.repeats)
    lines = [row("FFN gate+up+down: dense", 1.0, dense_s, one, bandwidth, dense_s)]
    probe = w_in_t()
    g, u = (x @ probe).chunk(2, dim=-1)
    h = act(g) * u
    for keep in KEEPS:
        t_in = threshold_keeping(x.abs(), keep)
        t_h = threshold_keeping(h.abs(), keep)
        kept = int((x.abs() > t_in).sum()) * 2 * FFN + int((h.abs() > t_h).sum()) * H
        call = functools.partial(call_with_next, neuron.input_sparse_ffn, x, w_in_t, in_scale,
                                 t_in, None, down_t, h_scale, t_h, args.activation, True)
        s = median_s(call, args.repeats)
        lines.append(row("FFN: input_sparse_ffn (1 call)", kept / (3 * FFN * H), s, kept * 4,
                         bandwidth, dense_s))
    return lines


def overhead_rows(args) -> list[str]:
    """Every entry dropped: nothing is read, what is left is the cost of a call."""
    x, wt, scale = torch.randn(1, H), torch.randn(H, H), torch.ones(H)
    g, up, down_t, coef = torch.randn(1, FFN), torch.randn(FFN, H), torch.randn(FFN, H), \
        torch.ones(FFN)
    big = float("inf")
    cases = {
        "sparse_input_linear (public)": lambda: neuron.sparse_input_linear(x, wt, scale, big),
        "sparse_input_linear (C++ op)":
            lambda: torch.ops.moefy_cpu.sparse_input_linear(x, wt, scale, big),
        "neuron_ffn (public)":
            lambda: neuron.neuron_ffn(x, g, up, None, down_t, coef, big, args.activation),
        "neuron_ffn (C++ op)": lambda: torch.ops.moefy_cpu.neuron_ffn(
            x, g, up, None, down_t, coef, big, args.activation),
    }
    return [f"{name:<34} {median_s(fn, args.repeats * 3) * 1e6:>9.1f} µs"
            for name, fn in cases.items()]


def sweep_rows(args) -> list[str]:
    """50% kept per token; the union of the tokens' rows grows with T."""
    pool_bytes = args.pool_mb << 20
    half = args.repeats // 2
    lines = []
    for name, K, N in (("576 → 1536", H, FFN), ("1536 → 576", FFN, H)):
        wt = Pool(functools.partial(torch.randn, K, N), K * N * 4, pool_bytes)
        scale = torch.ones(K)
        for T in SWEEP_TOKENS:
            x = torch.randn(T, K)
            thr = threshold_keeping(x.abs() * scale, 0.5)
            kernel = functools.partial(call_with_next, torch.ops.moefy_cpu.sparse_input_linear,
                                       x, wt, scale, thr)
            masked = functools.partial(call_with_next, masked_input_linear, x, wt, scale, thr)
            lines.append(sweep_line(f"linear {name}", T, median_s(kernel, half),
                                    median_s(masked, half)))
    act = get_activation(args.activation)
    up = Pool(functools.partial(torch.randn, FFN, H), FFN * H * 4, pool_bytes // 2)
    down_t = Pool(functools.partial(torch.randn, FFN, H), FFN * H * 4, pool_bytes // 2)
    coef = torch.ones(FFN)
    for T in SWEEP_TOKENS:
        x, g = torch.randn(T, H), torch.randn(T, FFN)
        thr = threshold_keeping(act.fn(g).abs() * coef, 0.5)
        kernel = functools.partial(call_with_next, torch.ops.moefy_cpu.neuron_ffn, x, g, up,
                                   None, down_t, coef, thr, act.name)
        masked = functools.partial(call_with_next, masked_neuron_ffn, x, g, up, down_t, coef,
                                   thr, act)
        lines.append(sweep_line("neuron_ffn 576/1536", T, median_s(kernel, half),
                                median_s(masked, half)))
    return lines


def sweep_line(name: str, T: int, kernel_s: float, masked_s: float) -> str:
    return (f"{name:<22} T={T:<3} {kernel_s * 1e6:>9.1f} {masked_s * 1e6:>9.1f} "
            f"{masked_s / kernel_s:>7.2f}x")


def decoder_rows(args, bandwidth: float) -> list[str]:
    """``--layers`` layers: 4 attention linears (H → H) and a gated FFN, one token, as a
    converted decoder runs them: dense ``F.linear``; the same weights through moefy's row
    kernel (``rows_linear``, the same function); half of each input kept
    (``sparse_input_linear`` for attention, one ``input_sparse_ffn`` per FFN)."""
    L = args.layers

    def w(*shape):
        return torch.randn(*shape) / shape[-1] ** 0.5

    attn = [[w(H, H) for _ in range(4)] for _ in range(L)]  # (out, in), F.linear's
    attn_t = [[m.T.contiguous() for m in layer] for layer in attn]  # (in, out)
    w_in, down = [w(2 * FFN, H) for _ in range(L)], [w(H, FFN) for _ in range(L)]
    w_in_t, down_t = [m.T.contiguous() for m in w_in], [m.T.contiguous() for m in down]
    act = get_activation(args.activation).fn
    x, scale, h_scale = torch.randn(1, H), torch.ones(H), torch.ones(FFN)
    thr_x = threshold_keeping(x.abs(), 0.5)
    g, u = F.linear(x, w_in[0]).chunk(2, dim=-1)
    thr_h = threshold_keeping((act(g) * u).abs(), 0.5)

    def through(linear):
        def run():
            for i in range(L):
                for m in attn[i]:
                    linear(x, m)
                g, u = linear(x, w_in[i]).chunk(2, dim=-1)
                linear(act(g) * u, down[i])
        return run

    def sparse():
        for i in range(L):
            for m in attn_t[i]:
                neuron.sparse_input_linear(x, m, scale, thr_x)
            neuron.input_sparse_ffn(x, w_in_t[i], scale, thr_x, None, down_t[i], h_scale,
                                    thr_h, args.activation, True)

    repeats = max(5, args.repeats // 10)
    dense_s = median_s(through(F.linear), repeats, 3)
    rows_s = median_s(through(neuron.rows_linear), repeats, 3)
    sparse_s = median_s(sparse, repeats, 3)
    dense_bytes = L * (4 * H * H + 3 * FFN * H) * 4
    sparse_bytes = dense_bytes * 0.5
    calls = L * 5

    def line(name, seconds, nbytes):
        return (f"{name:<34} {seconds * 1e3:>9.2f} {nbytes / 1e6:>8.1f} "
                f"{nbytes / seconds / 1e9:>7.1f} {nbytes / seconds / bandwidth:>7.0%} "
                f"{dense_s / seconds:>7.2f}x")

    return [
        f"{'decoder, T = 1':<34} {'time ms':>9} {'MB read':>8} {'GB/s':>7} {'of BW':>7} "
        f"{'vs dense':>8}",
        line(f"dense ({L * 6} F.linear)", dense_s, dense_bytes),
        line(f"dense ({L * 6} rows_linear)", rows_s, dense_bytes),
        line(f"50% kept ({calls} moefy calls)", sparse_s, sparse_bytes),
        f"50% kept against dense through rows_linear: {rows_s / sparse_s:.2f}x (the bytes "
        f"allow 2.00x); time above the bytes at full bandwidth, per moefy call: "
        f"{(sparse_s - sparse_bytes / bandwidth) / calls * 1e6:.1f} µs",
    ]


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with torch.inference_mode():  # as a decoder runs: no autograd bookkeeping on either side
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if not neuron_kernels_available():
        sys.exit("the C++ kernels are unavailable (MOEFY_NO_EXT=1, or no compiler): nothing "
                 "to compare")
    torch.manual_seed(0)
    start = time.perf_counter()
    bandwidth = read_bandwidth(10)
    print(f"torch {torch.__version__}, {args.threads} threads; read bandwidth (torch.sum over "
          f"512 MB float32, median of 10): {bandwidth / 1e9:.1f} GB/s")
    print(f"weights cycled through {args.pool_mb} MB of copies per shape; medians of "
          f"{args.repeats} calls after 20 warm-up calls\n")
    print(HEADER)
    for name, K, N in (("attn 576→576", H, H), ("gate/up 576→1536", H, FFN),
                       ("down 1536→576", FFN, H)):
        for line in linear_rows(name, K, N, args, bandwidth):
            print(line, flush=True)
    for line in linear_rows("LM head 576→49152", H, VOCAB, args, bandwidth, keeps=()):
        print(line, flush=True)
    for line in ffn_rows(args, bandwidth):
        print(line, flush=True)
    for line in input_ffn_rows(args, bandwidth):
        print(line, flush=True)
    print("\nper-call cost with nothing kept (median)")
    for line in overhead_rows(args):
        print(line, flush=True)
    print(f"\n{'token sweep, 50% kept per token':<28} {'C++ µs':>9} {'masked µs':>9} "
          f"{'C++ gain':>8}  (KERNEL_MAX_TOKENS = {neuron.KERNEL_MAX_TOKENS})")
    for line in sweep_rows(args):
        print(line, flush=True)
    print()
    for line in decoder_rows(args, bandwidth):
        print(line, flush=True)
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
