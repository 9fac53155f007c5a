"""Builds and loads moefy's C++ CPU kernels (``torch.ops.moefy_cpu.*``) on first use.

The build takes a few seconds once per machine and is cached by torch in
``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``). It compiles for the CPU it
runs on, so the cache name carries a digest of the CPU's feature flags. Without a C++
compiler, or with ``MOEFY_NO_EXT=1``, moefy warns once and uses its PyTorch-only paths.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name("csrc") / "decode.cpp"]
_log = logging.getLogger(__name__)


def _cpu_digest() -> str:
    flags = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags += line
                break
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def _find_ninja() -> None:
    """torch looks for ``ninja`` on PATH; the PyPI wheel installs it beside the interpreter,
    which is not on PATH when a virtual environment's python is run without activating it."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


@functools.cache
def decode_kernels_available() -> bool:
    """True once ``torch.ops.moefy_cpu.decode_ffn`` is loaded."""
    if os.environ.get("MOEFY_NO_EXT") == "1":
        return False
    from torch.utils import cpp_extension

    _find_ninja()
    _log.info("moefy: building the C++ decode kernels (once per machine)")
    try:
        cpp_extension.load(
            name=f"moefy_cpu_{_cpu_digest()}",
            sources=[str(s) for s in _SOURCES],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        warnings.warn(
            f"moefy: could not build the C++ decode kernels ({exc}); decode-sized batches use "
            "the slower PyTorch path. Install a C++ compiler and ninja, or set MOEFY_NO_EXT=1 "
            "to silence this.", RuntimeWarning, stacklevel=2)
        return False
    return hasattr(torch.ops.moefy_cpu, "decode_ffn")
