"""``moefy export-onnx OUT -o F.onnx``: a converted model ──load──▶ an ONNX file with its
experts lowered for the target, validated in ONNX Runtime (``moefy.export_onnx``)."""

from __future__ import annotations

import time
from pathlib import Path

from moefy.cli.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    load_tokenizer,
    size_of,
    writable_target,
)
from moefy.cli.console import Console
from moefy.cli.errors import CommandUsageError
from moefy.cli.inputs import check_seq_len, example_inputs
from moefy.onnx import export_onnx


def cmd_export_onnx(args, console: Console) -> None:
    """Export ``args.checkpoint`` to ``args.output``, validated in ONNX Runtime."""
    out = checkpoint_dir(args.checkpoint)
    target = Path(args.output)
    if target.suffix != ".onnx" or target.name == ".onnx":
        raise CommandUsageError(f"-o {target}: give a file name ending in .onnx")
    if target.is_dir():
        raise CommandUsageError(f"-o {target} is a directory; give the ONNX file to write")
    if args.seq_len < 2:
        raise CommandUsageError(f"--seq-len must be at least 2 (the export keeps the sequence "
                                f"axis dynamic), got {args.seq_len}")
    writable_target(target, "the ONNX file")
    model = load_checkpoint(out, console)
    check_seq_len(model, args.seq_len)
    inputs = example_inputs(model, load_tokenizer(out), 2, args.seq_len)
    console.status(f"exporting to {target} (target {args.target}) and checking it in ONNX "
                   "Runtime")
    t = time.perf_counter()
    result = export_onnx(model, target, inputs, target=args.target)
    diff = max(result.max_diff) if result.max_diff else float("nan")
    print(f"wrote {result.path} ({size_of(Path(result.path))}) in {time.perf_counter() - t:.1f} "
          f"s: target {result.target}, kernel {result.kernel}, opset {result.opset}, "
          f"{result.moe_layers} MoE layers")
    print(f"validated in ONNX Runtime against PyTorch on {len(result.max_diff)} input shapes: "
          f"max relative difference {diff:.1e} (tolerance {result.tolerance:.0e})")
    for note in result.notes:
        print(f"note: {note}")

