"""PEER builder: a matched dense FFN ⇒ a ``moefy.PEER`` whose single-neuron experts are its
neurons, with product keys and a query fitted to retrieve the neurons the FFN activates most.

    carve:  W1 (d_ff, H), W2 (H, d_ff), Wg  ⇒  down[i] = W1[i], up[i] = W2[:, i], gate[i] = Wg[i],
            b1 ⇒ down_bias, b2 ⇒ out_bias; N = n1·n2 ≥ d_ff, the pad experts all zero (inert)
    fit:    calibration inputs x  ⇒  grid placement, keys, query (Linear + BatchNorm in eval
            mode): ``moefy.passes.fit_peer``, which says how and why
    build:  carve a float32 CPU copy → fit its retrieval, keeping each refinement only where
            validation tokens confirm it → carve the FFN at the fitted placement, copy keys and
            query over → measure on held-out tokens

No published method converts a dense FFN into PEER; this is moefy's, measured on
all-MiniLM-L6-v2 by ``examples/peer_quality.py``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from moefy.activations import get_activation
from moefy.config import MoEConfig
from moefy.errors import ConversionError
from moefy.layers.peer import PEER
from moefy.layers.record import ConversionRecord
from moefy.passes.fit_peer import fit_retrieval, init_retrieval, measure, reassign

DEFAULT_FIT_STEPS = 200  # with calibration data; ~30 ms per step at d_ff 1536 on 2 cores

Tensor = torch.Tensor


# ---- carving ---------------------------------------------------------------------------------


def peer_grid(d_ff: int) -> tuple[int, int]:
    """The product-key grid (n1, n2), n1 ≤ n2 ≤ 2·n1, with the fewest cells ≥ ``d_ff`` (ties:
    the squarer one)."""
    best = None
    for n1 in range(1, math.isqrt(d_ff) + 2):
        n2 = max(n1, -(-d_ff // n1))
        if n2 > 2 * n1:
            continue
        key = (n1 * n2, n2 - n1)
        if best is None or key < best[0]:
            best = (key, (n1, n2))
    return best[1]


def check_peer(name: str, dense, config: MoEConfig) -> None:
    """Raise ``ConversionError`` (before anything changes) when ``dense`` cannot become a PEER
    layer as configured."""
    if not isinstance(dense.activation, str):
        raise ConversionError(
            f"{name}: method='peer' needs a named activation (the fused expert op implements "
            "it); this FFN's activation is a custom element-wise subgraph. Convert it with "
            "method='split', or skip it (MoEConfig.skip)")
    if dense.output_size != dense.hidden_size:  # find_ffns rejects these; a guard for the rest
        raise ConversionError(
            f"{name}: output width {dense.output_size} differs from input width "
            f"{dense.hidden_size}: a PEER layer maps H → H; use method='split' or 'upcycle'")
    if dense.b_gate is not None and bool((dense.b_gate != 0).any()):
        raise ConversionError(
            f"{name}: the gate projection has a bias, which a PEER expert cannot hold (a gated "
            "expert is act(g_i·x) · (u_i·x + b_i) · v_i): use method='split'")
    n1, n2 = peer_grid(dense.ffn_size)
    heads = config.peer_heads or 1
    if heads > n1:
        raise ConversionError(f"{name}: peer_heads={heads} is more than the {n1} grid rows "
                              f"of this FFN's {n1}x{n2} grid (d_ff {dense.ffn_size}); each "
                              "head owns a block of rows")
    cells = (n1 // heads) * n2
    if config.top_k > cells:
        raise ConversionError(
            f"{name}: top_k={config.top_k} neurons per head is more than a head's "
            f"{cells} grid cells ({n1}x{n2} grid for d_ff {dense.ffn_size}, rows shared by "
            f"{heads} head(s)): lower top_k or peer_heads")


@torch.no_grad()
def carve(dense, config: MoEConfig, cells: Tensor | None = None) -> PEER:
    """A PEER layer holding the FFN's neurons as its experts: neuron i at grid cell
    ``cells[i]`` (default: cell i), pad cells all zero. Keys and query are left zero."""
    d_ff, hidden = dense.ffn_size, dense.hidden_size
    n1, n2 = peer_grid(d_ff)
    heads = config.peer_heads or 1
    key_dim = config.peer_key_dim or 2 * max(n1, n2)
    bias = dense.b_in is not None or dense.b_out is not None
    with torch.device("meta"):  # no random init of tables the carving overwrites
        layer = PEER(hidden, (n1, n2), heads=heads, top_k=config.top_k, key_dim=key_dim,
                     activation=dense.activation, query_norm="batch", score="none",
                     bias=bias, gated=dense.w_gate is not None)
    w = dense.w_in
    layer = layer.to(w.dtype).to_empty(device=w.device)
    for t in [*layer.parameters(), *layer.buffers()]:
        t.zero_()
    layer.query_norm.running_var.fill_(1.0)
    layer.query_norm.weight.fill_(1.0)
    if cells is None:
        cells = torch.arange(d_ff)
    cells = cells.to(w.device)
    layer.down[cells] = w
    layer.up[cells] = dense.w_out.t().to(w.dtype)
    if layer.gate is not None:
        layer.gate[cells] = dense.w_gate
    if dense.b_in is not None:
        layer.down_bias[cells] = dense.b_in
    if dense.b_out is not None:
        layer.out_bias.copy_(dense.b_out)
    layer.expert_neurons = _neuron_of(cells, layer.num_experts)
    return layer


def _neuron_of(cells: Tensor, n: int) -> list[int]:
    """Per expert id, the dense neuron it holds (-1: a pad expert)."""
    out = torch.full((n,), -1, dtype=torch.long)
    out[cells.cpu()] = torch.arange(cells.numel())
    return out.tolist()


def all_experts(layer: PEER, x: Tensor) -> Tensor:
    """``layer``'s output with every one of its N experts active at weight 1, evaluated
    straight from the expert tables (no retrieval): for a converted FFN, the dense FFN.
    x (..., H) → (..., H)."""
    act = get_activation(layer.activation).fn
    pre = x @ layer.down.t()  # (..., N)
    if layer.down_bias is not None:
        pre = pre + layer.down_bias
    h = act(x @ layer.gate.t()) * pre if layer.gate is not None else act(pre)
    y = h @ layer.up
    return y + layer.out_bias if layer.out_bias is not None else y


# ---- building ---------------------------------------------------------------------------------


def build_peer(dense, config: MoEConfig, generator: torch.Generator, stats=None) -> PEER:
    """The whole builder: carve, place the neurons and fit the retrieval (on ``stats``'
    calibration reservoir when given: 80% to fit, 10% to validate each refinement, 10% held
    out to measure), and record what was measured in ``layer.conversion`` (a
    ``ConversionRecord``). The fits run on the CPU in float32."""
    x = val = held = None
    if stats is not None and stats.inputs.shape[0] >= 16:
        x = stats.inputs.float()
        tenth = max(1, x.shape[0] // 10)
        # fit on 80%, validate the fit's choices on 10%, measure on the last 10%
        x, val, held = x[:-2 * tenth], x[-2 * tenth:-tenth], x[-tenth:]
    steps = config.peer_fit_steps
    if steps is None:
        steps = DEFAULT_FIT_STEPS if x is not None else 0
    if steps and x is None:
        raise ConversionError(f"peer_fit_steps={steps} fits keys and query on calibration "
                              "tokens: pass calibration_data, or peer_fit_steps=0")
    dense32 = _on_cpu(dense)
    work = carve(dense32, config)  # holds the retrieval while it is fitted
    cells = init_retrieval(work, dense32, x, generator)
    info = {}
    if held is not None:
        info["retrieval_recall_init"] = measure(work, dense32, held, cells)["retrieval_recall"]
    if x is not None:
        cells = _better(work, dense32, val, cells, reassign(work, dense32, x, cells))
    if steps:
        info.update(fit_retrieval(work, dense32, x, val, cells, steps, generator))
        cells = _better(work, dense32, val, cells, reassign(work, dense32, x, cells))
    layer = carve(dense, config, cells)
    with torch.no_grad():
        for name in ("keys_a", "keys_b"):
            getattr(layer, name).copy_(getattr(work, name))
        layer.query.load_state_dict(work.query.state_dict())
        layer.query_norm.load_state_dict(work.query_norm.state_dict())
    info.update({"grid": layer.grid, "heads": layer.heads, "top_k": layer.top_k,
                 "key_dim": layer.key_dim, "fit_steps": steps,
                 "active_fraction": layer.heads * layer.top_k / dense.ffn_size})
    if held is not None:
        info.update(measure(work, dense32, held, cells), calibration_tokens=stats.tokens,
                    held_out_tokens=held.shape[0])
    layer.conversion = ConversionRecord(measured=info)
    return layer


def _better(layer: PEER, dense, val: Tensor, cells: Tensor, new: Tensor) -> Tensor:
    """``new`` placement if it lowers the output error on the tokens ``val``, else ``cells``."""
    if measure(layer, dense, val, new)["rel_err"] < measure(layer, dense, val, cells)["rel_err"]:
        return new
    return cells


def _on_cpu(dense):
    """The FFN's weights as float32 CPU tensors (the fits run there)."""
    fields = ("w_in", "w_out", "w_gate", "b_in", "b_gate", "b_out")
    return replace(dense, **{f: None if getattr(dense, f) is None
                             else getattr(dense, f).detach().float().cpu() for f in fields})
