"""Activation statistics from calibration data, streamed in bounded memory.

    calibration batches → each traced unit's inputs → its exported graph, node by node
      → each FFN's input x and hidden activation h (padding tokens dropped)
      → per FFN: tokens seen; per neuron how often active (h > 0), how often among the token's
        strongest (top 1/8 by |h|: the "markers" of CMoE), mean h, mean |h|; co-marker counts;
        a reservoir of FFN inputs (uniform sample of every token seen) for fitting routers

Memory per FFN: d_ff² for co-marker counts plus ``reservoir × hidden`` for the inputs,
however much data is given.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.fx._pytree as fx_pytree
from tqdm import tqdm

from moefy.errors import ConversionError, first_line
from moefy.passes import trace
from moefy.passes.base import Pass, PassResult
from moefy.passes.elementwise import strip_identities
from moefy.passes.find_ffn import FFNMatch
from moefy.passes.stages import Plans, Request, Statistics
from moefy.passes.verify import describe, describe_batch

_log = logging.getLogger("moefy.convert")
MARKER_FRACTION = 0.125  # share of each token's neurons counted as its markers
RESERVOIR_TOKENS = 16384  # FFN inputs kept per FFN for router fitting and evaluation
# A token whose FFN input norm exceeds this multiple of its batch's median is not data but a
# fault (one such token dominates every least-squares fit, or overflows it to inf): skipped
# and counted. Real models' largest "massive activation" tokens stay far below it.
OUTLIER_RATIO = 1e4


@dataclass
class FFNStats:
    """Streaming statistics of one FFN's hidden activation ``h`` (tokens, d_ff)."""

    d_ff: int
    hidden: int
    capacity: int = RESERVOIR_TOKENS
    tokens: int = 0
    active: torch.Tensor = None  # (d_ff,) tokens on which h > 0
    marked: torch.Tensor = None  # (d_ff,) tokens on which the neuron is a marker
    comarked: torch.Tensor = None  # (d_ff, d_ff) tokens on which both are markers
    sum_h: torch.Tensor = None  # (d_ff,) float64
    sum_abs: torch.Tensor = None  # (d_ff,) float64
    reservoir: torch.Tensor = None  # (≤ capacity, hidden) FFN inputs
    skipped: int = 0  # tokens left out: non-finite, or too large for the fits (OUTLIER_RATIO)
    _filled: int = 0
    _generator: torch.Generator = field(default_factory=lambda: torch.Generator().manual_seed(0))

    def __post_init__(self):
        d = self.d_ff
        self.active = torch.zeros(d)
        self.marked = torch.zeros(d)
        self.comarked = torch.zeros(d, d)
        self.sum_h = torch.zeros(d, dtype=torch.float64)
        self.sum_abs = torch.zeros(d, dtype=torch.float64)
        self.reservoir = torch.empty(self.capacity, self.hidden)

    @property
    def mean_h(self) -> torch.Tensor:
        return (self.sum_h / max(self.tokens, 1)).float()

    @property
    def mean_abs(self) -> torch.Tensor:
        """Mean activation magnitude per neuron."""
        return (self.sum_abs / max(self.tokens, 1)).float()

    @property
    def inputs(self) -> torch.Tensor:
        """The sampled FFN inputs (≤ capacity, hidden), in arrival order."""
        return self.reservoir[: self._filled]

    def correlation(self) -> torch.Tensor:
        """Co-marker counts normalised by each neuron's marker count (cosine of the
        neurons' marker vectors over tokens)."""
        norm = self.marked.clamp_min(1).sqrt()
        return self.comarked / norm[:, None] / norm[None, :]

    @torch.no_grad()
    def add(self, x: torch.Tensor, h: torch.Tensor) -> None:
        """Accumulate a batch of tokens: x (T, hidden), h (T, d_ff). Tokens whose input or
        hidden activation is non-finite, or whose input is an outlier (``OUTLIER_RATIO``),
        are skipped and counted in ``skipped``."""
        x, h = x.detach().cpu(), h.detach().cpu()  # statistics live on the CPU
        keep = usable_tokens(x, h)
        if not keep.all():
            self.skipped += int((~keep).sum())
            x, h = x[keep], h[keep]
        h = h.float()
        t = h.shape[0]
        if t == 0:
            return
        m = max(1, math.ceil(self.d_ff * MARKER_FRACTION))
        markers = torch.zeros_like(h).scatter_(1, h.abs().topk(m, dim=1).indices, 1.0)
        self.active += (h > 0).sum(0)
        self.marked += markers.sum(0)
        self.comarked.addmm_(markers.t(), markers)
        self.sum_h += h.sum(0, dtype=torch.float64)
        self.sum_abs += h.abs().sum(0, dtype=torch.float64)
        self._sample(x.float())
        self.tokens += t

    def _sample(self, x: torch.Tensor) -> None:
        # Reservoir sampling (algorithm R, vectorised): every token seen so far is kept with
        # equal probability capacity / tokens.
        room = self.capacity - self._filled
        take = min(room, x.shape[0])
        if take:
            self.reservoir[self._filled: self._filled + take] = x[:take]
            self._filled += take
        rest = x[take:]
        if not rest.shape[0]:
            return
        seen = self.tokens + take + torch.arange(1, rest.shape[0] + 1, dtype=torch.float64)
        slot = (torch.rand(rest.shape[0], generator=self._generator, dtype=torch.float64)
                * seen).long()
        keep = slot < self.capacity
        self.reservoir[slot[keep]] = rest[keep]


