"""Real English text available offline: sentences from Python docstrings.

Two disjoint corpora for calibration and evaluation:
- ``"packages"``: docstrings of the installed third-party packages (site-packages);
- ``"stdlib"``: docstrings of the Python standard library.

Sentences are cut from docstring prose (no code, no parameter tables), 6 to 40 words, deduplicated
across both corpora (a sentence in the stdlib is never in "packages"), in a fixed shuffled order.
"""

from __future__ import annotations

import ast
import random
import re
import sys
import sysconfig
import tempfile
from functools import lru_cache
from pathlib import Path

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
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


@lru_cache(maxsize=4)
def _corpus(which: str) -> tuple[str, ...]:
    # parsing every installed package takes ~45 s: keep the result next to other temp files
    cache = Path(tempfile.gettempdir()) / f"moefy-corpus-v2-{which}-{sys.version_info[1]}.txt"
    if cache.exists():
        return tuple(cache.read_text(encoding="utf-8").split("\n"))
    out = _collect(which)
    cache.write_text("\n".join(out), encoding="utf-8")
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
