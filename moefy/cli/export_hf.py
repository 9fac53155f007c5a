"""``moefy export-hf OUT -o DIR``: a converted model ──load──▶ a Hugging Face MoE checkpoint
(Mixtral, Qwen2-MoE, GLM4-MoE) that transformers loads without moefy (``moefy.export_hf``)."""

from __future__ import annotations

import time
from pathlib import Path

from moefy.cli.checkpoint import checkpoint_dir, load_checkpoint, load_tokenizer, out_dir, size_of
from moefy.cli.console import Console
from moefy.io.hf import export_hf


def cmd_export_hf(args, console: Console) -> None:
    """Write ``args.checkpoint`` as a Hugging Face ``args.architecture`` checkpoint."""
    out = checkpoint_dir(args.checkpoint)
    target = out_dir(args.output, "Hugging Face checkpoint", checkpoint=False)
    model = load_checkpoint(out, console)
    console.status(f"writing a {args.architecture} checkpoint to {target}")
    t = time.perf_counter()
    written = Path(export_hf(model, target, args.architecture,
                                   tokenizer=load_tokenizer(out)))
    names = sorted(f.name for f in written.iterdir())
    print(f"wrote {written} ({size_of(written)}) in {time.perf_counter() - t:.1f} s as "
          f"{args.architecture}: {', '.join(names)}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(written)!r})")

