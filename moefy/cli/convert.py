"""``moefy convert MODEL -o OUT``: a dense model ──convert (+ calibration, distillation)──▶ OUT.

Checks every setting before the model loads, then converts (``moefy.convert``), distils when
asked (``distill_for``), saves (``moefy.save``) and prints what it did; with ``--minutes`` it
also measures the result on the held-out last batch (``moefy.evaluate.fidelity``; a causal
LM's perplexity both over whole windows and decoding, ``moefy.evaluate.decode_perplexity``).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from moefy.cli.checkpoint import out_dir, size_of
from moefy.cli.console import Console
from moefy.cli.errors import CommandError, CommandUsageError
from moefy.cli.inputs import check_seq_len, token_batches
from moefy.config import MoEConfig
from moefy.convert import convert
from moefy.distributed.checkpoint import save
from moefy.evaluate import Fidelity, fidelity
from moefy.layers import MoE
from moefy.layers.neuron import NeuronFFN
from moefy.passes.distill import distill_for
from moefy.report import report


def cmd_convert(args, console: Console) -> None:
    """Convert ``args.model`` as the flags say, save it to ``args.output``, print what it did."""
    from moefy.io.pretrained import load_pretrained

    started = time.perf_counter()
    # every setting is checked before the model is loaded (that can take a while)
    method, chosen_why = _method(args)
    _check_budget_flags(args, method)
    settings = {"method": method}
    if method in ("peer", "neuron"):
        flags = ("experts", "shared", "partition", "router") + (
            ("top_k",) if method == "neuron" else ())
        unused = [f"--{flag.replace('_', '-')}" for flag in flags
                  if getattr(args, flag) is not None]
        if unused:
            what = ("every neuron becomes an expert, found by product keys): drop it, and set "
                    "--top-k, the neurons each token uses" if method == "peer" else
                    "every neuron is an expert chosen by a calibrated threshold): drop it, and "
                    "set --active, the share of the weights a token reads")
            raise CommandUsageError(
                f"{', '.join(unused)} {'does' if len(unused) == 1 else 'do'} not apply to "
                f"--method {method} ({what}")
    if method != "neuron" and (args.selection is not None or args.ffn_only):
        raise CommandUsageError(f"--{'selection' if args.selection else 'ffn-only'} applies to "
                                f"--method neuron only")
    for flag, key in (("experts", "num_experts"), ("top_k", "top_k"),
                      ("shared", "shared_experts"), ("partition", "partition"),
                      ("router", "router"), ("seed", "seed")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if args.partition is None and args.calibration and method == "split":
        settings["partition"] = "coactivation"  # neurons that fire together, from the data
    if args.calibration:
        settings["calibration_tokens"] = args.calibration_tokens
    if args.minutes is not None:
        settings["minutes"] = args.minutes
    if method == "neuron":
        settings.update(active=args.active, ffn_only=args.ffn_only,
                        **({"selection": args.selection} if args.selection else {}))
    try:
        if args.active is not None and method == "split":
            # the recipe picks the experts; router and seed may stay; --experts 0 is a count
            # (refused), not "not given"
            chosen = MoEConfig.for_budget(args.active, args.minutes, **(
                {"experts": args.experts} if args.experts is not None else {}))
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
    out = out_dir(args.output, "checkpoint", checkpoint=True)

    console.status(f"loading {args.model}")
    t = time.perf_counter()
    with console.libraries_quiet():
        dense = load_pretrained(args.model)
    console.status(f"loaded {type(dense.model).__name__} in {time.perf_counter() - t:.1f} s")
    check_seq_len(dense.model, args.seq_len)
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
    moe = convert(dense.model, config, calibration_data=batches, progress=console.live)
    convert_s = time.perf_counter() - t
    rep = report(moe)
    what = (f"top-{config.top_k} single-neuron experts" if config.method == "peer" else
            _neuron_what(config, moe) if config.method == "neuron" else
            f"{config.num_experts} experts, top-{config.top_k}, router {config.router}")
    if config.method == "split":
        what += f", {config.shared_experts} shared, partition {config.partition}"
    ffns = (sum(isinstance(m, NeuronFFN) for m in moe.modules()) if config.method == "neuron"
            else len(rep.layers))  # the report lists a neuron model's projections too
    lines.insert(0, f"converted {ffns} FFN layers of {type(moe).__name__} "
                    f"({dense.source}) by {config.method}: {what} in {convert_s:.1f} s")
    dense_params = sum(p.numel() for p in dense.model.parameters())
    moe_params = sum(p.numel() for p in moe.parameters())
    if config.method == "neuron":
        lines.append(f"{rep.splitlines()[-1]}; parameters {moe_params / 1e6:.2f}M (dense "
                     f"{dense_params / 1e6:.2f}M)")
    else:
        lines.append(f"active FFN work per token: {_ffn_fraction(rep)} of the dense FFNs; "
                     f"parameters {moe_params / 1e6:.2f}M (dense {dense_params / 1e6:.2f}M)")
    if chosen_why:
        lines.insert(1, chosen_why)

    budget = (args.active is not None or config.minutes is not None) and (
        config.method == "split")
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
    save(moe, out, tokenizer=dense.tokenizer, info=info)
    lines.append(f"wrote {out} ({size_of(out)}) in {time.perf_counter() - started:.1f} s in all")
    if held:  # after saving: the result is kept whatever the measurement meets
        console.status("measuring on the held-out text")
        result = fidelity(moe, dense.model, held, causal=dense.causal, decode=dense.causal)
        lines.append(_fidelity_line(result))
    print("\n".join(lines))


def _method(args) -> tuple[str, str | None]:
    """The method to convert by, and when moefy chose it (--active without --method), the
    line that says which and why."""
    if args.method is not None or args.active is None:
        return args.method or "split", None
    from moefy.io.pretrained import is_causal

    causal = is_causal(args.model)
    if causal:
        return "neuron", ("method: neuron (chosen for a causal LM: on SmolLM2-135M it kept "
                          "perplexity closer to the dense model's than the best split at the "
                          "same share; --method split to override)")
    return "split", ("method: split (chosen for " + ("an encoder" if causal is False else
                                                      "a model of unknown kind")
                     + ": the neuron method was measured on causal LMs; --method neuron to "
                     "try it)")


def _neuron_what(config: MoEConfig, moe) -> str:
    from moefy.layers.neuron import SparseLinear

    projections = sum(isinstance(m, SparseLinear) for m in moe.modules())
    if config.selection == "static":
        kept = ("every neuron (exact)" if config.active in (None, 1) else
                f"{config.active:.0%} of each FFN's neurons for every token, down refit")
        return (f"single-neuron experts (selection static: one set per FFN), {kept}; "
                "attention dense")
    budget = ("every weight (exact)" if config.active in (None, 1) else
              f"{config.active:.0%} of the projection weights per token")
    return (f"single-neuron experts (selection {config.selection}), {budget}"
            + ("" if config.ffn_only else f", {projections} attention projections sparse"))


def _check_budget_flags(args, method: str) -> None:
    """--active / --minutes: what they need and what they replace, before any work."""
    if args.active is not None and method == "neuron":
        if not (math.isfinite(args.active) and 0 < args.active <= 1):
            raise CommandUsageError(f"--active is the share of the projection weights a token "
                                    f"reads, in (0, 1] (e.g. 0.5), got {args.active}")
        if args.active < 1 and not args.calibration:
            raise CommandUsageError("--active needs --calibration FILE.txt|DIR: the thresholds "
                                    "are calibrated on that text")
    elif args.active is not None:
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
        if method != "split":
            raise CommandUsageError(f"--active builds a split (a share of each FFN's neurons) "
                                    f"or a neuron conversion; it does not apply to --method "
                                    f"{method}")
        if not args.calibration:
            raise CommandUsageError("--active needs --calibration FILE.txt|DIR: the experts, "
                                    "router and compensation are fitted on that text")
    if args.minutes is not None:
        if method not in ("split", "neuron"):
            raise CommandUsageError(
                f"--minutes distils a split or a neuron conversion with the time building "
                f"leaves; --method {method} " + (
                    "is exact: there is nothing to distil (use --distill-minutes to train it "
                    "further)" if method == "upcycle" else "does not take it"))
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
                  if isinstance(m, MoE) and hasattr(m, "conversion")), {})
    budget = ("" if config.minutes is None else
              f"; {config.minutes:g} min in all, distillation gets what building leaves")
    return (f"budget: {active:.1%} of each FFN's neurons active ({how}): {pieces} experts of "
            f"1/{pieces} of the FFN, {config.shared_experts} shared + top-{config.top_k} of "
            f"{config.num_experts} routed; partition {config.partition}, compensation "
            f"{built.get('compensation', 'none')}, router {built.get('router_init', '?')}"
            + budget)


def _distill_info(moe) -> dict | None:
    return next((m.conversion.get("distill") for m in moe.modules()
                 if isinstance(m, MoE | NeuronFFN) and hasattr(m, "conversion")), None)


def _budget_result(moe, causal: bool) -> str:
    info = _distill_info(moe) or {}
    if not info.get("steps") or "loss_first" not in info:
        return f"distillation: none ({info.get('why', 'no MoE layer')})"
    kind = "KL on next-token logits" if causal else "relative MSE of the outputs"
    steps = f"{info['steps']} step" + ("" if info["steps"] == 1 else "s")
    return (f"distillation: {steps} in {info['seconds']:.0f} s, loss ({kind}) "
            f"{info['loss_first']:.4g} -> {info['loss_last']:.4g}")


def _fidelity_line(result: Fidelity) -> str:
    """How close the result stays to the dense model on the held-out batches: perplexity for
    causal LMs, else the cosine of mean-pooled output states."""
    if result.causal:
        if result.perplexity is None:
            return "held-out perplexity: none (chunks of one token predict nothing)"
        line = (f"held-out perplexity: dense {result.reference_perplexity:.2f}, moefy "
                f"{result.perplexity:.2f} ({result.ratio:.3f}x)")
        if result.decode_ratio is not None:  # generation as it runs: half prefilled, then
            # one token per call through the KV cache
            line += (f"; decode perplexity: dense {result.reference_decode_perplexity:.2f}, "
                     f"moefy {result.decode_perplexity:.2f} ({result.decode_ratio:.3f}x)")
        return line
    cos = result.cosine
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


def _ffn_fraction(rep) -> str:
    """Mean share of the dense FFN's work a token does after conversion (report's column)."""
    shares = [float(row["FFN FLOPs"].rstrip("%")) for row in rep.layers
              if str(row["FFN FLOPs"]).endswith("%")]
    return f"{sum(shares) / len(shares):.0f}%" if shares else "unknown"


