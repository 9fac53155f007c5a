"""``moefy export-onnx``: a converted model to an ONNX file validated in ONNX Runtime."""

from __future__ import annotations

import pytest

from tests.cli.helpers import run

pytest.importorskip("transformers")


def test_export_onnx_writes_a_validated_file(converted, workspace):
    out, _ = converted
    target = workspace / "tiny-moe.onnx"
    proc = run("export-onnx", str(out), "--target", "ort", "-o", str(target))
    assert proc.returncode == 0, proc.stderr
    assert target.is_file() and f"wrote {target}" in proc.stdout
    assert "2 MoE layers" in proc.stdout and "validated in ONNX Runtime" in proc.stdout
    assert proc.stderr == ""
