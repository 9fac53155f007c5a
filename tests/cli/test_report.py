"""``moefy report``: a converted model's rows, with --data its load and error, and the heatmap."""

from __future__ import annotations

import pytest

from moefy import cli
from tests.cli.helpers import run

pytest.importorskip("transformers")


def test_report_with_data_and_plot(converted, workspace):
    out, _ = converted
    plot = workspace / "load.png"
    proc = run("report", str(out), "--data", str(workspace / "held_out"), "--plot", str(plot),
               "--seq-len", "16", "--max-tokens", "512")
    assert proc.returncode == 0, proc.stderr
    header = next(line for line in proc.stdout.splitlines() if line.startswith("name"))
    assert "rel err" in header and "usage" in header
    rows = [line for line in proc.stdout.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == 2 and all(" 512 " in row for row in rows)  # tokens measured
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_on_a_directory_that_is_not_a_checkpoint(tmp_path, capsys):
    assert cli.main(["report", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moefy: error: ") and "is not a moefy checkpoint" in err
    assert err.count("\n") == 1
