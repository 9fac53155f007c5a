"""Dense FFN vs PEER vs top-2 MoE in a small byte-level language model: PEER's comparison in
miniature, sized for a few CPU minutes.

A nanoGPT-style decoder (pre-norm, causal attention) learns to predict the bytes of the Python
standard library's source files (code and docstrings, read from this interpreter's stdlib; the
files are split into disjoint train and held-out sets). It is trained three times from the same
initialisation on the same batches with the same schedule:

    dense  every block has a dense FFN of width d_ff;
    peer   the middle block's FFN is ``moefy.PEER`` with heads · top_k = d_ff single-neuron
           experts per token (the same expert parameters per token) out of N = n² (He 2024);
    moe    the middle block's FFN is a top-2 ``moefy.MoE`` of experts of width d_ff / 2 (the
           same expert parameters per token), trained with its load-balancing and z losses.

It prints, per run: train and held-out loss in bits per byte, parameters in total and active per
token, training tokens/s, and for the routed layers the expert usage and unevenness over the
held-out set as PEER's Table 2 defines them (z_i = Σ_x g_i(x) over tokens and heads, normalised;
usage = share of experts with z_i > 0; unevenness = KL(z ‖ uniform) = log N + Σ z_i log z_i).
It plots the loss curves (against steps, and against training seconds) into a PNG and prints
its path. Optimizers: AdamW (no weight decay), and SparseAdam for PEER's two expert tables,
which take sparse gradients (``--dense-tables``: AdamW for them too). Train-mode PEER normalises
its queries with the batch's statistics, which include later tokens of the same sequences (as
in the paper); every loss reported is measured in eval mode, with the running statistics.

Run: ``python examples/peer_lm.py`` (600 steps per run: about 5–6 minutes on 2 idle cores at
the step rates measured there; 28 minutes when other jobs kept the load at 4); ``--bn-ablation``
adds a PEER run without the query BatchNorm (the paper's ablation); ``--steps 20`` for a quick
look.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sysconfig
import tempfile
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import moefy

# test suites, IDLE and generated tables are not the prose-and-code text we want to model
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3",
              "__pycache__", "pydoc_data", "encodings"}
_MAX_FILE_BYTES = 200_000  # a few huge files would otherwise dominate the held-out set


# ---------------------------------------------------------------------------------- data
def stdlib_bytes(train_bytes: int, heldout_bytes: int, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The stdlib's ``.py`` files as two uint8 tensors of about the sizes asked for.

    A file is held out when the CRC of its relative path says so (1 in 10), so the split is
    fixed by the file's name alone; the files are taken in a seeded shuffled order until both
    sides are full, and joined with a blank line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not _SKIP_DIRS.intersection(p.relative_to(root).parts[:-1]))
    random.Random(seed).shuffle(files)
    parts: dict[str, list[bytes]] = {"train": [], "heldout": []}
    size = {"train": 0, "heldout": 0}
    want = {"train": train_bytes, "heldout": heldout_bytes}
    for path in files:
        if all(size[s] >= want[s] for s in size):
            break
        side = "heldout" if zlib.crc32(str(path.relative_to(root)).encode()) % 10 == 0 \
            else "train"
        if size[side] >= want[side]:
            continue
        data = path.read_bytes()
        if len(data) > _MAX_FILE_BYTES:
            continue
        parts[side].append(data)
        size[side] += len(data) + 2
    if size["train"] < train_bytes // 2 or size["heldout"] < heldout_bytes // 2:
        raise SystemExit(f"peer_lm: the stdlib at {root} holds too little text "
                         f"({size['train']:,} train / {size['heldout']:,} held-out bytes)")
    train, heldout = (torch.frombuffer(bytearray(b"\n\n".join(parts[s])), dtype=torch.uint8)
                      for s in ("train", "heldout"))
    info = {"root": str(root), "train_files": len(parts["train"]),
            "heldout_files": len(parts["heldout"])}
    return train, heldout, info


def windows(data: torch.Tensor, starts: torch.Tensor, seq_len: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-byte targets, each (B, seq_len) int64, for windows beginning at
    ``starts`` (B,)."""
    idx = starts[:, None] + torch.arange(seq_len + 1)  # (B, L + 1)
    chunk = data[idx].long()
    return chunk[:, :-1], chunk[:, 1:]


