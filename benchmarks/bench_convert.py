"""Conversion cost on a LLaMA-style model of ≈1.3B parameters (24 layers, H=2048, d_ff=5632,
random weights): wall time and peak memory of ``moefy.convert`` for upcycling and a balanced
k-means split. Each case runs in a fresh process so peak RSS is its own.

    python benchmarks/bench_convert.py
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time

CASES = {
    # E full copies of every FFN: E=8 would need ≈26 GiB for the result alone on this model,
    # more than this 24 GiB machine has; E=2 measures the same code path.
    "upcycle E=2 k=1": dict(method="upcycle", num_experts=2, top_k=1),
    "upcycle E=2 k=1, copy": dict(method="upcycle", num_experts=2, top_k=1),
    "split kmeans E=16 k=4": dict(method="split", num_experts=16, top_k=4, partition="kmeans"),
}


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(name: str) -> dict:
    import torch
    import transformers as tf

    import moefy

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                            num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16)
    model = tf.LlamaForCausalLM(config).eval()
    params = sum(p.numel() for p in model.parameters())
    model_mb = params * 4 / 2**20
    base = rss_mb()
    t0 = time.perf_counter()
    inplace = not name.endswith("copy")  # "copy": the default, the caller's model kept
    out = moefy.convert(model, moefy.MoEConfig(**CASES[name]), verify=False, inplace=inplace)
    seconds = time.perf_counter() - t0
    peak = rss_mb()
    out_params = sum(p.numel() for p in out.parameters())
    return dict(case=name, params=params, model_mb=model_mb, seconds=seconds,
                rss_before_mb=base, peak_mb=peak, converted_params=out_params,
                converted_mb=out_params * 4 / 2**20)


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--case":
        print(json.dumps(run_case(sys.argv[2])))
        return
    print("moefy.convert on a LLaMA-style model (24 layers, H=2048, d_ff=5632), float32, "
          "verify off; in place unless marked 'copy'")
    for name in CASES:
        res = subprocess.run([sys.executable, __file__, "--case", name], capture_output=True,
                             text=True, check=True)
        r = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"  {r['case']:<24} {r['seconds']:6.1f} s   model {r['params'] / 1e9:.2f}B params "
              f"({r['model_mb'] / 1024:.1f} GiB) → {r['converted_params'] / 1e9:.2f}B "
              f"({r['converted_mb'] / 1024:.1f} GiB); process RSS before "
              f"{r['rss_before_mb'] / 1024:.1f}"
              f" GiB, peak {r['peak_mb'] / 1024:.1f} GiB "
              f"(peak / dense model {r['peak_mb'] / r['model_mb']:.2f}×)")


if __name__ == "__main__":
    main()
