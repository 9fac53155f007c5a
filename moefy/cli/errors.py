"""How the ``moefy`` command fails: its own errors (exit 1, or 2 for a usage error, as
argparse's) and the one line on stderr that any failure becomes, in the command line's words
(flags, not the library's argument names). Imports nothing heavy."""

from __future__ import annotations

import re

from moefy.errors import MoefyError, first_line

EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CommandError(MoefyError):
    """The command cannot do what was asked (a missing file, a bad directory); exit 1."""


class CommandUsageError(CommandError):
    """The arguments contradict each other or a setting; exit 2, as argparse's errors."""


def message_of(exc: Exception) -> str:
    """One line saying what went wrong: moefy's own errors speak for themselves; a missing
    file names the path; anything else is unexpected and says how to see more."""
    text = " ".join(str(exc).split())  # moefy's messages may span lines; keep them whole
    if isinstance(exc, MoefyError):
        return in_flags(text)
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: no such file or directory"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename or ''}: {exc.strerror}".lstrip(": ")
    return (f"{type(exc).__name__}: {first_line(exc) or 'no message'} (unexpected; rerun "
            "with --verbose for the traceback)")


# the library's words for what the command line calls flags
_FLAG_WORDS = [
    (re.compile(r"moefy\.export_hf\(model, directory, architecture='(\w+)'\)"),
     r"moefy export-hf OUT --architecture \1 -o DIR"),
    (re.compile(r"\bnum_experts \+ shared_experts\b"), "--experts + --shared"),
    (re.compile(r"\bsetting num_experts\b"), "--experts"),
    (re.compile(r"\bsetting for_budget: experts\b"), "--experts"),  # with --active
    (re.compile(r"\bnum_experts \((\d+)\)"), r"--experts (\1)"),
    (re.compile(r"\bsetting top_k\b"), "--top-k"),
    (re.compile(r"\bsetting shared_experts\b"), "--shared"),
    (re.compile(r"\bre-convert it with top_k=1\b"), "convert again with --top-k 1"),
    (re.compile(r"\blower top_k or peer_heads\b"), "lower --top-k"),
]


def in_flags(text: str) -> str:
    """``text`` with the library's names of settings replaced by the command's flags."""
    for pattern, words in _FLAG_WORDS:
        text = pattern.sub(words, text)
    return text
