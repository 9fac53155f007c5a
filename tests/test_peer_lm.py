"""examples/peer_lm.py: dense, PEER and top-2 MoE language models train (tiny sizes, a few
steps), their losses fall, PEER's expert usage is measured, and the plot is written."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "peer_lm.py"
TINY = ["--steps", "8", "--eval-every", "4", "--batch", "4", "--layers", "2", "--width", "32",
        "--heads", "2", "--ffn-size", "64", "--seq-len", "32", "--peer-side", "16",
        "--peer-heads", "4", "--peer-key-dim", "16", "--moe-experts", "4",
        "--train-bytes", "100000", "--heldout-bytes", "20000", "--eval-windows", "8",
        "--threads", "1", "--lr", "1e-2", "--no-progress"]


@pytest.fixture(scope="module")
def peer_lm():
    spec = importlib.util.spec_from_file_location("moefy_example_peer_lm", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being made
    try:
        spec.loader.exec_module(module)  # examples/ is not a package
        yield module
    finally:
        del sys.modules[spec.name]


def test_three_runs_learn_and_the_plot_is_written(peer_lm, tmp_path, capsys):
    runs = peer_lm.main([*TINY, "--out", str(tmp_path)])
    assert [r.name for r in runs] == ["dense", "peer", "moe"]
    for r in runs:
        assert r.steps == 8
        first_eval, last_eval = r.eval_curve[0][-1], r.eval_curve[-1][-1]
        assert all(math.isfinite(v) for v in (*r.train_curve, r.train_bpb, r.heldout_bpb))
        # from about 8 bits per byte (uniform) down toward the text's byte statistics
        assert last_eval < first_eval - 0.5, (r.name, r.eval_curve)
        assert sum(r.train_curve[-2:]) < sum(r.train_curve[:2]), (r.name, r.train_curve)
        assert r.tokens_per_s > 0
    dense, peer, moe = runs
    # the same expert parameters per token as the dense FFN: the MoE adds its router (E·H)
    # and a second output bias (H); PEER its query network, query BatchNorm and product keys,
    # and drops the dense FFN's two biases (d_ff + H)
    assert moe.active_params == dense.active_params + (4 + 1) * 32
    retrieval = 32 * 4 * 16 + 4 * 16 + 2 * 4 * 16 + 16 * 16  # query (+bias), BatchNorm, keys
    assert 0 < peer.active_params - dense.active_params <= retrieval - 64 - 32
    assert peer.total_params - peer.active_params == (16 * 16 - 4 * 16) * 2 * 32  # idle
    assert moe.total_params - moe.active_params == (4 - 2) * (2 * 32 * 32 + 32 + 32)
    assert peer.optimizers == "AdamW + SparseAdam"
    assert 0 < peer.usage <= 1 and peer.unevenness >= 0
    png = tmp_path / "peer_lm.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert f"plot: {png}" in out and "usage" in out


def test_usage_and_unevenness_follow_peer_table_2(peer_lm):
    usage, uneven = peer_lm.usage_unevenness(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    assert usage == 1.0 and uneven == pytest.approx(0.0, abs=1e-12)
    usage, uneven = peer_lm.usage_unevenness(torch.tensor([2.0, 0.0, 0.0, 0.0]))
    assert usage == 0.25 and uneven == pytest.approx(math.log(4))  # all on one expert


@pytest.mark.parametrize("argv", (["--runs", "dense,sparse"], ["--ffn-size", "100"],
                                  ["--steps", "0"]))
def test_bad_arguments_stop_before_any_work(peer_lm, argv, capsys):
    with pytest.raises(SystemExit):
        peer_lm.main(argv)
    assert argv[0] in capsys.readouterr().err  # the message names what was wrong


@pytest.mark.parametrize("kind", ("peer", "moe"))
def test_expert_usage_agrees_with_moefy_report(peer_lm, kind):
    import moefy

    sizes = peer_lm.Sizes(layers=2, width=32, heads=2, ffn_size=64, seq_len=32, peer_side=16,
                          peer_heads=4, peer_key_dim=16, moe_experts=4)
    model = peer_lm.build(kind, sizes, seed=0).eval()
    data = torch.randint(0, 256, (10_000,), dtype=torch.uint8)
    starts = torch.arange(0, 8000, 1000)
    with peer_lm.expert_load(model.middle.ffn) as z:
        peer_lm.evaluate(model, data, starts, sizes.seq_len, batch=4)
    assert not model.middle.ffn._forward_hooks  # the hook is gone
    usage, uneven = peer_lm.usage_unevenness(z)
    batches = [(peer_lm.windows(data, starts[i:i + 4], sizes.seq_len)[0],) for i in (0, 4)]
    row = moefy.report(model, batches).layers[0]
    assert usage == pytest.approx(row["usage"]) and uneven == pytest.approx(row["uneven"],
                                                                             abs=1e-5)
