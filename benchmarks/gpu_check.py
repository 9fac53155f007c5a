"""`make gpu-check`: every CUDA test and the GPU benchmarks in one run, one table.

    python benchmarks/gpu_check.py               # tests + benchmarks (a few minutes on an H200)
    python benchmarks/gpu_check.py --no-tests    # benchmarks only
    python benchmarks/gpu_check.py --no-bench    # tests only

Rows:
- the CUDA tests (``pytest -m gpu``): passed / failed / skipped;
- memory bandwidth of this GPU: a large device-to-device copy (bytes read + written);
- grouped dispatch (``moefy.runtime`` on CUDA, bf16), H = 4096, 8 experts of 14336 SwiGLU,
  top-2, 8192 tokens: TFLOP/s on the active FLOPs (3 projections × 2 chosen experts per
  token), against one dense bf16 GEMM doing the same FLOPs (8192 × 4096 @ 4096 × 86016) and
  a dense SwiGLU FFN of width 2 × 14336; the ratio dispatch / dense GEMM;
- decode at 1 and 8 tokens: time, and the bandwidth reached on the expert weights actually
  read (the distinct experts the tokens chose), as a fraction of the measured copy bandwidth.
- method="neuron": a NeuronFFN (H × I SwiGLU) at 50% kept on CUDA (Triton kernels) against
  the same layer in float32 on the CPU, and its bf16 decode time at 1 and 8 tokens: the
  share of copy bandwidth reached on the kept rows' bytes, against the masked dense path
  and a dense FFN;
- PEER (``benchmarks/bench_peer.py --device cuda --dtype bfloat16``, issue 12's size): its
  whole table printed first, then forward and forward+backward against the ideal time of the
  unavoidable FLOPs at this GPU's bf16 GEMM rate, and the speed-up over the straightforward
  version that materialises the gathered weights.

Without CUDA it prints why and exits with status 0 (nothing to check); with failing tests it
exits with status 1.
"""

from __future__ import annotations

import argparse
import functools
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

H, I, E, K, TOKENS = 4096, 14336, 8, 2, 8192
TEST_TIMEOUT_S = 330  # the whole check stays under 8 minutes


def timed(fn, *, iters: int, repeats: int = 5) -> float:
    """Median seconds per call over ``repeats`` runs of ``iters`` calls (CUDA events)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    samples = []
    for _ in range(repeats):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) / 1e3 / iters)
    return statistics.median(samples)


def run_tests() -> tuple[str, bool]:
    """``pytest -m gpu`` in a child process; (summary, all passed)."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           "tests"]
    start = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=TEST_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return f"timed out after {TEST_TIMEOUT_S} s", False
    seconds = time.perf_counter() - start
    output = done.stdout + done.stderr
    counts = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
    summary = output.strip().splitlines()[-1] if output.strip() else ""
    for n, what in re.findall(r"(\d+) (passed|failed|errors?|skipped)", summary):
        counts["error" if what.startswith("error") else what] += int(n)
    if done.returncode not in (0, 5) or counts["failed"] or counts["error"]:
        print(output[-6000:])  # the failures, before the table
    ok = done.returncode == 0 and counts["passed"] > 0
    text = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
            f"{counts['skipped']} skipped ({seconds:.0f} s)")
    return text, ok


def copy_bandwidth() -> float:
    """Bytes per second of a 4 GiB device copy (read + write)."""
    src = torch.empty(1 << 31, dtype=torch.bfloat16, device="cuda").uniform_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), iters=10)
    return 2 * src.numel() * src.element_size() / seconds


def expert_weights(dtype=torch.bfloat16):
    from moefy.runtime.experts import ExpertWeights

    g = torch.Generator(device="cuda").manual_seed(0)

    def r(*shape, fan_in):
        return (torch.randn(*shape, device="cuda", generator=g) * fan_in**-0.5).to(dtype)

    return ExpertWeights(w_in=r(E, I, H, fan_in=H), w_out=r(E, H, I, fan_in=I),
                         w_gate=r(E, I, H, fan_in=H), b_in=None, b_gate=None, b_out=None,
                         activation="silu")


def routing(tokens: int):
    logits = torch.randn(tokens, E, device="cuda")
    top, indices = logits.topk(K, dim=-1)
    return top.softmax(-1).to(torch.bfloat16), indices


def time_dense_gemm(x: torch.Tensor) -> float:
    """One dense GEMM doing the active experts' FLOPs: (T, H) @ (H, 3·k·I)."""
    w = torch.randn(3 * K * I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
    return timed(lambda: F.linear(x, w), iters=5)


def time_dense_ffn(x: torch.Tensor) -> float:
    """A dense SwiGLU FFN of width k·I: the MoE's active part as one unsplit FFN."""
    up, gate = (torch.randn(K * I, H, device="cuda", dtype=torch.bfloat16) * H**-0.5
                for _ in range(2))
    down = torch.randn(H, K * I, device="cuda", dtype=torch.bfloat16) * I**-0.5
    return timed(lambda: F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down), iters=5)


