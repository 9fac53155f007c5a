"""``moefy.cli.checkpoint``: an output in the way (a file, a dense model's folder, the
checkpoint itself) is refused before any work, and left as it was."""

from __future__ import annotations

import pytest

from moefy import cli

pytest.importorskip("transformers")


def test_an_output_in_the_way_is_refused_before_any_work(converted, workspace, capsys):
    """A file, the dense model's folder, or the checkpoint itself as -o would be overwritten
    half-way: refused, and left as it was."""
    out, _ = converted
    blocker = workspace / "a-file"
    blocker.write_text("x")
    before = {p: p.read_bytes() for p in (out / "config.json", workspace / "tiny" / "config.json")}
    cases = [(["export-hf", str(out), "-o", str(blocker)], "is a file"),
             (["export-hf", str(out), "-o", str(out)], "holds a moefy checkpoint"),
             (["export-hf", str(out), "-o", str(workspace / "tiny")], "holds a dense model"),
             (["convert", str(workspace / "tiny"), "-o", str(workspace / "tiny")],
              "holds other files")]
    for argv, message in cases:
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert err.startswith("moefy: error: -o ") and message in err and err.count("\n") == 1
    assert blocker.read_text() == "x"
    assert {p: p.read_bytes() for p in before} == before
