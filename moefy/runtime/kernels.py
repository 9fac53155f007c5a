"""Builds and loads moefy's C++ CPU kernels (``torch.ops.moefy_cpu.*``) on first use.

    csrc/decode.cpp ⇒ (once per machine, a child process with a time limit)
                      <root>/moefy_cpu_<key>/moefy_cpu_<key>.so ⇒ torch.ops.load_library

``<root>`` is ``$TORCH_EXTENSIONS_DIR`` or torch's per-user default
(``~/.cache/torch_extensions``). ``<key>`` digests the sources, the compiler flags, the torch
and Python versions and the CPU's feature flags (the build uses ``-march=native``), so a
finished library (marked by a ``.built`` stamp written after it is complete) is loaded directly
by every later process: no compiler, no lock, no waiting.

A build can be killed half way, and torch's build lock (a plain file, ``<build dir>/lock``)
then stays behind; torch waits for it to disappear, forever. So the build runs in a child
process that first takes an ``flock`` on ``<build dir>/builder.flock``. The operating system
drops an flock when its holder dies, however it dies: a builder that holds it knows that any
``lock`` file it finds was left by a dead build, removes it (with a warning) and builds. The
parent waits at most ``MOEFY_EXT_BUILD_TIMEOUT`` seconds (default 300; the build takes
seconds), then kills the child, warns with the lock's path and how to clear it, and uses the
PyTorch path. Without a C++ compiler or ninja (``pip install ninja``; the ``cpu`` extra has
it), or with ``MOEFY_NO_EXT=1``, moefy warns once and uses its PyTorch-only paths.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import torch

_SOURCES = [Path(__file__).with_name("csrc") / name
            for name in ("decode.cpp", "peer.cpp", "search.cpp", "neuron.cpp")]
_HEADERS = [Path(__file__).with_name("csrc") / "common.h"]  # in the digest, not compiled alone
_CFLAGS = ["-O3", "-march=native", "-fopenmp"]
_LDFLAGS = ["-fopenmp"]
_DEFAULT_TIMEOUT_S = 300.0
_STALE_MARK = "moefy: removed stale lock"
_log = logging.getLogger(__name__)

# Runs in the child: only torch and the standard library (importing moefy would cost seconds).
_BUILD_SCRIPT = r"""
import fcntl, json, os, sys
spec = json.loads(sys.argv[1])
build_dir = spec["build_dir"]
if spec["ninja_dir"]:
    os.environ["PATH"] = spec["ninja_dir"] + os.pathsep + os.environ.get("PATH", "")
with open(os.path.join(build_dir, "builder.flock"), "w") as owner:
    fcntl.flock(owner, fcntl.LOCK_EX)  # a live builder holds it; a dead one's is released
    if os.path.exists(spec["stamp"]):
        sys.exit(0)  # another process finished the build while this one waited
    lock = os.path.join(build_dir, "lock")
    if os.path.exists(lock):  # nobody else holds the flock: its builder is dead
        os.remove(lock)
        print(spec["stale_mark"], lock, flush=True)
    from torch.utils import cpp_extension
    cpp_extension.load(name=spec["name"], sources=spec["sources"], build_directory=build_dir,
                       extra_cflags=spec["cflags"], extra_ldflags=spec["ldflags"],
                       is_python_module=False)
    partial = spec["stamp"] + f".{os.getpid()}"
    with open(partial, "w") as f:
        f.write(spec["name"])
    os.replace(partial, spec["stamp"])  # the stamp appears whole, after the library
"""


def _cpu_flags() -> str:
    flags = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags += line
                break
    return flags


def library_name() -> str:
    """``moefy_cpu_<key>``: changes with anything that makes an existing build unusable."""
    h = hashlib.sha1()
    for part in (_cpu_flags(), torch.__version__, sys.version, " ".join(_CFLAGS + _LDFLAGS)):
        h.update(part.encode())
    for source in _SOURCES + _HEADERS:
        h.update(source.read_bytes())
    return f"moefy_cpu_{h.hexdigest()[:12]}"


def build_directory() -> Path:
    """Where the kernels are built and cached (``$TORCH_EXTENSIONS_DIR`` is honoured)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils import cpp_extension
        root = cpp_extension.get_default_build_root()
    return Path(root) / library_name()


def _ninja_dir() -> str | None:
    """torch looks for ``ninja`` on PATH; the PyPI wheel installs it beside the interpreter,
    which is not on PATH when a virtual environment's python is run without activating it."""
    if shutil.which("ninja"):
        return None
    try:
        import ninja
    except ImportError:
        return None
    return ninja.BIN_DIR


