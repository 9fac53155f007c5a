"""Real English text available offline: sentences from Python docstrings.

Two disjoint corpora for calibration and evaluation:
- ``"packages"``: docstrings of the installed third-party packages (site-packages);
- ``"stdlib"``: docstrings of the Python standard library.

Sentences are cut from docstring prose (no code, no parameter tables), 6 to 40 words, deduplicated
across both corpora (a sentence in the stdlib is never in "packages"), in a fixed shuffled order.
"""

from __future__ import annotations

import ast
import logging
import os
import random
import re
import stat
import sys
import sysconfig
import tempfile
from functools import lru_cache
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_log = logging.getLogger(__name__)
_WORD = re.compile(r"^[A-Za-z][A-Za-z'\-,;:()]*[.!?,;:)]?$")


def _roots(which: str) -> list[Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    if which == "stdlib":
        return [stdlib]
    roots = {Path(p) for p in (sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"])}
    roots |= {Path(p) for p in sys.path if p.endswith("site-packages")}
    return sorted(r for r in roots if r.is_dir() and r != stdlib)


def _docstrings(path: Path):
    try:
        tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
    except (SyntaxError, ValueError, RecursionError):
        return
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield doc


def _sentences(doc: str):
    for para in doc.split("\n\n"):
        if ">>>" in para or "::" in para or para.lstrip().startswith(("-", "*", ":", "..")):
            continue
        text = " ".join(para.split())
        for sent in _SENTENCE_END.split(text):
            words = sent.split()
            if "--" in sent or " : " in sent:  # numpydoc section rules and parameter lines
                continue
            if 6 <= len(words) <= 40 and sent[-1] in ".!?" and sum(
                    bool(_WORD.match(w)) for w in words) >= 0.9 * len(words):
                yield sent


def cache_dir() -> Path | None:
    """``$XDG_CACHE_HOME/moefy`` (default ``~/.cache/moefy``), created private (0700); None
    (no cache) unless it is a real directory owned by this user that nobody else can write:
    a shared, predictable path could be pre-planted with a symlink or poisoned content."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    folder = Path(base) / "moefy"
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        info = os.lstat(folder)
    except OSError as exc:
        _log.warning("corpus: no cache (%s)", exc)
        return None
    if (not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)):
        _log.warning("corpus: not caching in %s: it must be a directory owned by this user and "
                     "writable by no one else (a symlink is refused)", folder)
        return None
    return folder


def _read_cache(path: Path) -> tuple[str, ...] | None:
    try:  # O_NOFOLLOW: a symlink planted at the file's name is refused, not followed
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except FileNotFoundError:
        return None
    except OSError as exc:
        _log.warning("corpus: ignoring cache file %s (%s)", path, exc)
        return None
    with open(fd, encoding="utf-8") as f:
        return tuple(f.read().split("\n"))


def _write_cache(path: Path, lines: tuple[str, ...]) -> None:
    # a private temporary file renamed over the name: a link planted there is replaced
    with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, delete=False,
                                     prefix=".corpus-") as f:
        f.write("\n".join(lines))
    os.replace(f.name, path)


@lru_cache(maxsize=4)
def _corpus(which: str) -> tuple[str, ...]:
    # parsing every installed package takes ~45 s: keep the result in the user's cache
    folder = cache_dir()
    path = None if folder is None else folder / f"corpus-v2-{which}-{sys.version_info[1]}.txt"
    if path is not None:
        cached = _read_cache(path)
        if cached is not None:
            return cached
    out = _collect(which)
    if path is not None:
        _write_cache(path, out)
    return out


def _collect(which: str) -> tuple[str, ...]:
    seen: set[str] = set()
    out: list[str] = []
    for root in _roots(which):
        skip = ("site-packages", "test", "tests", "idlelib", "lib2to3") if which == "stdlib" \
            else ("test", "tests")
        for path in sorted(root.rglob("*.py")):
            if any(part in skip for part in path.relative_to(root).parts[:-1]):
                continue
            for doc in _docstrings(path):
                for sent in _sentences(doc):
                    if sent not in seen:
                        seen.add(sent)
                        out.append(sent)
    return tuple(out)


def sentences(which: str, n: int | None = None, seed: int = 0) -> list[str]:
    """Up to ``n`` sentences of corpus ``which`` ("stdlib" or "packages"), shuffled with
    ``seed``; "packages" never repeats a "stdlib" sentence."""
    if which not in ("stdlib", "packages"):
        raise ValueError(f"corpus must be 'stdlib' or 'packages', got {which!r}")
    pool = list(_corpus(which))
    if which == "packages":
        held = set(_corpus("stdlib"))
        pool = [s for s in pool if s not in held]
    random.Random(seed).shuffle(pool)
    return pool if n is None else pool[:n]


if __name__ == "__main__":
    for name in ("stdlib", "packages"):
        s = sentences(name)
        print(f"{name}: {len(s)} sentences, e.g. {s[:2]}")
