"""``moefy.cli.inputs``: text files chunked into batches, and bad counts and lengths refused
as usage errors before any work."""

from __future__ import annotations

import pytest

from moefy import cli
from moefy.cli.inputs import token_batches

pytest.importorskip("transformers")


def test_token_batches_chunk_a_directory_in_sorted_order(workspace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / "tiny", local_files_only=True)
    batches, tokens, files = token_batches(tok, str(workspace / "held_out"), "--data",
                                           seq_len=16, batch_size=3, max_tokens=100)
    assert files == 1  # a.txt alone has 100 tokens; b.md is not read; skip.bin never
    assert tokens == 96 and [b["input_ids"].shape for b in batches] == [(3, 16), (3, 16)]
    first = tok("The capital of France is Paris.", add_special_tokens=False)["input_ids"]
    assert batches[0]["input_ids"][0, :len(first)].tolist() == first
    assert all(bool(b["attention_mask"].all()) for b in batches)


def test_bad_numbers_are_usage_errors_before_any_work(converted, workspace, tmp_path, capsys):
    """Found by a hostile trial: these used to fail late with raw errors (ZeroDivisionError,
    a split_size RuntimeError, max_seconds=nan after the conversion)."""
    out, _ = converted
    data = str(workspace / "notes.txt")
    cases = [
        (["report", str(out), "--data", data, "--seq-len", "0"], "--seq-len must be at least 1"),
        (["report", str(out), "--data", data, "--batch-size", "0"], "--batch-size must be at"),
        (["report", str(out), "--data", data, "--max-tokens", "-1"], "--max-tokens must be at"),
        (["report", str(out), "--data", data, "--seq-len", "300"],
         "--seq-len 300 is longer than the model takes (128 positions)"),
        (["bench", str(out), "--seq-len", "300"], "longer than the model takes"),
        (["export-onnx", str(out), "--seq-len", "1", "-o", str(tmp_path / "m.onnx")],
         "--seq-len must be at least 2"),
        (["export-onnx", str(out), "-o", str(tmp_path)], "give a file name ending in .onnx"),
        (["convert", str(workspace / "tiny"), "--calibration", data, "--distill-minutes", "nan",
          "-o", str(tmp_path / "o")], "--distill-minutes must be a finite number"),
    ]
    (tmp_path / "d.onnx").mkdir()
    cases.append((["export-onnx", str(out), "-o", str(tmp_path / "d.onnx")], "is a directory"))
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (argv, err)
