"""benchmarks/bench_peer.py at tiny sizes: the table has its rows, every number is finite, the
straightforward baseline computes the same function as moefy.PEER, and the peak-memory runs
see the (T, h, k, H) tensors the baseline materialises."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_peer.py"
# T·h·k·H·4 B = 1 MiB: big enough for RSS to see, small enough to run in seconds
TINY = ["--experts", "256", "--hidden", "256", "--heads", "2", "--top-k", "4", "--tokens", "128",
        "--key-dim", "16", "--rounds", "1", "--gemm", "64,64,64"]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_peer", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_table_rows_and_finite_numbers(bench, keep_threads, capsys):
    res = bench.main(TINY)
    out = capsys.readouterr().out
    for row in (*bench.STAGES, "moefy.PEER", "straightforward (materialised)",
                "speed-up of moefy", "dense GEMM", "unavoidable GFLOP", "issue 12 goals"):
        assert row in out, f"row {row!r} missing from the table:\n{out}"
    for mode in bench.MODES:
        assert set(res["stages"][mode]) == set(bench.STAGES)
        assert set(res["whole"][mode]) == set(bench.IMPLS)
        times = [*res["stages"][mode].values(), *res["whole"][mode].values()]
        assert all(math.isfinite(t) and t > 0 for t in times), times
    assert math.isfinite(res["rate"]) and res["rate"] > 0
    assert res["ideal"] > 0 and res["param_bytes"] > 0
    # the baseline is the same layer computed another way: same output and dL/dx
    assert res["agreement"]["y"] < 1e-5 and res["agreement"]["dx"] < 1e-5, res["agreement"]
    assert set(res["memory"]) == {(i, m) for i in bench.IMPLS for m in bench.MODES}
    assert all(b >= 0 for b in res["memory"].values()), res["memory"]
    # the baseline's forward holds down[ids] and up[ids], (T, h, k, H) float32 each: RSS
    # measured in the child process must see at least most of those 2 MiB
    unit = 128 * 2 * 4 * 256 * 4
    assert res["memory"]["straightforward", "forward"] >= 1.5 * unit, res["memory"]


def test_bad_gemm_shape_is_refused(bench):
    with pytest.raises(SystemExit):
        bench.parse_args(["--gemm", "64,64"])
