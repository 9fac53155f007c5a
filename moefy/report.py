"""``moefy.report``: what a converted model holds and, given data, how it routes and how far
each MoE is from its all-experts function.

    model (+ data) ⇒ one row per MoE: name, method, E, k, shared, params total / active,
                     FFN FLOP fraction; with data: tokens, expert usage, unevenness
                     KL(load ‖ uniform), busiest expert's share, relative error vs every
                     expert active (the dense FFN, for splits), dropped assignments
"""

from __future__ import annotations

import math
import struct
import zlib
from pathlib import Path

import torch
import torch.nn as nn

from moefy.calibrate import token_mask
from moefy.layers.moe import MoE
from moefy.passes.trace import split_inputs


class Report(str):
    """The report's text; ``layers`` holds the same numbers per MoE as dicts
    (with data: ``load``, the (E,) routed-weight mass per expert, normalised to sum 1)."""

    layers: list[dict]


def report(model: nn.Module, data=None, *, heatmap: str | Path | None = None) -> Report:
    """One row per MoE layer: name, method, E, k, shared, parameters total / active per
    token, FFN FLOP fraction (active FFN work per token relative to the dense FFN).

    With ``data`` (an iterable of model inputs; padding skipped via ``attention_mask``) each
    row adds: tokens seen, usage (share of experts that got any token), unevenness
    KL(z ‖ uniform) of the routed weight mass z (0 = perfectly even; PEER's measure), the
    busiest expert's share, and the relative error ‖y − y_all‖ / ‖y_all‖ of the layer's output
    against the same layer with every expert active — for a split before training that is
    the dense FFN. ``heatmap``: also write a PNG of the load (layers × experts).

    >>> moe = MoE(8, 16, num_experts=4, top_k=2)
    >>> "E" in report(moe)
    True
    """
    moes = [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]
    layers = [_static_row(name, m) for name, m in moes]
    if data is not None:
        _measure(model, [m for _, m in moes], layers, data)
    if heatmap is not None:
        if data is None:
            raise ValueError("report: heatmap needs data to measure the load")
        write_heatmap(heatmap, [row["load"] for row in layers])
    cols = ["name", "method", "E", "k", "shared", "params", "active", "FFN FLOPs"]
    if data is not None:
        cols += ["tokens", "usage", "uneven", "max load", "rel err", "dropped"]
    rows = [cols] + [[_fmt(row[c]) for c in cols] for row in layers]
    widths = [max(len(r[i]) for r in rows) for i in range(len(cols))]
    text = Report("\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                            for r in rows))
    text.layers = layers
    return text


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 100 else f"{v:.0f}"
    return str(v)


def _static_row(name: str, m: MoE) -> dict:
    info = getattr(m, "conversion", {})
    per_neuron = m.hidden_size * (3 if m.gated else 2)  # weights touched per hidden neuron
    shared_size = 0 if m.shared.ffn is None else m.shared.ffn.fc_in.out_features
    active = (m.top_k * m.expert_size + shared_size) * per_neuron + m.router.weight.numel()
    dense_size = info.get("dense_ffn_size")
    frac = ("—" if dense_size is None
            else f"{(m.top_k * m.expert_size + shared_size) / dense_size:.0%}")
    return {"name": info.get("name", name), "method": info.get("method", "—"),
            "E": m.num_experts, "k": m.top_k, "shared": shared_size,
            "params": f"{sum(p.numel() for p in m.parameters()) / 1e6:.2f}M",
            "active": f"{active / 1e6:.2f}M", "FFN FLOPs": frac}


@torch.no_grad()
def _measure(model: nn.Module, moes: list[MoE], layers: list[dict], data) -> None:
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
            x = x[rows]
            ids = m._token_ids
            ids = None if ids is None else ids.reshape(-1)[rows]
            weights, indices = m.route(x, ids)  # (T, slots)
            dropped[i] += m.last_dropped
            mass[i].index_add_(0, indices.reshape(-1), weights.reshape(-1).double())
            y = out.reshape(-1, m.hidden_size)[rows].float()
            ref = _all_experts(m, x).float()
            err[i][0] += float((y - ref).pow(2).sum())
            err[i][1] += float(ref.pow(2).sum())
            tokens[i] += x.shape[0]
        return hook

    handles = [m.register_forward_hook(hook_for(i, m), with_kwargs=True)
               for i, m in enumerate(moes)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        for batch in data:
            args, kwargs = split_inputs(model, batch)
            mask[0] = token_mask(kwargs)
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes:
            m.training = training
    for i, row in enumerate(layers):
        total = float(mass[i].sum())
        z = (mass[i] / total).float() if total > 0 else torch.zeros(E[i])
        nz = z[z > 0]
        row.update({
            "tokens": tokens[i],
            "usage": float((z > 0).float().mean()),
            "uneven": float(math.log(E[i]) + (nz * nz.log()).sum()) if total > 0 else 0.0,
            "max load": float(z.max()) if total > 0 else 0.0,
            "rel err": math.sqrt(err[i][0] / err[i][1]) if err[i][1] > 0 else 0.0,
            "dropped": dropped[i],
            "load": z,
        })


def _all_experts(m: MoE, x: torch.Tensor) -> torch.Tensor:
    """The layer with every routed expert active (so no compensation): unweighted for "sum",
    else weighted by the softmax over all E logits."""
    t = x.shape[0]
    indices = torch.arange(m.num_experts).expand(t, -1)
    if m.combine == "sum":
        weights = x.new_ones(t, m.num_experts)
    else:
        weights = torch.softmax(m.router(x), dim=-1, dtype=torch.float32).to(x.dtype)
    y = m._routed(x, weights, indices)
    use = m.shared.use_compensation
    try:
        m.shared.use_compensation = False
        return y if m.shared.is_empty else y + m.shared(x)
    finally:
        m.shared.use_compensation = use


# ---------------------------------------------------------------------------- heatmap PNG
_STOPS = ((0.0, (68, 1, 84)), (0.25, (59, 82, 139)), (0.5, (33, 145, 140)),
          (0.75, (94, 201, 98)), (1.0, (253, 231, 37)))  # viridis, 5 stops


def _colour(v: float) -> tuple[int, int, int]:
    v = min(max(v, 0.0), 1.0)
    for (a, ca), (b, cb) in zip(_STOPS, _STOPS[1:], strict=False):
        if v <= b:
            f = (v - a) / (b - a)
            return tuple(round(x + (y - x) * f) for x, y in zip(ca, cb, strict=True))
    return _STOPS[-1][1]


def write_heatmap(path: str | Path, loads: list[torch.Tensor], cell: int = 12) -> None:
    """A PNG, one row of cells per layer, one column per expert, colour = load relative to the
    busiest expert of the whole model (dark: idle, yellow: busiest)."""
    if not loads:
        raise ValueError("heatmap: the model holds no MoE layer")
    width = max(int(z.numel()) for z in loads)
    top = max(float(z.max()) for z in loads) or 1.0
    raw = bytearray()
    for z in loads:
        colours = [_colour(float(v) / top) for v in z.tolist()]
        colours += [(255, 255, 255)] * (width - len(colours))
        line = bytes([0]) + b"".join(bytes(c) * cell for c in colours)  # filter byte 0
        raw += line * cell
    w, h = width * cell, len(loads) * cell

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(bytes(raw), 9)) + chunk(b"IEND", b""))
    Path(path).write_bytes(png)
