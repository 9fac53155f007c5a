"""``moefy bench``: the dense and the converted model timed in PyTorch and ONNX Runtime, the
note on a busy machine, and a dense model of another architecture refused."""

from __future__ import annotations

import pytest

from moefy import cli
from moefy.cli.bench import busy_note
from tests.cli.helpers import run

pytest.importorskip("transformers")


def test_bench_times_dense_and_moe_in_pytorch_and_onnx_runtime(converted):
    out, _ = converted
    proc = run("bench", str(out), "--runs", "2", "--seq-len", "8")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "batch 1 x 8 tokens, median of 2 runs" in lines[0]
    assert lines[1].split() == ["model", "engine", "ms", "tokens/s", "vs", "dense"]
    rows = {" ".join(line.split()[:-3]): line.split()[-3:] for line in lines[2:]
            if not line.startswith("note: ")}  # a busy machine gets a note under the table
    assert set(rows) == {"dense PyTorch", "MoE PyTorch", "dense ONNX Runtime",
                         "MoE ONNX Runtime"}
    for ms, tokens_per_s, ratio in rows.values():
        assert float(ms) > 0 and float(tokens_per_s.replace(",", "")) > 0
        assert ratio.endswith("x")
    assert rows["dense PyTorch"][2] == "1.00x"


def test_bench_notes_when_other_processes_used_the_cores():
    # (wall s, CPU s of all processes, CPU s of this one): others used 1 core for 1 s
    assert "kept 1.0 of" in busy_note((0.0, 0.0, 0.0), (1.0, 2.5, 1.5))
    assert busy_note((0.0, 0.0, 0.0), (1.0, 1.6, 1.5)) is None
    assert busy_note(None, (1.0, 2.5, 1.5)) is None


def test_bench_refuses_a_dense_model_of_another_architecture(converted, workspace, tmp_path,
                                                             capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    out, _ = converted
    other = LlamaConfig(**{**LlamaForCausalLM.from_pretrained(workspace / "tiny").config
                           .to_dict(), "hidden_size": 64})
    LlamaForCausalLM(other).save_pretrained(tmp_path / "wider")
    assert cli.main(["bench", str(out), "--dense", str(tmp_path / "wider"), "--no-onnx",
                     "--runs", "1"]) == 2
    assert "hidden_size 64 vs 32" in capsys.readouterr().err
