"""Folders of files written all or nothing: everything is written into a work folder inside
the target first and only then moved in (one rename per file, the marker file last), so a
failure leaves the folder as it was; and the checks on a folder argument, before any work
(a path at all; a folder this process can write).

    check_writable(dir)  →  work folder dir/.moefy-XXXX  ←  write(work)
      →  files of the earlier write that were not written again removed  →  files moved in,
      ``last`` last  →  work folder removed
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

from moefy.errors import first_line


def as_path(directory, error: type[Exception], what: str) -> Path:
    """``directory`` (a str or os.PathLike, ``~`` expanded) as a Path, else ``error``.

    >>> as_path("~/x", ValueError, "save") == Path.home() / "x"
    True
    """
    if not isinstance(directory, (str, os.PathLike)):
        raise error(f"{what}: directory must be a path (str or os.PathLike), got "
                    f"{type(directory).__name__}")
    return Path(directory).expanduser()


def check_writable(directory: Path, error: type[Exception], what: str) -> None:
    """Raise ``error`` unless ``directory`` is, or can be created as, a folder this process
    can write into: its nearest existing ancestor must be a directory that takes a new
    entry (tried: permissions can say yes where the file system says no, as on a read-only
    mount or under /proc). Nothing is left behind.

    >>> import tempfile
    >>> check_writable(Path(tempfile.mkdtemp()) / "new" / "folder", OSError, "save")
    """
    existing = directory
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise error(f"{what}: cannot write {directory}: {existing} is not a directory "
                    "(a file stands where a folder is needed): give another directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise error(f"{what}: cannot write {directory}: {existing} is not writable (its "
                    "permissions): give a directory you can write, or change them")
    try:
        tempfile.TemporaryDirectory(dir=existing, prefix=".moefy-probe-").cleanup()
    except OSError as exc:
        raise error(f"{what}: cannot write {directory}: {existing} is not writable "
                    f"({exc.strerror or first_line(exc)}): give a directory you can "
                    "write") from exc


def replace_files(directory: Path, write: Callable[[Path], None], *, last: str,
                  stale: Iterable[str], error: type[Exception], what: str) -> list[str]:
    """Call ``write(work)`` to write files into a fresh work folder inside ``directory``
    (created if needed), then move each into ``directory``, ``last`` (e.g. the file that says
    what the others are) last, after removing the names in ``stale`` (what an earlier write
    there left) that were not written again. Returns the names moved in.

    A failure in ``write`` (an ``OSError``, or an exception it raises itself) leaves
    ``directory`` as it was; a folder that cannot be written raises ``error``.

    >>> import tempfile
    >>> d = Path(tempfile.mkdtemp())
    >>> replace_files(d, lambda work: (work / "a.txt").write_text("a"), last="a.txt",
    ...               stale=[], error=OSError, what="demo")
    ['a.txt']
    """
    try:
        directory.mkdir(parents=True, exist_ok=True)
        work = tempfile.TemporaryDirectory(dir=directory, prefix=".moefy-")
    except OSError as exc:
        raise error(f"{what}: cannot write {directory}: {exc.strerror or first_line(exc)}; "
                    "give a directory you can write") from exc
    with work as tmp:
        tmp = Path(tmp)
        write(tmp)
        written = sorted(p.name for p in tmp.iterdir())
        for name in stale:
            if name not in written and (directory / name).is_file():
                (directory / name).unlink()
        for name in sorted(written, key=lambda n: n == last):  # stable: ``last`` moves last
            if (directory / name).is_dir():
                shutil.rmtree(directory / name)
            os.replace(tmp / name, directory / name)
    return written
