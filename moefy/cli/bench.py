"""``moefy bench OUT``: the dense model and the converted one, timed on the same inputs in
eager PyTorch and in ONNX Runtime, one table. Rounds alternate between the models, so a busy
machine slows both alike, and a note says when other processes used the cores meanwhile."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from moefy.cli.checkpoint import checkpoint_dir, load_checkpoint, load_tokenizer, plan_info
from moefy.cli.console import Console
from moefy.cli.errors import CommandUsageError
from moefy.cli.inputs import at_least_one, check_seq_len, example_inputs
from moefy.onnx import export_onnx


def cmd_bench(args, console: Console) -> None:
    """Time the dense model and ``args.checkpoint`` in PyTorch and ONNX Runtime; print a table."""
    from moefy.io.pretrained import load_pretrained

    out = checkpoint_dir(args.checkpoint)
    at_least_one(args, "batch", "seq_len", "runs")
    source = args.dense or plan_info(out).get("source")
    if not source:
        raise CommandUsageError(f"{out} does not say which dense model it came from; name it "
                                "with --dense MODEL")
    console.status(f"loading the dense model {source}")
    with console.libraries_quiet():
        dense = load_pretrained(source).model
    moe = load_checkpoint(out, console)
    _same_architecture(dense, moe, source)
    check_seq_len(moe, args.seq_len)
    inputs = example_inputs(moe, load_tokenizer(out), args.batch, args.seq_len)
    models = {"dense": dense, "MoE": moe}
    rows = []  # (model, engine, times)
    start = _cpu_seconds()
    console.status("timing PyTorch (eager)")
    with torch.inference_mode():
        rows += [(name, "PyTorch", t) for name, t in _interleaved(
            {name: (lambda m=m: m(**inputs)) for name, m in models.items()}, args.runs,
            console)]
    if not args.no_onnx:
        rows += _bench_onnx(models, inputs, args.runs, console)
    busy = busy_note(start, _cpu_seconds())
    tokens = args.batch * args.seq_len
    print(f"{out}: batch {args.batch} x {args.seq_len} tokens, median of {args.runs} runs "
          f"after a warm-up, {torch.get_num_threads()} threads; dense = {source}")
    table = [["model", "engine", "ms", "tokens/s", "vs dense"]]
    for name, engine, times in rows:
        ms = statistics.median(times) * 1e3
        base = next(statistics.median(t) for n, e, t in rows if n == "dense" and e == engine)
        table.append([name, engine, f"{ms:.2f}", f"{tokens / ms * 1e3:,.0f}",
                      f"{base / statistics.median(times):.2f}x"])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    if busy is not None:
        print(busy)


def _same_architecture(dense, moe, source: str) -> None:
    """bench compares a model with its own dense original, not with any other model."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    want = {k: getattr(getattr(moe, "config", None), k, None) for k in keys}
    got = {k: getattr(getattr(dense, "config", None), k, None) for k in keys}
    if type(dense).__name__ != type(moe).__name__ or want != got:
        differ = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in keys if got[k] != want[k])
        raise CommandUsageError(
            f"--dense {source} is a {type(dense).__name__} ({differ or 'another class'}), not "
            f"the dense {type(moe).__name__} this checkpoint was converted from: name that one")


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds every process has used, CPU seconds of this one), or None
    where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            # user nice system idle iowait irq softirq steal (guest time is within user)
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def busy_note(start, end) -> str | None:
    """A note when other processes used the cores while timing: the timings then say more
    about them than about the models (on 2 cores a busy neighbour slowed PyTorch's small
    operators 10-100x: its threads wait for each other)."""
    if start is None or end is None:
        return None
    wall = max(end[0] - start[0], 1e-9)
    others = ((end[1] - start[1]) - (end[2] - start[2])) / wall  # cores, on average
    if others < 0.25:
        return None
    return (f"note: other processes kept {others:.1f} of {os.cpu_count()} cores busy while "
            "timing, so these timings are unreliable; rerun on an idle machine")


def _interleaved(calls: dict, runs: int, console: Console) -> list[tuple[str, list[float]]]:
    """Time each call ``runs`` times after one warm-up, alternating between them so that a
    change of machine load hits all alike."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    with console.bar("bench", total=runs, unit="round") as bar:
        for _ in range(runs):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
            bar.update(1)
    return list(times.items())


def _bench_onnx(models: dict, inputs: dict, runs: int, console: Console) -> list:
    from moefy.runtime import Session

    with tempfile.TemporaryDirectory(prefix="moefy-bench-") as tmp:
        sessions = {}
        for name, model in models.items():
            console.status(f"exporting the {name} model to ONNX")
            path = Path(tmp) / f"{name.lower()}.onnx"
            with warnings.catch_warnings():
                # the dense model has no MoE layer, and that is the point here
                warnings.filterwarnings("ignore", message=".*holds no moefy.MoE")
                # the export-onnx command validates; here only the time is measured
                export_onnx(model, path, inputs, target="ort", validate=False)
            # the sessions take turns: a spinning idle pool would steal the other's cores
            sessions[name] = Session(path, config={"session.intra_op.allow_spinning": "0"})
        feeds = {name: {k: v.numpy() for k, v in inputs.items() if k in s.input_names}
                 for name, s in sessions.items()}
        console.status("timing ONNX Runtime")
        return [(name, "ONNX Runtime", t) for name, t in _interleaved(
            {name: (lambda s=s, f=feeds[name]: s.run(f)) for name, s in sessions.items()},
            runs, console)]

