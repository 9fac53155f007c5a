"""What the commands feed a model: text files (``--calibration`` / ``--data``) tokenised into
batches, example inputs for export and timing, and the checks of counts and lengths made
before anything loads. torch loads inside the functions that build tensors, so the parser
may read ``TEXT_SUFFIXES`` from here."""

from __future__ import annotations

import math
from pathlib import Path

from moefy.cli.errors import CommandError, CommandUsageError

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")  # what a --calibration / --data folder offers
CHARS_PER_TOKEN_CAP = 16  # read at most this many characters per wanted token from a file
EXAMPLE_TEXT = ("The capital of France is Paris. Mixture-of-experts models route every token "
                "to a few experts. ")


def text_files(path: str, flag: str) -> list[Path]:
    """``path`` itself, or the text files of a directory (sorted; hidden ones skipped)."""
    source = Path(path)
    if source.is_file():
        return [source]
    if not source.is_dir():
        raise CommandError(f"{flag} {source}: no such file or directory")
    files = sorted(f for f in source.rglob("*") if f.is_file()
                   and f.suffix.lower() in TEXT_SUFFIXES
                   and not any(p.startswith(".") for p in f.relative_to(source).parts))
    if not files:
        raise CommandError(f"{flag} {source}: the directory holds no text files "
                           f"({', '.join('*' + s for s in TEXT_SUFFIXES)})")
    return files


def token_batches(tokenizer, path: str, flag: str, *, seq_len: int, batch_size: int,
                  max_tokens: int) -> tuple[list[dict], int, int]:
    """The text of ``path`` (a file, or a directory's text files in sorted order) tokenised
    into chunks of ``seq_len`` tokens, at most ``max_tokens`` in all, batched as
    ``{"input_ids", "attention_mask"}`` dicts (every token real: the mask is all ones; causal
    LMs need it spelled out). Returns (batches, tokens, files read)."""
    import torch

    if tokenizer is None:
        raise CommandError(f"{flag} needs a tokenizer, and the model has no tokenizer files; "
                           "add them to its folder (tokenizer.json, tokenizer_config.json)")
    ids: list[int] = []
    read = 0
    for file in text_files(path, flag):
        try:
            text = file.read_bytes().decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CommandError(f"{flag} {file}: not UTF-8 text (bad byte at offset "
                               f"{exc.start}); give text files") from exc
        except OSError as exc:
            raise CommandError(f"{flag} {file}: cannot read it ({exc.strerror})") from exc
        read += 1
        # a long file is cut (tokenising a book to keep its first pages would waste minutes)
        text = text[:(max_tokens - len(ids)) * CHARS_PER_TOKEN_CAP]
        ids += tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= max_tokens:
            break
    ids = ids[:max_tokens]
    if not ids:
        raise CommandError(f"{flag} {path}: no text in it (0 tokens)")
    chunks = len(ids) // seq_len
    # text shorter than one chunk is one shorter chunk; otherwise the ragged tail is dropped
    rows = (torch.tensor([ids]) if chunks == 0
            else torch.tensor(ids[:chunks * seq_len]).view(chunks, seq_len))
    batches = [{"input_ids": b, "attention_mask": torch.ones_like(b)}
               for b in rows.split(batch_size)]
    return batches, rows.numel(), read


def example_inputs(model, tokenizer, batch: int, seq_len: int) -> dict:
    """``batch`` rows of ``seq_len`` tokens: real text when there is a tokenizer (repeated to
    length), else random token ids of the model's vocabulary."""
    import torch

    if tokenizer is not None:
        ids = tokenizer(EXAMPLE_TEXT * (1 + seq_len // 8), add_special_tokens=False)["input_ids"]
        row = torch.tensor(ids[:seq_len])
        if row.numel() < seq_len:
            row = row.repeat(seq_len // max(1, row.numel()) + 1)[:seq_len]
        x = row.expand(batch, seq_len).clone()
    else:
        vocab = getattr(getattr(model, "config", None), "vocab_size", None)
        if not vocab:
            raise CommandError("the checkpoint has neither a tokenizer nor a config with "
                               "vocab_size: cannot build example inputs")
        x = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    return {"input_ids": x, "attention_mask": torch.ones_like(x)}


def at_least_one(args, *flags: str) -> None:
    """Usage errors for counts below 1 (and non-finite numbers), before anything loads."""
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and (value < 1 or not math.isfinite(value)):
            raise CommandUsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    """A usage error when ``seq_len`` is longer than the model's positions."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise CommandUsageError(f"{flag} {seq_len} is longer than the model takes "
                                f"({limit} positions)")
