"""The folder an export works in: the target path checked before any work, a hidden work folder
beside it (same file system: the result moves in atomically), the result published from it all
or nothing, and the folders killed exports left behind removed.

    path ──checked: .onnx, not a directory, its folder takes new files──▶ parent
         ──.moefy-export-<pid>-* in parent (removed on any exit)──▶ written, validated there
         ──os.replace, data file first, .onnx last──▶ parent/path
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
import warnings
from pathlib import Path

from moefy.errors import ExportInputError

WORKDIR_PREFIX = ".moefy-export-"


def check_target(path: Path) -> Path:
    """The folder ``path`` goes into, once it is known to take the file: refused before any
    work with what to do instead, not as an OSError from the last step.

    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> check_target(parent / "m.onnx") == parent
    True
    """
    if path.suffix != ".onnx":
        raise ExportInputError(f"export_onnx: path should end in .onnx, got {str(path)!r}")
    if path.is_dir():
        raise ExportInputError(f"export_onnx: {path} is a directory, not a file; remove it or "
                               f"choose a file path such as {path / 'model.onnx'}")
    parent = path.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ExportInputError(f"export_onnx: cannot write {path}: {parent} is not a writable "
                               "directory; create it first or choose another path")
    # os.access reads permission bits only: /proc, /sys and read-only mounts refuse new files
    # when one is made, as the work folder will be
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise ExportInputError(f"export_onnx: cannot write {path}: {parent} does not take new "
                               f"files ({type(exc).__name__}: {exc.strerror or exc}); choose "
                               "a path in a writable directory") from exc
    return parent


@contextlib.contextmanager
def workdir(parent: Path):
    """A hidden work folder in ``parent`` (same file system: the result moves in atomically),
    named with this process's id so that later exports can tell a live one from a leftover;
    removed on any exit, KeyboardInterrupt included.

    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> with workdir(parent) as folder:
    ...     _ = (folder / "m.onnx").write_bytes(b"graph")
    ...     publish(folder, parent)
    >>> sorted(p.name for p in parent.iterdir())
    ['m.onnx']
    """
    folder = Path(tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-", dir=parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if folder.exists():  # an open handle (Windows) or a permission: say so, not silently
            warnings.warn(f"export_onnx could not remove its work folder {folder}; the next "
                          "export into this directory removes it", stacklevel=3)


def publish(folder: Path, parent: Path) -> None:
    """Move the model (and its external data file) from ``folder`` to ``parent``; all of them
    or, when a move fails or is interrupted, none (an .onnx beside another export's data is
    worse than no file). The .onnx file goes last: it is what readers look for."""
    files = sorted(folder.iterdir(), key=lambda f: f.suffix == ".onnx")
    moved = []
    try:
        for f in files:
            os.replace(f, parent / f.name)
            moved.append(parent / f.name)
    except BaseException:
        for f in moved:
            f.unlink(missing_ok=True)
        raise


def remove_stale_workdirs(parent: Path, older_than: float) -> None:
    """Remove work folders left by exports that were killed (SIGKILL, power loss): older than
    ``older_than`` seconds and, where the name holds a process id, that process gone.

    >>> import tempfile
    >>> parent = Path(tempfile.mkdtemp())
    >>> (parent / ".moefy-export-xyz").mkdir()  # named before folders held the pid
    >>> remove_stale_workdirs(parent, older_than=0.0)
    >>> list(parent.iterdir())
    []
    """
    now = time.time()
    for d in parent.glob(f"{WORKDIR_PREFIX}*"):
        try:
            old = now - d.stat().st_mtime > older_than
        except FileNotFoundError:  # another export removed it meanwhile
            continue
        if d.is_dir() and not d.is_symlink() and old and not _process_alive(d.name):
            shutil.rmtree(d, ignore_errors=True)


def _process_alive(name: str) -> bool:
    pid = name[len(WORKDIR_PREFIX):].split("-", 1)[0]
    if not pid.isdigit():
        return False  # a folder from before names held the pid: age alone decides
    if os.name != "posix":
        return False  # no cheap probe (os.kill(pid, 0) would end the process on Windows)
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, but another user's
        return True
    except OSError:
        return False
    return True


