"""Where the commands read and write: a checkpoint directory written by ``moefy convert``
(checked, its plan's info read, the model and tokenizer loaded), and output paths refused
before any work when writing there would fail or overwrite something else."""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from moefy.cli.console import Console
from moefy.cli.errors import CommandError
from moefy.errors import first_line
from moefy.io.checkpoint import load
from moefy.io.hf import exported_architecture

PLAN_FILE = "moefy.json"  # what marks a directory written by moefy.save


def checkpoint_dir(path: str) -> Path:
    """OUT of report / export / bench: a directory written by ``moefy convert``."""
    out = Path(path)
    if not out.exists():
        raise CommandError(f"{out}: no such directory; write one with "
                           f"`moefy convert MODEL -o {out}`")
    if not out.is_dir():
        raise CommandError(f"{out} is a file, not a moefy checkpoint directory (written by "
                           "`moefy convert MODEL -o DIR`)")
    if not (out / PLAN_FILE).is_file():
        raise CommandError(f"{out} is not a moefy checkpoint: it has no {PLAN_FILE} (write one "
                           f"with `moefy convert MODEL -o {out}`)")
    return out


def plan_info(out: Path) -> dict:
    """What ``moefy convert`` stored in the plan's ``info`` (source, causal, command)."""
    try:
        plan = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"{out / PLAN_FILE} is damaged ({first_line(exc)}); convert the "
                           "model again") from exc
    info = plan.get("info") if isinstance(plan, dict) else None
    return info if isinstance(info, dict) else {}


def writable_target(path: Path, what: str) -> None:
    """Refuse, before any work, an output whose nearest existing ancestor is not a writable
    directory (a conversion should not run for minutes and then fail to save)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise CommandError(f"cannot write {what} {path}: {parent} is not a writable directory")
    try:  # permissions can say yes where the file system says no (/proc, read-only mounts)
        tempfile.TemporaryDirectory(dir=parent, prefix=".moefy-probe-").cleanup()
    except OSError as exc:
        raise CommandError(f"cannot write {what} {path}: {parent}: "
                           f"{exc.strerror or first_line(exc)}") from exc


def out_dir(path: str, what: str, *, checkpoint: bool) -> Path:
    """-o DIR of convert (``checkpoint``) / export-hf: new, empty, or what the same command
    wrote before (a rerun replaces it). Anything else is refused: a dense model's folder, or
    a moefy checkpoint as the target of an export, would be overwritten half-way."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise CommandError(f"-o {out} is a file; give a directory for the {what}")
    if out.is_dir() and any(out.iterdir()):
        plan, config = (out / PLAN_FILE).is_file(), (out / "config.json").is_file()
        if checkpoint and not plan:
            raise CommandError(f"-o {out} holds other files (it is not a moefy checkpoint); "
                               f"give a new or empty directory for the {what}")
        if not checkpoint and (plan or exported_architecture(out) is None):
            kind = ("a moefy checkpoint" if plan else "a dense model" if config
                    else "other files")
            raise CommandError(f"-o {out} holds {kind}; give a new or empty directory for "
                               f"the {what}")
    writable_target(out, what)
    return out


def load_checkpoint(out: Path, console: Console):
    """The converted model saved in ``out``, with status lines on loading."""
    console.status(f"loading {out}")
    t = time.perf_counter()
    model = load(out)
    console.status(f"loaded {type(model).__name__} in {time.perf_counter() - t:.1f} s")
    return model


def load_tokenizer(out: Path):
    """The tokenizer ``moefy convert`` saved beside the checkpoint, or None."""
    from transformers import AutoTokenizer

    if not any((out / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                    "vocab.txt", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


def size_of(path: Path) -> str:
    """The size of a file or a directory's files, in MB."""
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB"
