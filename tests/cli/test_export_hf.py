"""``moefy export-hf``: a converted model to a Hugging Face checkpoint transformers loads."""

from __future__ import annotations

import json

import pytest
import torch

import moefy
from tests.cli.helpers import run

pytest.importorskip("transformers")


def test_export_hf_writes_a_checkpoint_transformers_loads(converted, workspace):
    from transformers import AutoModelForCausalLM

    out, _ = converted
    target = workspace / "tiny-mixtral"
    proc = run("export-hf", str(out), "--architecture", "mixtral", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {target}" in proc.stdout and "tokenizer.json" in proc.stdout
    assert json.loads((target / "config.json").read_text())["model_type"] == "mixtral"
    hf = AutoModelForCausalLM.from_pretrained(target, local_files_only=True).eval()
    ids = torch.randint(0, hf.config.vocab_size, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, moefy.load(out)(ids).logits,
                                   rtol=1e-4, atol=1e-5)
