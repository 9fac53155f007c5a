"""How the tests run the ``moefy`` command for real: as a subprocess (``run``: ``python -m
moefy`` or the console script pip installs), and what a failure must look like there
(``one_line_error``). The tiny model and its conversion are fixtures in conftest.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TIMEOUT_S = 240
SCRIPT = Path(sys.executable).parent / "moefy"  # the console script pip installs
COMMANDS = ("convert", "report", "export-onnx", "export-hf", "bench")


def run(*args: str, script: bool = False, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = [str(SCRIPT)] if script else [sys.executable, "-m", "moefy"]
    env = {**os.environ, "PYTHONWARNINGS": ""}
    return subprocess.run([*exe, *args], capture_output=True, text=True, timeout=TIMEOUT_S,
                          cwd=cwd, env=env)


def one_line_error(proc: subprocess.CompletedProcess, code: int = 1) -> str:
    """The error line, after checking that stderr is exactly that one line and no traceback."""
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("moefy: error: "), proc.stderr
    return lines[0]