# ---------------------------------------------------------------------------------- model
class CausalSelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, heads, L, D/heads)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    def __init__(self, width: int, ffn_size: int):
        super().__init__()
        self.fc_in = nn.Linear(width, ffn_size)
        self.fc_out = nn.Linear(ffn_size, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc_out(F.gelu(self.fc_in(x)))


class Block(nn.Module):
    def __init__(self, width: int, heads: int, ffn_size: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.ffn: nn.Module = MLP(width, ffn_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.ffn(self.ln_2(x))


class ByteLM(nn.Module):
    """A decoder-only transformer over bytes (vocabulary 256), output tied to the embedding."""

    def __init__(self, layers: int, width: int, heads: int, ffn_size: int, seq_len: int):
        super().__init__()
        self.tok = nn.Embedding(256, width)
        self.pos = nn.Embedding(seq_len, width)
        self.blocks = nn.ModuleList(Block(width, heads, ffn_size) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        for name, p in self.named_parameters():
            if name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    @property
    def middle(self) -> Block:
        return self.blocks[len(self.blocks) // 2]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok(ids) + self.pos.weight[: ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.t()  # (B, L, 256) logits


@dataclass
class Sizes:
    layers: int = 4
    width: int = 128
    heads: int = 4
    ffn_size: int = 512          # d_ff of the dense FFNs
    seq_len: int = 128
    peer_side: int = 128         # PEER: N = side² experts
    peer_heads: int = 8          # PEER: heads · top_k = ffn_size
    peer_key_dim: int = 64
    moe_experts: int = 8         # MoE: top-2 of these, each ffn_size / 2 wide


KINDS = ("dense", "peer", "moe", "peer-nobn")


def build(kind: str, sizes: Sizes, seed: int, sparse_tables: bool = True) -> ByteLM:
    """The same model for every ``kind`` (identical weights everywhere but the middle FFN),
    with the middle block's FFN replaced for "peer", "peer-nobn" and "moe"."""
    torch.manual_seed(seed)
    model = ByteLM(sizes.layers, sizes.width, sizes.heads, sizes.ffn_size, sizes.seq_len)
    torch.manual_seed(seed + 1)  # the replacement's own draws: the rest stays identical
    H = sizes.width
    if kind in ("peer", "peer-nobn"):
        top_k = sizes.ffn_size // sizes.peer_heads
        model.middle.ffn = moefy.PEER(
            H, sizes.peer_side ** 2, heads=sizes.peer_heads, top_k=top_k,
            key_dim=sizes.peer_key_dim, query_norm="batch" if kind == "peer" else None,
            sparse=sparse_tables)
    elif kind == "moe":
        model.middle.ffn = moefy.MoE(H, sizes.ffn_size // 2, num_experts=sizes.moe_experts,
                                     top_k=2)
    elif kind != "dense":
        raise ValueError(f"kind must be dense, peer, peer-nobn or moe, got {kind!r}")
    return model


def param_counts(model: ByteLM) -> tuple[int, int]:
    """(total, active per token): the routed layer's unselected experts are inactive;
    everything else (attention, other FFNs, embeddings, the PEER query network and product
    keys, the MoE router) counts as active."""
    total = sum(p.numel() for p in model.parameters())
    ffn = model.middle.ffn
    if isinstance(ffn, moefy.MoE):
        per_expert = sum(p[0].numel() for p in (ffn.w_in, ffn.w_out, ffn.b_in, ffn.b_out)
                         if p is not None)
        return total, total - (ffn.num_experts - ffn.top_k) * per_expert
    if isinstance(ffn, moefy.PEER):
        tables = [t for t in (ffn.down, ffn.up, ffn.gate) if t is not None]
        n, per_expert = tables[0].shape[0], sum(t.shape[1] for t in tables)
        return total, total - (n - ffn.heads * ffn.top_k) * per_expert
    return total, total


# ---------------------------------------------------------------------------------- training
@dataclass
class Run:
    name: str
    steps: int = 0
    train_curve: list[float] = field(default_factory=list)     # per step, nats/byte
    # (step, training seconds so far, held-out bits/byte)
    eval_curve: list[tuple[int, float, float]] = field(default_factory=list)
    train_bpb: float = math.nan
    heldout_bpb: float = math.nan
    total_params: int = 0
    active_params: int = 0
    tokens_per_s: float = math.nan
    usage: float | None = None
    unevenness: float | None = None
    optimizers: str = ""


def optimizers(model: ByteLM, lr: float, sparse_tables: bool) -> list[torch.optim.Optimizer]:
    """AdamW for everything, except PEER's expert tables when they take sparse gradients:
    SparseAdam (no weight decay anywhere, so the two make the same update on the rows a step
    touches; SparseAdam leaves the moments of untouched rows alone)."""
    ffn = model.middle.ffn
    sparse = []
    if sparse_tables and isinstance(ffn, moefy.PEER):
        sparse = [t for t in (ffn.down, ffn.up, ffn.gate) if t is not None]
    dense = [p for p in model.parameters() if all(p is not s for s in sparse)]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(dense, lr=lr, betas=(0.9, 0.95), weight_decay=0.0)]
    if sparse:
        opts.append(torch.optim.SparseAdam(sparse, lr=lr, betas=(0.9, 0.95)))
    return opts


def schedule(step: int, steps: int) -> float:
    """Learning-rate factor: linear warm-up over 5% of the steps, cosine decay to 10%."""
    warm = max(1, steps // 20)
    if step < warm:
        return (step + 1) / warm
    return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))


@torch.no_grad()
def evaluate(model: ByteLM, data: torch.Tensor, starts: torch.Tensor, seq_len: int,
             batch: int) -> float:
    """Mean next-byte loss in bits per byte over the windows at ``starts``."""
    was_training = model.training
    model.eval()  # PEER's query BatchNorm uses its running statistics: no batch leaks in
    total = 0.0
    for i in range(0, len(starts), batch):
        x, y = windows(data, starts[i:i + batch], seq_len)
        total += F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    model.train(was_training)
    return total / (len(starts) * seq_len) / math.log(2)


@contextmanager
def expert_load(layer: nn.Module):
    """Within the block, every forward of ``layer`` adds its routing weights to z (N,):
    z_i = Σ_x Σ_heads g_i(x). The hook is always removed on leaving."""
    if isinstance(layer, moefy.MoE):
        z = torch.zeros(layer.num_experts, dtype=torch.float64)

        def hook(module, args, out):
            weights, ids = module.route(args[0])  # (T, k) each
            z.index_add_(0, ids.flatten(), weights.flatten().double())
    else:
        z = torch.zeros(layer.num_experts, dtype=torch.float64)

        def hook(module, args, out):
            r = module.route(args[0])  # ids, weights: (T, heads, k)
            z.index_add_(0, r.ids.flatten(), r.weights.flatten().double())
    handle = layer.register_forward_hook(hook)
    try:
        yield z
    finally:
        handle.remove()


def usage_unevenness(z: torch.Tensor) -> tuple[float, float]:
    """PEER's Table 2: usage = share of experts with z_i > 0; unevenness = KL(z ‖ uniform)
    = log N + Σ z_i log z_i, with z normalised to sum 1 (0 log 0 = 0)."""
    z = z / z.sum()
    nz = z[z > 0]
    return float((z > 0).double().mean()), float(math.log(len(z)) + (nz * nz.log()).sum())


def train(kind: str, model: ByteLM, train_data: torch.Tensor, heldout: torch.Tensor,
          batches: torch.Tensor, train_eval: torch.Tensor, heldout_eval: torch.Tensor, *,
          sizes: Sizes, lr: float, eval_every: int, seconds: float | None,
          sparse_tables: bool, progress: bool) -> Run:
    run = Run(kind)
    run.total_params, run.active_params = param_counts(model)
    opts = optimizers(model, lr, sparse_tables)
    run.optimizers = " + ".join(type(o).__name__ for o in opts)
    steps, batch = batches.shape
    model.train()
    # tokens/s leaves out the first steps (thread pools, allocator and kernel caches warm up)
    skip = min(3, steps // 4)
    busy = timed = 0.0
    bar = tqdm(range(steps), desc=f"{kind:>9}", disable=not progress, leave=False)
    for step in bar:
        if step % eval_every == 0:
            run.eval_curve.append((step, busy, evaluate(model, heldout, heldout_eval,
                                                        sizes.seq_len, batch)))
        t0 = time.perf_counter()
        x, y = windows(train_data, batches[step], sizes.seq_len)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        run.train_curve.append(loss.item())
        if not math.isfinite(run.train_curve[-1]):
            raise SystemExit(f"peer_lm: {kind}: the loss is not finite at step {step}")
        total = loss + moefy.aux_loss(model) if kind == "moe" else loss
        for o in opts:
            o.zero_grad(set_to_none=True)
        total.backward()
        factor = schedule(step, steps)
        for o in opts:
            for g in o.param_groups:
                g["lr"] = lr * factor
            o.step()
        spent = time.perf_counter() - t0
        busy += spent
        timed += spent if step >= skip else 0.0
        run.steps = step + 1
        bar.set_postfix(bpb=f"{run.train_curve[-1] / math.log(2):.3f}")
        if seconds is not None and busy > seconds:
            print(f"{kind}: time budget reached after {run.steps} steps", flush=True)
            break
    if run.steps <= skip:  # stopped before any timed step: count them all
        skip, timed = 0, busy
    run.tokens_per_s = (run.steps - skip) * batch * sizes.seq_len / timed
    run.train_bpb = evaluate(model, train_data, train_eval, sizes.seq_len, batch)
    ffn = model.middle.ffn
    if isinstance(ffn, (moefy.MoE, moefy.PEER)):
        with expert_load(ffn) as z:
            run.heldout_bpb = evaluate(model, heldout, heldout_eval, sizes.seq_len, batch)
        run.usage, run.unevenness = usage_unevenness(z)
    else:
        run.heldout_bpb = evaluate(model, heldout, heldout_eval, sizes.seq_len, batch)
    run.eval_curve.append((run.steps, busy, run.heldout_bpb))
    return run


# ---------------------------------------------------------------------------------- report
def plot(runs: list[Run], path: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no display, no global state

    fig = Figure(figsize=(12, 5), layout="constrained")
    by_step, by_time = fig.subplots(1, 2, sharey=True)
    for i, run in enumerate(runs):
        colour = f"C{i}"
        curve = torch.tensor(run.train_curve) / math.log(2)
        window = max(1, len(curve) // 25)  # a moving average: one batch is noisy
        smooth = curve.unfold(0, window, 1).mean(1) if len(curve) >= window else curve
        by_step.plot(range(window - 1, window - 1 + len(smooth)), smooth, color=colour, lw=1,
                     alpha=0.7, label=f"{run.name} train (moving mean)")
        steps, seconds, bpb = zip(*run.eval_curve, strict=True)
        by_step.plot(steps, bpb, color=colour, lw=2, ls="--", marker="o", ms=3,
                     label=f"{run.name} held-out")
        by_time.plot(seconds, bpb, color=colour, lw=2, ls="--", marker="o", ms=3,
                     label=f"{run.name} held-out")
    by_step.set_xlabel("step (the same batches for every run)")
    by_step.set_ylabel("bits per byte")
    by_time.set_xlabel(f"training seconds on {torch.get_num_threads()} CPU threads")
    fig.suptitle("byte-level LM on Python stdlib source: the middle block's FFN as "
                 "dense / PEER / top-2 MoE at equal active expert parameters")
    for ax in (by_step, by_time):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    # the first tenth of training falls from 8 bits (uniform bytes): leave it off the scale
    after = max(1, len(runs[0].train_curve) // 10)
    top = max(max(r.train_curve[after:] or r.train_curve) / math.log(2) for r in runs)
    by_step.set_ylim(top=top * 1.02)
    fig.savefig(path, dpi=120)


def table(runs: list[Run]) -> str:
    header = (f"{'run':<10} {'steps':>5} {'train bpb':>9} {'held bpb':>8} {'params':>9} "
              f"{'active':>8} {'tok/s':>7} {'usage':>7} {'uneven':>6}  optimizers")
    lines = [header, "-" * len(header)]
    for r in runs:
        usage = "—" if r.usage is None else f"{r.usage:.1%}"
        uneven = "—" if r.unevenness is None else f"{r.unevenness:.2f}"
        lines.append(f"{r.name:<10} {r.steps:>5} {r.train_bpb:>9.3f} {r.heldout_bpb:>8.3f} "
                     f"{r.total_params / 1e6:>8.2f}M {r.active_params / 1e6:>7.2f}M "
                     f"{r.tokens_per_s:>7.0f} {usage:>7} {uneven:>6}  {r.optimizers}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    d = Sizes()
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="training steps per run")
    p.add_argument("--minutes", type=float, default=None,
                   help="also stop each run after this many minutes of training (the learning-rate "
                        "schedule still spans --steps)")
    p.add_argument("--batch", type=int, default=16, help="sequences per step")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=50, help="steps between held-out evals")
    p.add_argument("--eval-windows", type=int, default=128, help="held-out windows per eval")
    p.add_argument("--train-bytes", type=int, default=4_000_000)
    p.add_argument("--heldout-bytes", type=int, default=400_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None,
                   help="folder for peer_lm.png (default: a new temporary folder)")
    p.add_argument("--runs", default="dense,peer,moe",
                   help="comma-separated: dense, peer, moe, peer-nobn")
    p.add_argument("--bn-ablation", action="store_true",
                   help="add a PEER run without query BatchNorm (peer-nobn)")
    p.add_argument("--dense-tables", action="store_true",
                   help="PEER tables with dense gradients and AdamW instead of SparseAdam")
    p.add_argument("--no-progress", action="store_true")
    for name, value in vars(d).items():
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=value)
    args = p.parse_args(argv)
    args.kinds = [k.strip() for k in args.runs.split(",") if k.strip()]
    if args.bn_ablation and "peer-nobn" not in args.kinds:
        args.kinds.append("peer-nobn")
    unknown = sorted(set(args.kinds) - set(KINDS))
    if unknown or not args.kinds:
        p.error(f"--runs takes a comma-separated list of {', '.join(KINDS)}; got {args.runs!r}")
    if args.ffn_size % args.peer_heads or args.ffn_size % 2:
        p.error(f"--ffn-size ({args.ffn_size}) must be even and divisible by --peer-heads "
                f"({args.peer_heads}): PEER's heads · top_k and the MoE's 2 experts make d_ff")
    if args.steps < 1 or args.eval_every < 1 or args.eval_windows < 1:
        p.error("--steps, --eval-every and --eval-windows must be at least 1")
    return args


def main(argv: list[str] | None = None) -> list[Run]:
    args = parse_args(argv)
    sizes = Sizes(**{k: getattr(args, k) for k in vars(Sizes())})
    torch.set_num_threads(args.threads)
    out = Path(tempfile.mkdtemp(prefix="moefy-peer-lm-")) if args.out is None else args.out
    out.mkdir(parents=True, exist_ok=True)

    train_data, heldout, info = stdlib_bytes(args.train_bytes, args.heldout_bytes, args.seed)
    g = torch.Generator().manual_seed(args.seed)
    L = sizes.seq_len
    # the same batches, in the same order, for every run
    batches = torch.randint(0, len(train_data) - L - 1, (args.steps, args.batch), generator=g)
    # evaluation windows: evenly spaced, fixed for the whole script
    heldout_eval = torch.linspace(0, len(heldout) - L - 2, args.eval_windows).long()
    train_eval = torch.linspace(0, len(train_data) - L - 2, args.eval_windows).long()
    top_k = sizes.ffn_size // sizes.peer_heads
    print(f"text: {info['root']}/**.py, {len(train_data):,} train bytes "
          f"({info['train_files']} files), {len(heldout):,} held-out bytes "
          f"({info['heldout_files']} other files); byte-level, vocabulary 256")
    print(f"model: {sizes.layers} blocks, width {sizes.width}, {sizes.heads} attention heads, "
          f"context {L}, d_ff {sizes.ffn_size}; middle block {sizes.layers // 2}: "
          f"dense FFN | PEER N={sizes.peer_side}²={sizes.peer_side ** 2:,} "
          f"h={sizes.peer_heads} k={top_k} (h·k={sizes.ffn_size} = d_ff) key_dim "
          f"{sizes.peer_key_dim} | MoE {sizes.moe_experts}×{sizes.ffn_size // 2} top-2")
    print(f"training: {args.steps} steps × {args.batch} × {L} bytes, AdamW lr {args.lr} "
          f"(warm-up, cosine), seed {args.seed}, {torch.get_num_threads()} threads\n")

    runs = []
    for kind in args.kinds:
        model = build(kind, sizes, args.seed, sparse_tables=not args.dense_tables)
        runs.append(train(kind, model, train_data, heldout, batches, train_eval, heldout_eval,
                          sizes=sizes, lr=args.lr, eval_every=args.eval_every,
                          seconds=None if args.minutes is None else args.minutes * 60,
                          sparse_tables=not args.dense_tables,
                          progress=not args.no_progress))
        # other processes on the machine slow tokens/s down (never the losses): say how busy
        print(f"{kind}: {runs[-1].steps} steps, held-out {runs[-1].heldout_bpb:.3f} bits/byte, "
              f"{runs[-1].tokens_per_s:,.0f} tokens/s (load average {os.getloadavg()[0]:.1f} "
              f"on {os.cpu_count()} CPUs)", flush=True)
    print()
    print(table(runs))
    print("\nbpb: bits per byte on fixed windows (train: of the training text, held-out: of "
          "other files); active: parameters a token uses (the routed layer's selected experts "
          "plus everything else, PEER's query network and keys included); usage/uneven: over "
          "the held-out windows (PEER Table 2)")
    path = out / "peer_lm.png"
    plot(runs, path)
    print(f"plot: {path}")
    return runs


if __name__ == "__main__":
    main()
