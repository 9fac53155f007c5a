"""Single-neuron experts on SmolLM2-135M: held-out perplexity and batch-1 decode speed of
``MoEConfig(method="neuron")`` at several budgets, against the dense model, in one run.

For each selection ("input": TEAL/WINA input channels of every projection and the FFN's
neurons by |h|; "gate": the gate computed on its selected inputs, then neurons by a
calibrated |act(g)|·c; "sequence": GRIFFIN, one FFN neuron set per sequence picked by its
prompt, the attention projections input-sparse per token) and each ``active`` (the share
of the decoder layers' projection weights a token reads), it converts the dense model
(calibration: installed packages' docstrings), then measures on the standard library's
docstrings (disjoint):

- perplexity as a multiple of the dense model's: over whole 256-token windows in one call
  ("ppl x"), and decoding (``moefy.evaluate.decode_perplexity``: each window's first half
  prefilled, the rest fed one token at a time through the KV cache and scored: "decode ppl x",
  the regime generation runs in, where a per-sequence set cannot hide behind an exact prefill);
- first, the dense model with every projection and the head read by moefy's row kernel
  (the same function): the share of a speed-up that is the kernel's rather than the
  sparsity's;
- greedy decode tokens/s at batch 1 (after a 64-token prompt), as a ratio to dense measured
  alternately in the same run (medians of ``--rounds``);
- prefill: one forward over a 256-token prompt, as a ratio to dense (the masked path: it
  must not be slower than dense).

    python examples/neuron_smollm2.py [--active 0.75 0.5 0.35] [--selection input gate sequence]
                                      [--ffn-only] [--minutes M]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import sentences  # noqa: E402

from moefy import MoEConfig, convert, evaluate  # noqa: E402
from moefy.io.pretrained import load_pretrained  # noqa: E402
from moefy.layers.neuron import NeuronFFN, SparseLinear, linears_by_rows  # noqa: E402

SEQ = 256


def chunks(tokenizer, text: str, tokens: int) -> torch.Tensor:
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    n = min(tokens, ids.numel()) // SEQ
    return ids[: n * SEQ].view(n, SEQ)


def perplexity(model, seqs: torch.Tensor) -> float:
    return evaluate.perplexity(model, [{"input_ids": b} for b in seqs.split(4)])


def decode_perplexity(model, seqs: torch.Tensor) -> float:
    return evaluate.decode_perplexity(model, [{"input_ids": seqs}])


@torch.no_grad()
def decode_seconds(model, prompt: torch.Tensor, new: int) -> float:
    """Seconds per generated token: greedy, batch 1, KV cache, prompt not counted."""
    name = evaluate.cache_argument(model)
    out = model(input_ids=prompt, use_cache=True)
    cache, token = evaluate.cache_of(out), out.logits[:, -1:].argmax(-1)
    t0 = time.perf_counter()
    for _ in range(new):
        out = model(input_ids=token, use_cache=True, **{name: cache})
        cache, token = evaluate.cache_of(out), out.logits[:, -1:].argmax(-1)
    return (time.perf_counter() - t0) / new


@torch.no_grad()
def prefill_seconds(model, ids: torch.Tensor) -> float:
    """Seconds for one forward over a whole prompt (no cache): the prefill."""
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False)
    return time.perf_counter() - t0


def shares(model) -> str:
    """Per matrix kind, the mean share kept that the allocation chose."""
    kinds: dict[str, list[float]] = {}
    for name, m in model.named_modules():
        rec = getattr(m, "conversion", None)
        if isinstance(m, SparseLinear) and rec is not None and "share_in" in rec:
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(rec["share_in"])
        elif isinstance(m, NeuronFFN) and rec is not None and "share_keep" in rec:
            kinds.setdefault("ffn set", []).append(rec["share_keep"])
        elif isinstance(m, NeuronFFN) and rec is not None and "share_in" in rec:
            kinds.setdefault("ffn in", []).append(rec["share_in"])
            kinds.setdefault("ffn h", []).append(rec["share_h"])
    return " ".join(f"{k}:{sum(v) / len(v):.2f}" for k, v in kinds.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--active", type=float, nargs="+", default=[0.75, 0.5, 0.35])
    parser.add_argument("--selection", nargs="+", default=["input", "gate", "sequence"])
    parser.add_argument("--ffn-only", action="store_true")
    parser.add_argument("--minutes", type=float, default=None,
                        help="conversion budget: what building leaves distils (default none)")
    parser.add_argument("--tokens", type=int, default=4096, help="held-out tokens (4096)")
    parser.add_argument("--calibration", type=int, default=4096, help="calibration tokens")
    parser.add_argument("--new", type=int, default=32, help="decoded tokens per timing")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    t0 = time.perf_counter()
    pre = load_pretrained("smollm2")
    dense, tok = pre.model, pre.tokenizer
    held = chunks(tok, " ".join(sentences("stdlib", 2000)), args.tokens)
    calib = chunks(tok, " ".join(sentences("packages", 1500)), args.calibration)
    batches = [{"input_ids": b} for b in calib.split(4)]
    prompt = held[0:1, :64]
    base, dbase = perplexity(dense, held), decode_perplexity(dense, held)
    print(f"SmolLM2-135M-Instruct: {held.numel()} held-out tokens, dense perplexity {base:.3f} "
          f"(decoding: {dbase:.3f}); {calib.numel()} calibration tokens; "
          f"{torch.get_num_threads()} threads", flush=True)
    rows, d, r = linears_by_rows(dense), [], []
    for _ in range(args.rounds):
        d.append(decode_seconds(dense, prompt, args.new))
        r.append(decode_seconds(rows, prompt, args.new))
    print(f"dense through moefy's row kernel (every projection and the head, the same "
          f"function): decode {statistics.median(d) / statistics.median(r):.2f}x dense")
    del rows
    print(f"{'selection':9s} {'active':>6s} {'ppl x':>7s} {'decode ppl x':>12s} {'decode x':>8s} "
          f"{'prefill x':>9s} {'convert s':>9s}  mean share kept per matrix")
    for selection in args.selection:
        for active in args.active:
            c0 = time.perf_counter()
            model = convert(dense, MoEConfig(method="neuron", active=active,
                                             selection=selection, ffn_only=args.ffn_only,
                                             minutes=args.minutes),
                            calibration_data=batches)
            took = time.perf_counter() - c0
            ratio = perplexity(model, held) / base
            dratio = decode_perplexity(model, held) / dbase
            d, s = [], []
            for _ in range(args.rounds):
                d.append(decode_seconds(dense, prompt, args.new))
                s.append(decode_seconds(model, prompt, args.new))
            speed = statistics.median(d) / statistics.median(s)
            pd, ps = [], []
            for _ in range(args.rounds):
                pd.append(prefill_seconds(dense, held[:1]))
                ps.append(prefill_seconds(model, held[:1]))
            prefill = statistics.median(pd) / statistics.median(ps)
            print(f"{selection:9s} {active:6.2f} {ratio:7.3f} {dratio:12.3f} {speed:7.2f}x "
                  f"{prefill:8.2f}x "
                  f"{took:9.0f}  {shares(model)}", flush=True)
            del model
    print(f"dense decode {1 / statistics.median(d):.1f} tokens/s; "
          f"{time.perf_counter() - t0:.0f} s in all")


if __name__ == "__main__":
    main()
