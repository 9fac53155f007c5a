"""benchmarks/gpu_check.py (`make gpu-check`) on a machine without CUDA: a message, status 0,
no traceback (with CUDA it runs the whole check, which `make gpu-check` itself covers)."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


@pytest.mark.skipif(torch.cuda.is_available(), reason="runs the full check where CUDA is")
def test_gpu_check_without_cuda_exits_cleanly_with_a_message():
    done = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "gpu-check: nothing to check" in done.stdout and "CUDA" in done.stdout
    assert "Traceback" not in done.stderr
