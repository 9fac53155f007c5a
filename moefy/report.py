"""``moefy.report``: what a converted model holds and, given data, how it routes and how far
each MoE is from its all-experts function.

    model (+ data) ⇒ one row per MoE: name, method, E, k, shared, params total / active,
                     FFN FLOP fraction; with data: tokens, expert usage, unevenness
                     KL(load ‖ uniform), busiest expert's share, relative error vs every
                     expert active (the dense FFN, for splits), dropped assignments
                   ⇒ one row per PEER: the same columns, k = heads×top_k; with data, usage
                     and unevenness as PEER's Table 2 defines them (over real experts)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn as nn

from moefy.errors import MissingDependencyError, ReportInputError
from moefy.layers.moe import MoE
from moefy.layers.neuron import NeuronFFN, SparseLinear, every_row_kept
from moefy.layers.peer import PEER
from moefy.passes.calibrate import token_mask
from moefy.passes.neuron import kept_shares, knob_weights
from moefy.passes.trace import batch_inputs


class Report(str):
    """The report's text; ``layers`` holds the same numbers per MoE as dicts
    (with data: ``load``, the (E,) routed-weight mass per expert, normalised to sum 1)."""

    layers: list[dict]


def report(model: nn.Module, data=None, *, heatmap: str | Path | None = None) -> Report:
    """One row per MoE layer: name, method, E, k, shared, parameters total / active per
    token, FFN FLOP fraction (active FFN work per token relative to the dense FFN).

    A ``moefy.PEER`` layer gets a row too: k is heads×top_k, parameters active per token
    count its query network and all sub-keys, and its FLOP fraction counts retrieval (query,
    sub-key scores) with the h·k single-neuron experts. With data its load is PEER's z
    (Table 2): zᵢ = Σ_x gᵢ(x), the routing weights of expert i summed over heads and tokens
    (from ``layer.route`` on the layer's inputs), normalised to sum 1 over the real experts;
    usage = share of real experts with zᵢ > 0, unevenness = log N + Σ zᵢ log zᵢ. An expert
    whose parameters are all zero (the padding a conversion adds to reach a grid: it computes
    0 and, as act(0) = 0, never trains) is not a real expert. PEER has no all-experts
    reference (rel err "—") and drops nothing.

    With ``data`` (an iterable of model inputs; padding skipped via ``attention_mask``) each
    row adds: tokens seen, usage (share of experts that got any token), unevenness
    KL(z ‖ uniform) of the routed weight mass z (0 = perfectly even; PEER's measure), the
    busiest expert's share, and the relative error ‖y − y_all‖ / ‖y_all‖ of the layer's output
    against the same layer with every expert active — for a split before training that is
    the dense FFN. ``heatmap``: also write a PNG of the load, one labelled row per MoE layer
    (PEER layers are left out: their load is in ``layers``)
    and one column per expert, with a colour bar (needs matplotlib: ``pip install
    'moefy[plot]'``). Bad arguments raise ``moefy.errors.ReportInputError`` before any data
    is run.

    >>> moe = MoE(8, 16, num_experts=4, top_k=2)
    >>> "E" in report(moe)
    True
    """
    if not isinstance(model, nn.Module):
        raise ReportInputError(f"report: model must be a torch.nn.Module, got "
                               f"{type(model).__name__}")
    if data is not None and (isinstance(data, (torch.Tensor, dict, str, bytes))
                             or not isinstance(data, Iterable)):
        raise ReportInputError(
            f"report: data must be an iterable of batches (a list of input tuples or dicts, "
            f"or a DataLoader), got {type(data).__name__}; one batch x is [(x,)]")
    # every layer of experts, in model order
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE | PEER)]
    if heatmap is not None:  # everything the heatmap needs is checked before measuring
        if data is None:
            raise ReportInputError("report: heatmap needs data to measure the load")
        if not any(isinstance(m, MoE) for _, m in moes):
            raise ReportInputError(f"report: heatmap: {type(model).__name__} holds no "
                                   "moefy.MoE layer (the heatmap draws MoE layers only; a "
                                   "PEER's load is in report(...).layers)")
        heatmap = _heatmap_path(heatmap)
        _figure_class()
    layers = [_static_row(name, m) if isinstance(m, MoE) else _peer_row(name, m)
              for name, m in moes]
    if data is not None:
        _measure(model, [m for _, m in moes], layers, data)
    if heatmap is not None:
        drawn = [row for row, (_, m) in zip(layers, moes, strict=True) if isinstance(m, MoE)]
        write_heatmap(heatmap, [row["load"] for row in drawn], [row["name"] for row in drawn])
    cols = ["name", "method", "E", "k", "shared", "params", "active", "FFN FLOPs"]
    if any(row["calib skipped"] for row in layers):  # calibration tokens left out as faulty
        cols.append("calib skipped")
    if data is not None:
        cols += ["tokens", "usage", "uneven", "max load", "rel err", "dropped"]
    sparse = [(name, m) for name, m in model.named_modules()
              if isinstance(m, NeuronFFN | SparseLinear)]
    neuron_rows = [_neuron_row(name, m) for name, m in sparse]
    if data is not None and sparse:
        _measure_reads(model, [m for _, m in sparse], neuron_rows, data)
    tables = []
    if layers or not sparse:
        tables.append(_table(cols, layers))
    if sparse:
        ncols = ["name", "method", "kind", "weights", "budget"] + (
            ["tokens", "read", "rel err"] if data is not None else [])
        tables.append(_table(ncols, neuron_rows) + "\n" + _neuron_total(neuron_rows, data))
    text = Report("\n\n".join(tables))
    text.layers = layers + neuron_rows
    return text


def _table(cols: list[str], layers: list[dict]) -> str:
    rows = [cols] + [[_fmt(row[c], c) for c in cols] for row in layers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


def _neuron_row(name: str, m: NeuronFFN | SparseLinear) -> dict:
    """A single-neuron layer: its weights, and the share of them the budget allocated
    (the conversion's calibrated shares; 100% with thresholds off)."""
    info = m.conversion
    weights = knob_weights(m)
    shares = {"threshold": info.get("share_in", 1.0), "in_threshold": info.get("share_in", 1.0),
              "h_threshold": info.get("share_h", 1.0), "keep": info.get("share_keep", 1.0),
              "static": info.get("share_keep", 1.0)}
    budget = sum(w * shares[a] for a, w in weights.items()) / sum(weights.values())
    kind = (f"ffn ({m.selection})" if isinstance(m, NeuronFFN) else "projection")
    return {"name": info.get("name", name), "method": info.get("method", "—"), "kind": kind,
            "weights": f"{sum(weights.values()) / 1e6:.2f}M", "budget": f"{budget:.0%}",
            "budget_share": budget, "weight_count": sum(weights.values()),
            "tokens": None, "read": None, "read_share": None, "rel err": None}


def _neuron_total(rows: list[dict], data) -> str:
    total = sum(r["weight_count"] for r in rows)
    planned = sum(r["weight_count"] * r["budget_share"] for r in rows) / total
    line = f"weights read per token: {planned:.1%} of {total / 1e6:.2f}M planned"
    if data is not None and all(r["read_share"] is not None for r in rows):
        read = sum(r["weight_count"] * r["read_share"] for r in rows) / total
        line += f", {read:.1%} measured on the data"
    return line


def _measure_reads(model: nn.Module, layers: list, rows: list[dict], data) -> None:
    """Per single-neuron layer on ``data``: the share of its weights the real tokens read,
    and its relative output error against the same layer with every row kept."""
    sums = [{"tokens": 0, "read": 0.0, "err": 0.0, "ref": 0.0} for _ in layers]
    mask: list[torch.Tensor | None] = [None]

    def hook_for(i, m):
        weights = knob_weights(m)
        total = sum(weights.values())

        def hook(module, args, out):
            x = args[0].reshape(-1, args[0].shape[-1])
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                x, y = x[mask[0].to(x.device)], out.reshape(x.shape[0], -1)[mask[0]]
            else:
                y = out.reshape(x.shape[0], -1)
            if not x.shape[0]:
                return
            shares = kept_shares(m, x)
            read = sum(weights[a] * shares[a] for a in weights) / total
            acc = sums[i]
            acc["read"] += read * x.shape[0]
            acc["tokens"] += x.shape[0]
            if isinstance(m, NeuronFFN) and m.selection == "static":
                return  # no per-token choice: its dense FFN is gone, no error to measure
            if isinstance(m, NeuronFFN) and m.selection == "sequence":
                # the prompt runs dense: the error is the continuation's, decoded through
                # the set its first half picked
                pair = m.prompt_then_decode(args[0])
                if pair is not None:
                    acc["err"] += float((pair[0] - pair[1]).float().pow(2).sum())
                    acc["ref"] += float(pair[1].float().pow(2).sum())
                return
            ref = _all_kept(m, x).float()
            acc["err"] += float((y.float() - ref).pow(2).sum())
            acc["ref"] += float(ref.pow(2).sum())
        return hook

    handles = [m.register_forward_hook(hook_for(i, m)) for i, m in enumerate(layers)]
    try:
        with torch.no_grad():
            _run(model, data, mask)
    finally:
        for h in handles:
            h.remove()
    for acc, row in zip(sums, rows, strict=True):
        seen = acc["tokens"] > 0
        row.update({"tokens": acc["tokens"],
                    "read_share": acc["read"] / acc["tokens"] if seen else None,
                    "read": f"{acc['read'] / acc['tokens']:.0%}" if seen else None,
                    "rel err": math.sqrt(acc["err"] / acc["ref"]) if acc["ref"] > 0 else None})


def _all_kept(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x`` with every row kept (the dense projection or FFN)."""
    with every_row_kept([m]):
        return m.forward(x)  # not m(x): that would run this report's hook again


def _fmt(v, col: str = "") -> str:
    if v is None:
        return "—"
    if col == "usage":  # a share of experts, written as PEER's Table 2 does
        return f"{v:.1%}"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _static_row(name: str, m: MoE) -> dict:
    info = m.conversion
    # weights touched per hidden neuron: its input row(s) and its output column
    per_neuron = m.hidden_size * (2 if m.gated else 1) + m.output_size
    shared_size = 0 if m.shared.ffn is None else m.shared.ffn.fc_in.out_features
    active = (m.top_k * m.expert_size + shared_size) * per_neuron + m.router.weight.numel()
    dense_size = info.get("dense_ffn_size")
    frac = ("—" if dense_size is None
            else f"{(m.top_k * m.expert_size + shared_size) / dense_size:.0%}")
    return {"name": info.get("name", name), "method": info.get("method", "—"),
            "E": m.num_experts, "k": m.top_k, "shared": shared_size,
            "params": f"{_layer_params(m) / 1e6:.2f}M",
            "active": f"{active / 1e6:.2f}M", "FFN FLOPs": frac,
            "calib skipped": info.get("calibration_skipped", 0)}


def _layer_params(m: MoE) -> int:
    """Parameters of the whole layer, also when ``moefy.distributed.expert_parallel`` left this
    rank only its block of the routed experts (the rows it lacks are counted per expert)."""
    total = sum(p.numel() for p in m.parameters())
    shard = m.shard if isinstance(m, MoE) else None
    if shard is not None:
        missing = m.num_experts - (shard.stop - shard.start)
        total += missing * sum(math.prod(p.shape[1:]) for p in (
            m.w_in, m.w_gate, m.w_out, m.b_in, m.b_gate, m.b_out) if p is not None)
    return total


def _peer_row(name: str, m: PEER) -> dict:
    info = m.conversion
    slots = m.heads * m.top_k  # single-neuron experts per token (heads may share some)
    per_neuron = m.hidden_size * (3 if m.gated else 2)  # weights one expert touches
    # retrieval: the query network (and its BatchNorm) and every sub-key, for every token
    retrieval = sum(p.numel() for p in m.query.parameters()) + m.keys_a.numel() + (
        m.keys_b.numel())
    if m.query_norm is not None:
        retrieval += m.query_norm.weight.numel() + m.query_norm.bias.numel()
    active = slots * per_neuron + retrieval + (0 if m.down_bias is None else slots) + (
        0 if m.out_bias is None else m.hidden_size)
    dense_size = info.get("dense_ffn_size")
    n1, n2 = m.grid
    # multiply-adds per token: experts, query GEMM, sub-key scores (h·(n₁+n₂)·d/2)
    work = (slots * per_neuron + m.hidden_size * m.heads * m.key_dim
            + m.heads * (n1 + n2) * m.key_dim // 2)
    frac = ("—" if dense_size is None
            else f"{work / (dense_size * per_neuron):.0%}")
    total = sum(p.numel() for p in m.parameters())
    return {"name": info.get("name", name), "method": info.get("method", "peer"),
            "E": m.num_experts, "k": f"{m.heads}×{m.top_k}", "shared": 0,
            "params": f"{total / 1e6:.2f}M", "active": f"{active / 1e6:.2f}M",
            "FFN FLOPs": frac, "calib skipped": info.get("calibration_skipped", 0)}


def real_experts(m: PEER) -> torch.Tensor:
    """(N,) bool: False for an expert whose parameters are all exactly zero — the padding a
    conversion adds to reach a grid (it computes 0, and as act(0) = 0 it gets no gradient)."""
    live = m.down.detach().ne(0).any(1) | m.up.detach().ne(0).any(1)
    for p in (m.gate, m.down_bias):
        if p is not None:
            live |= p.detach().ne(0).reshape(m.num_experts, -1).any(1)
    return live.cpu()


@torch.no_grad()
def _measure(model: nn.Module, moes: list[MoE | PEER], layers: list[dict], data) -> None:
    E = [m.num_experts for m in moes]
    mass = [torch.zeros(e, dtype=torch.float64) for e in E]
    err = [[0.0, 0.0] for _ in moes]  # Σ‖y − y_all‖², Σ‖y_all‖²
    tokens = [0] * len(moes)
    dropped = [0] * len(moes)
    mask: list[torch.Tensor | None] = [None]

    def hook_for(i, m):
        def hook(module, args, kwargs, out):
            x = args[0].reshape(-1, m.hidden_size)
            keep = mask[0]
            rows = slice(None) if keep is None or keep.numel() != x.shape[0] else keep
            ids = kwargs.get("token_ids", args[1] if len(args) > 1 else None)
            # route every token as the forward did (hash routers need all ids), keep the real
            sel = m.select(x, ids)
            weights, indices = sel.weights[rows], sel.indices[rows]  # (T, slots)
            x = x[rows]
            dropped[i] += m.last_dropped
            mass[i].index_add_(0, indices.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
            y = out.reshape(-1, m.output_size)[rows].float()
            ref = _all_experts(m, x).float()
            err[i][0] += float((y - ref).pow(2).sum())
            err[i][1] += float(ref.pow(2).sum())
            tokens[i] += x.shape[0]
        return hook

    def peer_hook_for(i, m):
        def hook(module, args, kwargs, out):
            x = (args[0] if args else kwargs["x"]).reshape(-1, m.hidden_size)
            keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            if mask[0] is not None and mask[0].numel() == x.shape[0]:
                keep &= mask[0].to(x.device)
            own = kwargs.get("mask", args[1] if len(args) > 1 else None)  # PEER's own padding
            if own is not None:
                keep &= own.reshape(-1).to(x.device)
            route = m.route(x)  # (T, heads, k) ids and weights g_i(x)
            ids, weights = route.ids[keep], route.weights[keep]
            mass[i].index_add_(0, ids.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
            tokens[i] += int(keep.sum())
        return hook

    handles = [m.register_forward_hook((peer_hook_for if isinstance(m, PEER) else hook_for)(
        i, m), with_kwargs=True) for i, m in enumerate(moes)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        _run(model, data, mask)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    for i, row in enumerate(layers):
        peer = isinstance(moes[i], PEER)
        # Table 2 over the real experts only (padding is not an expert); load stays by id
        real = real_experts(moes[i]) if peer else torch.ones(E[i], dtype=torch.bool)
        mass[i][~real] = 0.0
        if peer:
            E[i] = int(real.sum())
            row["experts"] = E[i]
        total = float(mass[i].sum())
        z = (mass[i] / total).float() if total > 0 else torch.zeros(real.numel())
        nz = z[z > 0]
        seen = tokens[i] > 0  # a layer that saw no token has no usage or error to report
        row.update({
            "tokens": tokens[i],
            "usage": float((z[real] > 0).float().mean()) if seen and E[i] else None,
            "uneven": float(math.log(E[i]) + (nz * nz.log()).sum()) if total > 0 else None,
            "max load": float(z.max()) if total > 0 else None,
            "rel err": None if peer else (math.sqrt(err[i][0] / err[i][1]) if err[i][1] > 0
                                          else 0.0 if seen and err[i][0] == 0 else None),
            "dropped": dropped[i],
            "load": z,
        })


def _run(model: nn.Module, data, mask: list) -> None:
    """Run ``model`` on every batch of ``data``, ``mask[0]`` holding each batch's token mask
    for the hooks; raises when there is no batch."""
    batches = 0
    for batch in data:
        args, kwargs = batch_inputs(model, batch, f"report: batch {batches}", ReportInputError)
        mask[0] = token_mask(kwargs)
        model(*args, **kwargs)
        batches += 1
    if not batches:
        raise ReportInputError("report: data yielded no batches")


def _all_experts(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer with every routed expert active (so no compensation): unweighted for "sum",
    else weighted by the softmax over all E logits."""
    t = x.shape[0]
    indices = torch.arange(m.num_experts, device=x.device).expand(t, -1)
    if m.combine == "sum":
        weights = x.new_ones(t, m.num_experts)
    else:
        weights = torch.softmax(m.router(x), dim=-1, dtype=torch.float32).to(x.dtype)
    y = m.routed(x, weights, indices)
    if m.shared.is_empty:
        return y
    use = m.shared.use_compensation
    try:
        m.shared.use_compensation = False
        return y + m.shared(x)
    finally:
        m.shared.use_compensation = use


# ---------------------------------------------------------------------------- heatmap
_DPI = 100


def _figure_class():
    """matplotlib's ``Figure`` class (no pyplot: no global state, no display needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise MissingDependencyError(
            "report(heatmap=...) draws with matplotlib, which is not installed: "
            "pip install 'moefy[plot]' (or pip install matplotlib)") from exc
    return Figure


def _heatmap_path(path) -> Path:
    if not isinstance(path, (str, Path)):
        raise ReportInputError(f"report: heatmap must be a file path (str or Path), got "
                               f"{type(path).__name__}")
    path = Path(path)
    if path.is_dir():
        raise ReportInputError(f"report: heatmap {path} is a directory; name a .png file")
    if not path.parent.is_dir():
        raise ReportInputError(f"report: heatmap's folder {path.parent} does not exist")
    return path


def heatmap_size(layers: int, experts: int) -> tuple[float, float]:
    """Figure size in inches (width, height): room per expert column and per layer row."""
    return (min(max(4.0 + 0.3 * experts, 6.0), 24.0),
            min(max(1.5 + 0.35 * layers, 3.0), 40.0))


def write_heatmap(path: str | Path, loads: list[torch.Tensor],
                  names: list[str] | None = None) -> None:
    """A PNG of the load: one row per MoE layer (labelled with its name), one column per
    expert, colour = the expert's share of the layer's routed weight (a layer with fewer
    experts than the widest is blank beyond its last expert)."""
    Figure = _figure_class()
    if not loads:
        raise ReportInputError("report: heatmap: the model holds no moefy.MoE layer")
    names = list(names) if names is not None else [f"layer {i}" for i in range(len(loads))]
    width = max(int(z.numel()) for z in loads)
    grid = torch.full((len(loads), width), float("nan"))
    for i, z in enumerate(loads):
        grid[i, : z.numel()] = z.float()
    fig = Figure(figsize=heatmap_size(len(loads), width), dpi=_DPI, layout="constrained")
    ax = fig.add_subplot()
    image = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", vmin=0.0,
                      interpolation="nearest")
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_title("expert load (share of each layer's routed weight)")
    ax.set_yticks(range(len(loads)), names)
    if width <= 32:
        ax.set_xticks(range(width))
    fig.colorbar(image, ax=ax, label="share of routed weight")
    fig.savefig(path, format="png", dpi=_DPI)