def bench_dispatch(rows: list[tuple[str, str]], ew) -> None:
    from moefy.runtime.dispatch import grouped_ffn

    x = torch.randn(TOKENS, H, device="cuda", dtype=torch.bfloat16)
    weights, indices = routing(TOKENS)
    active = 2 * TOKENS * K * 3 * H * I  # three projections per chosen expert
    with torch.no_grad():
        t_moe = timed(lambda: grouped_ffn(x, weights, indices, ew), iters=5)
        t_gemm = time_dense_gemm(x)
        t_ffn = time_dense_ffn(x)
    torch.cuda.empty_cache()
    shape = f"{TOKENS} tok, H {H}, {E}×{I} SwiGLU, top-{K}"
    rows.append((f"dispatch bf16 ({shape})", f"{active / t_moe / 1e12:.0f} TFLOP/s on active "
                 f"FLOPs ({t_moe * 1e3:.2f} ms)"))
    rows.append((f"dense bf16 GEMM, same FLOPs ({TOKENS}×{H} @ {H}×{3 * K * I})",
                 f"{active / t_gemm / 1e12:.0f} TFLOP/s ({t_gemm * 1e3:.2f} ms)"))
    rows.append((f"dense bf16 SwiGLU FFN of width {K}×{I}",
                 f"{active / t_ffn / 1e12:.0f} TFLOP/s ({t_ffn * 1e3:.2f} ms)"))
    rows.append(("ratio dispatch / dense GEMM (TFLOP/s)", f"{t_gemm / t_moe:.2f}"))


def bench_decode(rows: list[tuple[str, str]], ew, bandwidth: float) -> None:
    from moefy.runtime.dispatch import grouped_ffn

    per_expert = 3 * H * I * 2  # bytes of one expert's bf16 weights
    for tokens in (1, 8):
        x = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        weights, indices = routing(tokens)
        touched = int(indices.unique().numel())
        with torch.no_grad():
            seconds = timed(lambda: grouped_ffn(x, weights, indices, ew), iters=50)  # noqa: B023
        reached = touched * per_expert / seconds
        rows.append((f"decode {tokens} token{'s' if tokens > 1 else ''} "
                     f"({touched} experts read, {touched * per_expert / 1e9:.2f} GB)",
                     f"{seconds * 1e6:.0f} µs, {reached / 1e12:.2f} TB/s = "
                     f"{reached / bandwidth:.0%} of copy bandwidth"))


