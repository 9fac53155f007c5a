"""Continue training an upcycled model with expert parallelism, under torchrun.

Each process loads the same dense model (SmolLM2-135M-Instruct offline, or ``--model tiny``: a
2-layer random LLaMA for a quick check), upcycles it (every FFN → E experts, top-k; the same
conversion on every rank), and ``moefy.distributed.expert_parallel`` keeps a contiguous block of
each layer's experts on each rank. Every rank trains on its own share of the text (installed
packages' docstrings, ``examples/corpus.py``): its tokens travel to the ranks that own their
experts and back (``all_to_all_single``); after ``backward`` the replicated parameters'
gradients are summed over the ranks (``moefy.distributed.reduce_gradients``; each
rank's loss is divided by the world size, so the step is one process's step on the whole
batch). Rank 0 prints the loss (language-model loss + ``--aux`` × Switch balance loss,
averaged over ranks), tokens/s over all ranks, and each layer's expert load (share of the
routed assignments of the busiest and the idlest expert, over all ranks).

One machine, 2 processes (gloo, CPU):

    torchrun --nproc-per-node 2 examples/train_ep.py --steps 10

Several machines (the same script on each; NCCL with one GPU per process):

    torchrun --nnodes 2 --node-rank 0 --nproc-per-node 8 --rdzv-backend c10d \\
        --rdzv-endpoint HOST:29500 examples/train_ep.py --backend nccl
    (and --node-rank 1 on the second machine)

Saving and resuming: ``--save DIR`` has every rank call ``moefy.save`` at the end (the experts
are gathered; rank 0 writes the checkpoint one process would write for the whole model), then
loads it back on every rank, shards it again and checks that it computes what the trained
model computes. ``--resume DIR`` continues from such a checkpoint (with any number of
processes) instead of upcycling: ``moefy.distributed.load_sharded`` reads only each
rank's experts from the file. The optimizer starts afresh (its state is not saved). Across
machines both need a folder every machine sees (a shared filesystem).

The experts are what each rank holds apart; E must be at least the world size for every
rank to own one (a rank with none only routes).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore", category=FutureWarning)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from corpus import sentences  # noqa: E402

import moefy  # noqa: E402
from moefy.distributed import load_sharded, reduce_gradients  # noqa: E402


def load(name: str):
    """(dense causal LM, tokenizer)."""
    from moefy.io.pretrained import load_pretrained, minilm_folder

    if name == "smollm2":
        pre = load_pretrained("smollm2")
        return pre.model, pre.tokenizer
    import transformers as tf

    tok = tf.AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=256,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256)
    return tf.LlamaForCausalLM(cfg), tok


class LoadMeter:
    """Counts, per MoE layer, the routed assignments each expert received in the last step
    (a forward hook re-runs only the router)."""

    def __init__(self, model):
        self.counts: dict[str, torch.Tensor] = {}
        for name, m in model.named_modules():
            if isinstance(m, moefy.MoE):
                m.register_forward_hook(self._hook(name))

    def _hook(self, name):
        def hook(module, args, output):
            with torch.no_grad():
                _, indices = module.route(args[0])
            self.counts[name] = torch.bincount(indices.reshape(-1),
                                               minlength=module.num_experts).float()
        return hook

    def summary(self) -> str:
        parts = []
        for i, counts in enumerate(self.counts.values()):
            dist.all_reduce(counts)  # every rank's tokens
            share = counts / counts.sum().clamp_min(1)
            parts.append(f"L{i} {share.max():.2f}/{share.min():.2f}")
        return "expert load max/min share: " + " ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("smollm2", "tiny"), default="smollm2")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--aux", type=float, default=1e-2, help="weight of the balance loss")
    parser.add_argument("--backend", default="gloo", help="gloo (CPU) or nccl (GPU)")
    parser.add_argument("--save", metavar="DIR", help="save the trained model here")
    parser.add_argument("--resume", metavar="DIR", help="continue from a moefy.save folder")
    args = parser.parse_args()

    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu")
    if args.backend == "nccl":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:  # the machine's cores shared among the processes
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    say = print if rank == 0 else (lambda *a, **k: None)

    dense, tok = load(args.model)
    tok.model_max_length = 1 << 30  # the text is cut into --seq-len rows below
    ids = tok(" ".join(sentences("packages", 4000)), return_tensors="pt").input_ids[0]
    rows = ids[: ids.numel() // args.seq_len * args.seq_len].view(-1, args.seq_len)
    example = {"input_ids": rows[:1]}
    if args.resume:  # each rank reads only its own experts
        model = load_sharded(args.resume)
        args.experts = next(m for m in model.modules() if isinstance(m, moefy.MoE)).num_experts
    else:
        model = moefy.convert(dense, moefy.MoEConfig(method="upcycle",
                                                     num_experts=args.experts,
                                                     top_k=args.top_k),
                              example_inputs=example)
    del dense
    # shard first, then move: each GPU receives only its block of the experts
    if not args.resume:
        model = moefy.distributed.expert_parallel(model)
    model = model.train().to(device)
    mine = rows[rank::world]  # each rank its own share of the text
    per_step = args.batch
    if mine.shape[0] < per_step:
        raise SystemExit(f"rank {rank}: only {mine.shape[0]} sequences of text")
    moes = sum(isinstance(m, moefy.MoE) for m in model.modules())
    local = sum(p.numel() for p in model.parameters()) / 1e6
    low, high = args.experts // world, -(-args.experts // world)
    origin = f"resumed from {args.resume}" if args.resume else f"{args.model} upcycled"
    say(f"{world} processes ({args.backend}); {origin}: {moes} MoE layers, "
        f"{args.experts} experts top-{args.top_k}, {low if low == high else f'{low}-{high}'} "
        f"experts per rank; {local:.1f}M parameters on rank 0; {per_step} × {args.seq_len} "
        "tokens per rank per step")
    meter = LoadMeter(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(args.steps):
        start = (step * per_step) % (mine.shape[0] - per_step + 1)
        batch = mine[start:start + per_step].to(device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(input_ids=batch, labels=batch).loss
        total = loss + args.aux * moefy.aux_loss(model)
        (total / world).backward()
        reduce_gradients(model)
        opt.step()
        seconds = torch.tensor([time.perf_counter() - t0], device=device)  # NCCL: on the GPU
        report = torch.stack([total.detach() / world])
        dist.all_reduce(report)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
        tokens = world * batch.numel()
        load_line = meter.summary()
        say(f"step {step + 1:3d}  loss {report.item():.4f}  {tokens / seconds.item():7.0f} "
            f"tokens/s  {load_line}", flush=True)
    if args.save:
        save_and_reload(model, tok, args, rows[-1:].to(device), device, say)
    dist.destroy_process_group()


def save_and_reload(model, tok, args, probe, device, say) -> None:
    """Every rank saves (the experts are gathered to rank 0, which writes), then every rank
    reads its own experts back (load_sharded) and compares its logits with the trained model's."""
    t0 = time.perf_counter()
    moefy.save(model, args.save, tokenizer=tok,
               info={"example": "train_ep", "steps": args.steps, "world": dist.get_world_size()})
    say(f"saved to {args.save} in {time.perf_counter() - t0:.1f} s (rank 0 wrote the "
        "gathered model)")
    again = load_sharded(args.save).to(device)
    with torch.no_grad():
        diff = (again(input_ids=probe).logits - model.eval()(input_ids=probe).logits).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    say(f"loaded on every rank and sharded again: logits differ by at most {diff.item():.2e}")


if __name__ == "__main__":
    main()