def _timeout_s() -> float:
    raw = os.environ.get("MOEFY_EXT_BUILD_TIMEOUT", "")
    try:
        value = float(raw) if raw else _DEFAULT_TIMEOUT_S
    except ValueError:
        value = -1.0
    if not value > 0:
        warnings.warn(f"moefy: MOEFY_EXT_BUILD_TIMEOUT must be a positive number of seconds, "
                      f"got {raw!r}; using {_DEFAULT_TIMEOUT_S:.0f}", RuntimeWarning,
                      stacklevel=3)
        value = _DEFAULT_TIMEOUT_S
    return value


def _fallback(message: str) -> bool:
    warnings.warn(f"moefy: {message}; decode-sized batches use the slower PyTorch path. Set "
                  "MOEFY_NO_EXT=1 to skip the C++ kernels and this warning.", RuntimeWarning,
                  stacklevel=3)
    return False


def _build(name: str, build_dir: Path, stamp: Path) -> bool:
    """Build in a child process under a time limit; True when the stamp is there after."""
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only or missing extensions folder: no kernel, no crash
        return _fallback(f"cannot build the C++ decode kernels in {build_dir}: {exc} (set "
                         "TORCH_EXTENSIONS_DIR to a writable folder)")
    spec = {"name": name, "build_dir": str(build_dir), "stamp": str(stamp),
            "sources": [str(s) for s in _SOURCES], "cflags": _CFLAGS, "ldflags": _LDFLAGS,
            "ninja_dir": _ninja_dir(), "stale_mark": _STALE_MARK}
    timeout = _timeout_s()
    lock = build_dir / "lock"
    _log.info("building the C++ decode kernels in %s (once per machine)", build_dir)
    # its own session: on timeout the whole group (ninja, the compiler) is killed
    try:
        child = subprocess.Popen([sys.executable, "-c", _BUILD_SCRIPT, json.dumps(spec)],
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
    except OSError as exc:
        return _fallback(f"cannot start the C++ decode kernel build: {exc}")
    try:
        output, _ = child.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        child.communicate()
        return _fallback(
            f"the C++ decode kernel build did not finish within {timeout:.0f} s (another "
            f"process may be building, or be stuck holding the build lock {lock}). If no "
            f"other moefy process is running, delete {lock} (or the whole folder {build_dir}) "
            "and run again; MOEFY_EXT_BUILD_TIMEOUT sets the limit")
    for line in output.splitlines():
        if line.startswith(_STALE_MARK):
            warnings.warn(f"{line.strip()}, left by a C++ kernel build that was killed half "
                          "way; rebuilt", RuntimeWarning, stacklevel=3)
    if child.returncode != 0 or not stamp.exists():
        tail = "\n".join(output.strip().splitlines()[-15:])
        return _fallback(f"could not build the C++ decode kernels in {build_dir} (exit status "
                         f"{child.returncode}):\n{tail}\nInstall a C++ compiler and ninja "
                         "(pip install ninja; the 'cpu' extra includes it)")
    return True


@functools.cache
def decode_kernels_available() -> bool:
    """True once ``torch.ops.moefy_cpu.decode_ffn`` is loaded (built first if need be)."""
    if os.environ.get("MOEFY_NO_EXT") == "1":
        return False
    name, build_dir = library_name(), build_directory()
    stamp = build_dir / f"{name}.built"
    if not stamp.exists() and not _build(name, build_dir, stamp):
        return False
    library = build_dir / f"{name}.so"
    try:
        torch.ops.load_library(str(library))
    except OSError as exc:
        return _fallback(f"could not load {library} ({exc}); delete {build_dir} to rebuild it")
    return hasattr(torch.ops.moefy_cpu, "decode_ffn")


def peer_kernels_available() -> bool:
    """True once ``torch.ops.moefy_cpu.peer_forward`` / ``peer_backward`` are loaded (they
    live in the same library as the decode kernel)."""
    return decode_kernels_available() and hasattr(torch.ops.moefy_cpu, "peer_forward")


@functools.cache
def neuron_kernels_available() -> bool:
    """True once ``torch.ops.moefy_cpu.sparse_input_linear`` / ``neuron_ffn`` (decode
    projections that read only the weight rows they use) are loaded. Cached: it is asked on
    every decode call."""
    return decode_kernels_available() and hasattr(torch.ops.moefy_cpu, "sparse_input_linear")


def search_kernel_available() -> bool:
    """True once ``torch.ops.moefy_cpu.peer_search`` (PEER's product-key search) is loaded."""
    return decode_kernels_available() and hasattr(torch.ops.moefy_cpu, "peer_search")
