"""moefy demo: a dense FFN rewritten as a Mixture of Experts, checked and timed.

1. Take a dense GELU FFN (H=768, d_ff=3072 — BERT-base sized, random weights).
2. Split its 3072 neurons into 16 experts of 192 (the MoEfication construction) inside a
   ``moefy.MoE`` with ``combine="sum"``; the output bias goes to the always-on part.
3. With all 16 experts active the MoE *is* the dense FFN: check it.
4. Route each token to 4 of 16 experts (25% of the FFN) and time it against the dense FFN.

Run: ``make demo`` (or ``python examples/demo.py``).
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

import moefy


def median_ms(fn, x, repeats: int) -> float:
    fn(x)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    H, D, E = 768, 3072, 16
    dense = nn.Sequential(nn.Linear(H, D), nn.GELU(), nn.Linear(D, H)).eval()

    moe = moefy.MoE(H, D // E, num_experts=E, top_k=E, combine="sum").eval()
    with torch.no_grad():
        w1, b1 = dense[0].weight, dense[0].bias  # (D, H), (D,)
        w2, b2 = dense[2].weight, dense[2].bias  # (H, D), (H,)
        moe.w_in.copy_(w1.view(E, D // E, H))
        moe.b_in.copy_(b1.view(E, D // E))
        moe.w_out.copy_(w2.view(H, E, D // E).permute(1, 0, 2))
        moe.b_out.zero_()  # experts carry no output bias ...
        moe.shared.bias = nn.Parameter(b2.clone())  # ... the always-on part does
        # Router: each expert's centre, the mean direction of its neurons' input weights.
        centres = nn.functional.normalize(w1, dim=1).view(E, D // E, H).mean(1)
        moe.router.weight.copy_(centres)

    x = torch.randn(8, 256, H)  # 2048 tokens
    with torch.no_grad():
        ref = dense(x)
        exact = moe(x)
        err = ((exact - ref).abs().max() / ref.abs().max()).item()
        print(f"16 of 16 experts active: max relative difference to the dense FFN = {err:.2e}")
        assert err < 1e-5, "all experts active must reproduce the dense FFN"

        moe.top_k = 4
        sparse = moe(x)
        rel = ((sparse - ref).norm() / ref.norm()).item()
        print(f" 4 of 16 experts active: relative error {rel:.3f} "
              "(untrained similarity router; calibration and distillation close this gap)")

        print("\nspeed, median of repeated forwards (same weights, float32, "
              f"{torch.get_num_threads()} threads):")
        for tokens, repeats in ((2048, 20), (8, 200), (1, 400)):
            xt = x.reshape(-1, H)[:tokens]
            t_dense = median_ms(dense, xt, repeats)
            t_moe = median_ms(moe, xt, repeats)
            print(f"  {tokens:5d} tokens: dense FFN {t_dense:8.3f} ms   moefy top-4/16 "
                  f"{t_moe:8.3f} ms   ratio {t_moe / t_dense:.2f} (ideal 0.25)")


if __name__ == "__main__":
    main()
