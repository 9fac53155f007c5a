"""Expert parallelism: the share of an MoE layer's time spent exchanging tokens, at 1, 2 and 4
processes (gloo on this machine), for the layer shapes of ``make bench``.

Each process holds its block of the experts (``moefy.distributed.expert_parallel``) and its own
tokens (the shape's token count per process); a forward is timed whole (barrier to barrier)
and the time inside ``torch.distributed.all_to_all_single`` (counts, pair metadata, rows and
weights out, rows back) is summed separately. Printed per shape and process count: median ms
per forward (the slowest rank), the exchange's share of it, tokens/s over all processes, and
the rows each token sends (one per rank that owns one of its top-k experts, at most k).
Inference (no_grad, eval); the machine's cores are shared among the processes.

Caveat: gloo between processes on one machine is a functional test of the exchange, not a
network; across machines (NCCL, InfiniBand) the exchange's share is a different number.

    python benchmarks/bench_ep.py [--worlds 1,2,4] [--rounds 10]    # spawns each world
    torchrun --nproc-per-node 2 benchmarks/bench_ep.py               # torchrun's world
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import moefy  # noqa: E402

# name: (hidden, experts, expert size, top-k, gated, activation, tokens per process)
SHAPES = {"C1": (768, 16, 192, 4, False, "gelu", 2048),
          "C2": (1024, 64, 64, 8, False, "gelu", 2048),
          "C3": (1024, 8, 2816, 2, True, "silu", 512)}


def _worker(rank: int, world: int, init: str | None, rounds: int, out: str) -> None:
    if init is None:  # under torchrun: rank, world and rendezvous from its environment
        dist.init_process_group("gloo")
    else:
        dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    spent = [0.0]
    plain = dist.all_to_all_single

    def timed_exchange(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return plain(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - t0

    dist.all_to_all_single = timed_exchange  # moefy's exchange looks it up at call time
    results = {}
    try:
        for name, (H, E, I, k, gated, act, T) in SHAPES.items():
            torch.manual_seed(0)
            moe = moefy.MoE(H, I, E, k, gated=gated, activation=act).eval()
            layer = moefy.distributed.expert_parallel(torch.nn.Sequential(moe))
            x = torch.randn(T, H, generator=torch.Generator().manual_seed(rank))
            totals, comms = [], []
            with torch.no_grad():
                for r in range(rounds + 1):
                    dist.barrier()
                    spent[0] = 0.0
                    t0 = time.perf_counter()
                    layer(x)
                    dist.barrier()
                    if r:  # the first round warms up
                        totals.append(time.perf_counter() - t0)
                        comms.append(spent[0])
            stats = torch.tensor([statistics.median(totals), statistics.median(comms)])
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
            # rows each token sends: one per rank that owns one of its experts (its slots
            # on that rank travel together)
            with torch.no_grad():
                sel = moe.select(x)
            owner = torch.bucketize(sel.indices, torch.tensor(
                moe.shard.bounds[1:-1]), right=True)
            visits = torch.tensor([float(sum(len(set(r)) for r in owner.tolist()) / T)])
            dist.all_reduce(visits)
            results[name] = stats.tolist() + [visits.item() / world]
    finally:
        dist.all_to_all_single = plain
        dist.destroy_process_group()
    if rank == 0:
        torch.save(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", default="1,2,4")
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as d:
        if "TORCHELASTIC_RUN_ID" in os.environ:  # launched by torchrun: its world, once
            world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
            worlds, out = [world], os.path.join(d, "result.pt")
            _worker(rank, world, None, args.rounds, out)
            if rank:
                return
            rows[world] = torch.load(out, weights_only=True)
        else:
            worlds = [int(w) for w in args.worlds.split(",")]
            for world in worlds:
                out = os.path.join(d, f"w{world}.pt")
                mp.start_processes(_worker, args=(world, f"file://{d}/store{world}",
                                                  args.rounds, out),
                                   nprocs=world, start_method="spawn")
                rows[world] = torch.load(out, weights_only=True)
    print(f"{'shape':6s} {'procs':>5s} {'ms/forward':>11s} {'exchange':>9s} "
          f"{'tokens/s':>10s} {'rows/token':>10s}")
    for name, shape in SHAPES.items():
        for world in worlds:
            total, comm, visits = rows[world][name]
            tokens = world * shape[-1]
            print(f"{name:6s} {world:5d} {total * 1e3:11.1f} {comm / total:9.0%} "
                  f"{tokens / total:10,.0f} {visits if world > 1 else 0:10.2f}")
    print("gloo on one machine, the cores shared by the processes: a functional test of the "
          "exchange, not a network")


if __name__ == "__main__":
    main()