def dense_ffn(x, w_up, w_down, w_gate):
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def bench_neuron(rows: list[tuple[str, str]], bandwidth: float) -> None:
    """method="neuron" on CUDA: a NeuronFFN of H × I SwiGLU with half of its inputs and
    neurons kept. Decode batches take the Triton kernels (moefy/runtime/neuron_triton.py),
    which read only the kept rows: float32 against the same layer on the CPU (C++ kernels),
    then bf16 at 1 and 8 tokens against the masked dense path (every row read) and a dense
    FFN, with the bandwidth reached on the bytes the kept rows hold."""
    import moefy.runtime.neuron as neuron_runtime
    from moefy.layers.neuron import NeuronFFN

    g = torch.Generator().manual_seed(0)
    w = [torch.randn(I, H, generator=g) * H**-0.5, torch.randn(H, I, generator=g) * I**-0.5,
         torch.randn(I, H, generator=g) * H**-0.5]
    cpu = NeuronFFN(H, I, activation="silu", gated=True).load_dense(*w)
    x = torch.randn(8, H, generator=g)
    with torch.no_grad():
        cpu.in_threshold.fill_(float((x.abs() * cpu.in_scale).median()))
        cpu.h_threshold.fill_(float((cpu.hidden(x).abs() * cpu.h_scale).median()))
        want = cpu(x)
        layer = NeuronFFN(H, I, activation="silu", gated=True).to("cuda")
        layer.load_state_dict(cpu.state_dict())
        got = layer(x.cuda()).cpu()
    err = float((got - want).norm() / want.norm())
    rows.append(("neuron FFN on CUDA (Triton, float32) vs CPU (C++), 50% kept",
                 f"relative error {err:.1e}" + ("" if err < 1e-4 else "  FAILED")))
    layer = layer.to(torch.bfloat16)
    dense = [t.to("cuda", torch.bfloat16) for t in w]
    real = neuron_runtime._cuda_kernel_applies
    for tokens in (1, 8):
        xb = torch.randn(tokens, H, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            kept_in = int(((xb.float().abs() * layer.in_scale) > layer.in_threshold)
                          .any(0).sum())
            h = layer.hidden(xb).float()
            kept_h = int(((h.abs() * layer.h_scale) > layer.h_threshold).any(0).sum())
            launches = []
            real_launch = neuron_runtime._on_cuda
            neuron_runtime._on_cuda = lambda *a: launches.append(1) or real_launch(*a)  # noqa: B023
            try:
                kernel_s = timed(lambda: layer(xb), iters=50)  # noqa: B023
            finally:
                neuron_runtime._on_cuda = real_launch
            if not launches:
                raise ValueError("the bf16 NeuronFFN on CUDA did not take the Triton kernels")
            neuron_runtime._cuda_kernel_applies = lambda *a: False
            try:
                masked_s = timed(lambda: layer(xb), iters=50)  # noqa: B023
            finally:
                neuron_runtime._cuda_kernel_applies = real
            dense_s = timed(functools.partial(dense_ffn, xb, *dense), iters=50)
        read = (kept_in * 2 * I + kept_h * H) * 2
        rows.append((f"neuron FFN bf16, {tokens} token{'s' if tokens > 1 else ''}, ~50% kept "
                     "(Triton)",
                     f"{kernel_s * 1e6:.0f} µs, {read / 1e6:.0f} MB of kept rows at "
                     f"{read / kernel_s / bandwidth:.0%} of copy bandwidth; masked path "
                     f"{masked_s * 1e6:.0f} µs ({masked_s / kernel_s:.2f}x), dense FFN "
                     f"{dense_s * 1e6:.0f} µs ({dense_s / kernel_s:.2f}x)"))
    if err >= 1e-4:
        raise ValueError(f"neuron FFN on CUDA differs from the CPU by {err:.1e}")


def bench_peer(rows: list[tuple[str, str]]) -> None:
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import bench_peer as peer

    print()
    res = peer.main(["--device", "cuda", "--dtype", "bfloat16"])  # prints its own table
    fwd, train = res["whole"]["forward"], res["whole"]["fwd+bwd"]
    ideal = res["ideal"]
    rows.append(("PEER bf16 (N 1024², H 256, h 8, k 16, T 2048): forward / ideal",
                 f"{fwd['moefy.PEER'] / ideal:.2f} ({fwd['moefy.PEER'] * 1e3:.2f} ms, ideal "
                 f"{ideal * 1e3:.2f} ms at {res['rate'] / 1e12:.0f} TFLOP/s)"))
    rows.append(("PEER bf16: forward+backward / ideal",
                 f"{train['moefy.PEER'] / ideal:.2f} ({train['moefy.PEER'] * 1e3:.2f} ms)"))
    rows.append(("PEER bf16: speed-up over materialised gathers (fwd, fwd+bwd)",
                 f"{fwd['straightforward'] / fwd['moefy.PEER']:.2f}×, "
                 f"{train['straightforward'] / train['moefy.PEER']:.2f}×"))


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print(f"{'check'.ljust(width)}  result")
    print("-" * (width + 2 + max(len(value) for _, value in rows)))
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-tests", action="store_true", help="benchmarks only")
    parser.add_argument("--no-bench", action="store_true", help="tests only")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        reason = ("this torch build has no CUDA support" if torch.version.cuda is None
                  else "no CUDA device is visible")
        print(f"gpu-check: nothing to check: {reason} (torch {torch.__version__}). Run it on "
              "a machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0
    start = time.perf_counter()
    props = torch.cuda.get_device_properties(0)
    title = (f"moefy gpu-check: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch "
             f"{torch.__version__}, CUDA {torch.version.cuda}")
    rows: list[tuple[str, str]] = []
    ok = True
    if not args.no_tests:
        text, ok = run_tests()
        rows.append(("CUDA tests (pytest -m gpu)", text))
    if not args.no_bench:
        torch.backends.cuda.matmul.allow_tf32 = False
        bandwidth = copy_bandwidth()
        rows.append(("memory bandwidth (4 GiB device copy, read + write)",
                     f"{bandwidth / 1e12:.2f} TB/s"))
        ew = expert_weights()
        try:
            bench_dispatch(rows, ew)
        except (RuntimeError, torch.cuda.OutOfMemoryError) as exc:
            rows.append(("dispatch bf16", f"failed: {str(exc).splitlines()[0]}"))
            ok = False
        try:
            bench_decode(rows, ew, bandwidth)
        except RuntimeError as exc:
            rows.append(("decode", f"failed: {str(exc).splitlines()[0]}"))
            ok = False
        try:
            bench_neuron(rows, bandwidth)
        except (RuntimeError, ValueError) as exc:
            rows.append(("neuron FFN", f"failed: {str(exc).splitlines()[0]}"))
            ok = False
        try:
            bench_peer(rows)
        except (RuntimeError, ValueError) as exc:  # torch.cuda.OutOfMemoryError, moefy errors
            rows.append(("PEER bf16", f"failed: {str(exc).splitlines()[0]}"))
            ok = False
    rows.append(("wall time", f"{time.perf_counter() - start:.0f} s"))
    print_table(title, rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
