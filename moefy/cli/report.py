"""``moefy report OUT``: a converted model ──load──▶ one row per MoE layer; with ``--data``,
also the experts' load and each layer's error on that text (``moefy.report``)."""

from __future__ import annotations

from pathlib import Path

import torch

from moefy.cli.checkpoint import (
    checkpoint_dir,
    load_checkpoint,
    load_tokenizer,
    plan_info,
    writable_target,
)
from moefy.cli.console import Console
from moefy.cli.errors import CommandUsageError
from moefy.cli.inputs import at_least_one, check_seq_len, token_batches
from moefy.report import report


def cmd_report(args, console: Console) -> None:
    """Print one row per MoE layer of ``args.checkpoint``; with --data, measured on that text."""
    out = checkpoint_dir(args.checkpoint)
    info = plan_info(out)
    if args.plot and not args.data:
        raise CommandUsageError("--plot needs --data FILE.txt|DIR: the heatmap shows the "
                                "experts' load on that text")
    at_least_one(args, "seq_len", "batch_size", "max_tokens")
    if args.plot:
        writable_target(Path(args.plot), "the heatmap")
    model = load_checkpoint(out, console)
    batches = None
    if args.data:
        check_seq_len(model, args.seq_len)
        batches, tokens, files = token_batches(
            load_tokenizer(out), args.data, "--data", seq_len=args.seq_len,
            batch_size=args.batch_size, max_tokens=args.max_tokens)
        console.status(f"measuring on {tokens} tokens from {files} file(s)")
    with torch.inference_mode():
        rep = report(model, batches, heatmap=args.plot)
    print(f"{out}: {type(model).__name__}" + (f" from {info['source']}" if "source" in info
                                              else ""))
    print(rep)
    if any(row.get("rel err") is not None for row in rep.layers):
        print("rel err: each layer's output against the same layer with every expert active "
              "(for a split before distillation: the dense FFN)")
    if args.plot:
        print(f"wrote the load heatmap to {args.plot}")