def usable_tokens(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """(T,) bool: tokens whose FFN input x (T, H) and hidden activation h (T, d_ff) are finite,
    with squared norms that fit float32, and whose input norm is at most ``OUTLIER_RATIO``
    times the batch's median."""
    norm_x = x.float().pow(2).sum(1)  # inf when a value is inf or its square overflows
    norm_h = h.float().pow(2).sum(1)
    ok = torch.isfinite(norm_x) & torch.isfinite(norm_h)
    if ok.any():
        median = norm_x[ok].sqrt().median()
        ok &= norm_x.sqrt() <= OUTLIER_RATIO * median.clamp_min(1e-30)
    return ok


class _Recorder(torch.fx.Interpreter):
    def __init__(self, gm: torch.fx.GraphModule, wanted: dict[str, list[tuple[str, str]]]):
        super().__init__(gm)
        self.wanted = wanted  # node name -> [(FFN key, "x" | "h")]: one FFN's h may feed another
        self.values: dict[str, dict[str, torch.Tensor]] = {}

    def run_node(self, n):
        out = super().run_node(n)
        for key, what in self.wanted.get(n.name, ()):
            self.values.setdefault(key, {})[what] = out
        return out


def token_mask(kwargs: dict) -> torch.Tensor | None:
    """The (batch, seq) ``attention_mask`` among keyword inputs, flattened to tokens (True:
    a real token); None when there is none. Padding is not data."""
    mask = kwargs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask.reshape(-1) > 0
    return None


@torch.no_grad()
def collect_stats(ep: torch.export.ExportedProgram, matches: list[FFNMatch],
                  calls: Iterable[tuple[tuple, dict]], stats: dict | None = None,
                  prefix: str = "", mask: torch.Tensor | None = None,
                  same_as: dict[str, str] | None = None) -> dict[str, FFNStats]:
    """Run each (args, kwargs) of ``calls`` through the exported graph and accumulate each
    FFN's statistics into ``stats``, keyed ``prefix:output-node-name``. ``mask`` (tokens,)
    marks the tokens to count (None: all). ``same_as`` maps a match's output node name to
    another's: one FFN called at several sites (a shared module) gathers all of them under
    one key."""
    same_as = same_as or {}
    gm = ep.module()
    spec = gm.graph._codegen.pytree_info.in_spec
    # ep.module() may rename user-input placeholders ("input" -> "input_1"): map by position
    user = [n.name for n in ep.graph.nodes if n.op == "placeholder"
            and n.name in ep.graph_signature.user_inputs]
    renamed = dict(zip(user, [n.name for n in gm.graph.nodes if n.op == "placeholder"],
                       strict=False))
    wanted = {}
    for m in matches:
        key = f"{prefix}:{same_as.get(m.output.name, m.output.name)}"
        wanted.setdefault(strip_identities(m.down.input)[0].name, []).append((key, "h"))
        wanted.setdefault(renamed.get(m.input.name, m.input.name), []).append((key, "x"))
    stats = {} if stats is None else stats
    for args, kwargs in calls:
        recorder = _Recorder(gm, wanted)
        recorder.run(*fx_pytree.tree_flatten_spec((args, kwargs), spec))
        for key, v in recorder.values.items():
            x = v["x"].reshape(-1, v["x"].shape[-1])
            h = v["h"].reshape(-1, v["h"].shape[-1])
            keep = mask if mask is not None and mask.numel() == h.shape[0] else None
            if keep is not None:
                x, h = x[keep], h[keep]
            s = stats.get(key)
            if s is None:
                s = stats[key] = FFNStats(h.shape[1], x.shape[1])
            s.add(x, h)
    return stats


class Progress:
    """A tqdm progress bar on stderr, one tick per ``update``; shown only on a terminal unless
    ``enabled`` says otherwise."""

    def __init__(self, what: str, enabled: bool | None = None, total: int | None = None):
        self.what = what
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = tqdm(desc=f"moefy {what}", total=total, disable=not self.enabled,
                         file=sys.stderr, unit="batch", dynamic_ncols=True)

    def update(self, message: str, force: bool = False) -> None:
        self._bar.set_postfix_str(message, refresh=False)
        self._bar.update(1)
        if force:
            self._bar.refresh()

    def close(self) -> None:
        self._bar.close()


class Calibrate(Pass):
    """calibration batches ⇒ per-FFN activation statistics (split and peer)."""

    needs = (Plans,)

    def call(self, r: Request, plans: Plans) -> PassResult:
        if r.calibration_data is None or r.config.method not in ("split", "peer"):
            if r.config.method == "neuron" and r.calibration_data is not None and (
                    r.config.minutes is not None):
                # read once, here: the thresholds are set on them, then distillation cycles
                kept = _keep_batches(r.calibration_data, r.config.calibration_tokens)
                return PassResult(False, {"batches": len(kept)}, Statistics(batches=kept))
            return PassResult(False, output=Statistics())
        stats: dict[str, FFNStats] = {}
        kept = []  # distillation (config.minutes) cycles through them after building
        batches = 0
        progress = Progress("calibration", r.progress)
        for batch in r.calibration_data:
            try:
                _collect(r, plans, batch, stats)
            except ConversionError as exc:
                exc.args = (f"calibration batch {batches}: {exc}",)
                raise
            except Exception as exc:  # any failure here means the batch does not fit
                raise ConversionError(
                    f"calibration batch {batches} does not fit the model: "
                    f"{type(exc).__name__}: {first_line(exc)}\n"
                    f"Each batch must be inputs like example_inputs "
                    f"({describe(r.args, r.kwargs)}), with the same dtypes and the same "
                    f"sizes except batch and sequence; got {describe_batch(batch)}. Nothing "
                    "was changed.") from exc
            batches += 1
            if r.config.minutes is not None:
                kept.append(batch)
            tokens = min((st.tokens for st in stats.values()), default=0)
            progress.update(f"{batches} batches, {tokens:,} tokens")
            cap = r.config.calibration_tokens
            if cap is not None and tokens >= cap:
                _log.info("calibration: stopped after %d batches (%d tokens per FFN, "
                          "MoEConfig.calibration_tokens)", batches, tokens)
                break
        progress.close()
        if not batches:
            raise ConversionError("calibration_data yielded no batches")
        empty = [p.plan.name for p in plans.plans
                 if p.key not in stats or stats[p.key].tokens == 0]
        if empty:
            raise ConversionError(
                f"calibration_data gave no usable token to {', '.join(empty[:4])}: "
                "every token was padding, or non-finite / an extreme outlier (skipped). Check "
                "the data, or convert without calibration_data. Nothing was changed.")
        skipped = sum(st.skipped for st in stats.values())
        if skipped:
            _log.warning("calibration: skipped %d token(s) whose FFN input or activation was "
                         "non-finite or an extreme outlier", skipped)
        return PassResult(False, {"batches": batches, "ffns": len(stats), "skipped": skipped},
                          Statistics(stats, tuple(kept)))


def _keep_batches(data, tokens: int | None) -> tuple:
    """The first batches of ``data`` holding ``tokens`` tokens (all of them for None)."""
    kept, seen = [], 0
    for batch in data:
        kept.append(batch)
        ids = batch.get("input_ids") if isinstance(batch, dict) else None
        seen += ids.numel() if isinstance(ids, torch.Tensor) else 0
        if tokens is not None and seen >= tokens:
            break
    if not kept:
        raise ConversionError("calibration_data yielded no batches")
    return tuple(kept)


def _collect(r: Request, plans: Plans, batch, stats: dict) -> None:
    args, kwargs = trace.batch_inputs(r.model, batch, "it", ConversionError)
    check_like_example(args, kwargs, r.args, r.kwargs)
    if [u.path for u in plans.units] == [""]:  # the whole model is one graph: no hooks
        calls = {"": (args, kwargs)}
    else:
        calls = trace.record_calls(r.model, args, kwargs, paths={u.path for u in plans.units})
    mask = token_mask(kwargs)
    for unit in plans.units:
        mine = [p for p in plans.plans if p.unit is unit]
        sites = [site for p in mine for site in (p.sites or [p.match])]
        same_as = {site.output.name: p.match.output.name
                   for p in mine for site in (p.sites or [p.match])}
        if sites:
            collect_stats(unit.ep, sites, [calls[unit.path]], stats, unit.path,
                          mask=mask, same_as=same_as)


def check_like_example(args: tuple, kwargs: dict, ex_args: tuple, ex_kwargs: dict) -> None:
    """A calibration batch must be the traced example's kind of inputs: the same keywords
    and positions (an input the graph was not traced with would be dropped silently, one it
    was traced with would be missing), the same dtypes and ranks."""
    extra, missing = sorted(set(kwargs) - set(ex_kwargs)), sorted(set(ex_kwargs) - set(kwargs))
    if extra or missing or len(args) != len(ex_args):
        raise ConversionError(
            f"its inputs ({describe(args, kwargs)}) are not those the model was traced with "
            f"({describe(ex_args, ex_kwargs)}): every batch must have the same positional "
            "inputs and keywords as example_inputs (when example_inputs is not given, as the "
            "first calibration batch)")
    pairs = list(zip(args, ex_args, strict=True)) + [(kwargs[k], ex_kwargs[k])
                                                     for k in ex_kwargs]
    for got, want in pairs:
        if isinstance(want, torch.Tensor) and (not isinstance(got, torch.Tensor) or (
                got.dtype != want.dtype or got.dim() != want.dim())):
            raise ConversionError(
                f"its inputs ({describe(args, kwargs)}) differ in dtype or rank from those the "
                f"model was traced with ({describe(ex_args, ex_kwargs)}); convert the batch's "
                "tensors to the example's dtypes")
