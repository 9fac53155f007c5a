"""``moefy.cli.main``: the help, exit codes and one-line errors of the command as a whole, and
that ``--help`` loads nothing heavy (neither torch nor moefy's models)."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from moefy import cli
from moefy.cli import report as report_command
from tests.cli.helpers import COMMANDS, SCRIPT, TIMEOUT_S, one_line_error, run

HEAVY = ("torch", "transformers", "numpy", "onnx", "onnxruntime", "tqdm")
HELP_ARGVS = (["--help"], ["convert", "--help"], ["bench", "--help"])


def test_help_names_every_command_with_examples():
    proc = run("--help")
    assert proc.returncode == 0, proc.stderr
    for command in COMMANDS:
        assert command in proc.stdout
    assert "examples:" in proc.stdout and "moefy convert smollm2" in proc.stdout


@pytest.mark.parametrize("argv", HELP_ARGVS, ids=" ".join)
def test_help_imports_neither_torch_nor_the_models(argv):
    """What `moefy --help` costs is what it imports: the console script runs
    `from moefy.cli import main; main()`."""
    code = (f"import sys\nfrom moefy.cli import main\ntry:\n    main({argv!r})\n"
            "except SystemExit as e:\n    assert e.code == 0, e.code\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{HEAVY!r} or m.startswith(('moefy.layers', 'moefy.convert', 'moefy.io'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


# ----------------------------------------------------------------------------- errors


def test_missing_model_is_one_line_exit_1_from_the_console_script(tmp_path):
    if not SCRIPT.is_file():
        pytest.skip("the console script is not installed (pip install -e .)")
    proc = run("convert", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "out"),
               script=True)
    assert "is not a model moefy knows" in one_line_error(proc)
    assert not (tmp_path / "out").exists()


def test_damaged_checkpoint_is_one_line_and_verbose_shows_the_traceback(converted, tmp_path,
                                                                      capsys):
    out, _ = converted
    broken = tmp_path / "broken"
    shutil.copytree(out, broken)
    weights = broken / "moefy.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated, as by a full disk
    line = one_line_error(run("export-onnx", str(broken), "-o", str(tmp_path / "m.onnx")))
    assert "moefy.safetensors" in line
    # the same failure in-process (a second subprocess would cost seconds), with --verbose
    assert cli.main(["export-onnx", str(broken), "-o", str(tmp_path / "m.onnx"), "-v"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err
    assert err.strip().splitlines()[-1] == line
    assert not (tmp_path / "m.onnx").exists()


def test_a_bad_flag_is_a_usage_error_exit_2(capsys):
    for argv in (["convert", "minilm", "--experts", "many", "-o", "x"],
                 ["export-onnx", "out", "--target", "tensorrt", "-o", "m.onnx"],
                 ["frobnicate"]):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("usage: moefy") and "error: " in err and "Traceback" not in err


def test_ctrl_c_exits_130(monkeypatch, tmp_path, capsys):
    pytest.importorskip("transformers")

    def interrupted(args, console):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_command, "cmd_report", interrupted)
    assert cli.main(["report", str(tmp_path)]) == 130
    assert capsys.readouterr().err == "moefy: interrupted\n"


def test_the_lazy_package_keeps_its_names():
    """moefy imports its names on first use (for --help's sake): moefy.convert and
    moefy.report stay the functions even where their modules were imported first."""
    code = ("import moefy\nimport moefy.cli.convert, moefy.cli.report\n"
            "print([type(getattr(moefy, n)).__name__ for n in ('convert', 'report', 'onnx', "
            "'MoE')])")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[-2] == "['function', 'function', 'module', 'type']"
