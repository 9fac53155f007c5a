"""Fitting PEER's retrieval to a dense FFN (the carving is ``moefy.passes.peer``):

    calibration inputs x (or the weights alone), dense FFN  ⇒  grid placement of the neurons,
        keys, query (Linear + BatchNorm in eval mode) such that each token's top-k keys are its
        top-k neurons by importance_i(x) = |h_i(x)|·‖v_i‖
    init_retrieval (steps 1–3, closed form) → reassign (step 5) → fit_retrieval (step 4, Adam)
        → reassign; measure scores each against the dense FFN

Measured on all-MiniLM-L6-v2 by ``examples/peer_quality.py``. Why it is fitted this way:

1. A linear proxy of each neuron's importance: a score m_i·[x; 1] that ranks neurons like
   importance_i(x) does. From calibration tokens it is the least-squares regression of the
   importance on [x; 1]; without data it is read off the weights (‖v_i‖·[u_i; b_i], for a
   gated neuron ‖u_i‖·‖v_i‖·[g_i; 0]: what decides that a neuron fires).
2. Product keys can only score expert (a, b) as α_a(x) + β_b(x): one function per grid row
   plus one per column. With queries linear in x, the best the layer can do is an additive
   model m_i ≈ r_a(i) + c_b(i). So the neurons are placed on the grid (a bijection onto
   cells) and r, c are fitted by alternating least squares, both in the metric of the
   calibration inputs (the score error E[((m_i − r_a − c_b)·[x; 1])²], i.e. whitened by the
   inputs' second moment): rows by balanced k-means, then coordinate descent that moves each
   neuron within its column to a better row and within its row to a better column.
3. The row functions r_a are one matrix R (n1, H+1) = keys_a · P_a (its SVD; exact when
   d/2 ≥ n1), likewise the columns; P becomes the query's Linear weight and the constant
   term the BatchNorm's shift, around running statistics measured on the calibration
   tokens (BatchNorm in eval mode then computes exactly P·x + c).
4. With calibration data, Adam refines keys, query and BatchNorm affine on the exhaustive
   (tokens, N) key scores (cheap at N ≈ d_ff): the loss is the relative error of the dense
   FFN's output when each neuron counts σ(16·(s_i − s_(k)) / std(s)) times, a soft top-k, so
   the fit spends its effort where it changes the output (a near-tie swapped costs little, a
   strong neuron missed costs its output). Held-back calibration tokens decide whether the
   refined retrieval replaces the initial one. On all-MiniLM-L6-v2 the initial retrieval
   does most of the work; the refinement lowers the output error of some layers by up to a
   fifth and is rejected on others.
5. Which cells a token retrieves depends only on keys and query, not on which neuron sits
   in which cell: so once they are set, the neurons are re-placed by an assignment that
   maximises the output energy the retrieved cells keep on the calibration tokens (after
   step 3 and after step 4; each kept only if validation tokens confirm it).

Several heads share the keys; each head owns a block of grid rows (the other rows get a
large negative row score in its query), so heads never retrieve the same neuron: with
weight 1 per neuron (score "none", as a dense FFN weights them) a duplicate would count
twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moefy.activations import get_activation
from moefy.layers.peer import PEER

_BATCH = 512  # tokens per Adam step (512 x 200 steps fitted as well as 1024 x 300)
_SHARPNESS = 16.0  # the soft top-k σ(sharpness·(s − s_(k))/std(s)): 16 beat 2, 4 and 8
_PLACEMENT_SWEEPS = 6  # coordinate-descent sweeps of the grid placement
_BLOCKED = 1e3  # a head's score offset for rows it does not own, in units of the score scale

Tensor = torch.Tensor


# ---- the dense FFN's neuron importance ---------------------------------------------------------


def hidden(dense, x: Tensor) -> Tensor:
    """The dense FFN's hidden activation h (T, d_ff) on rows x (T, H), float32."""
    act = get_activation(dense.activation).fn
    w_in = dense.w_in.float()
    pre = x @ w_in.t()
    if dense.b_in is not None:
        pre = pre + dense.b_in.float()
    if dense.w_gate is None:
        return act(pre)
    g = x @ dense.w_gate.float().t()
    if dense.b_gate is not None:
        g = g + dense.b_gate.float()
    return act(g) * pre


def importance(dense, x: Tensor) -> Tensor:
    """(T, d_ff): |h_i(x)|·‖v_i‖, what neuron i adds to the token's output (its norm)."""
    return hidden(dense, x).abs() * dense.w_out.float().norm(dim=0)


# ---- fitting the retrieval ---------------------------------------------------------------------


def _row_blocks(n1: int, heads: int) -> list[range]:
    """Head h's grid rows: ``heads`` contiguous blocks, the first n1 % heads one row longer."""
    size, extra = divmod(n1, heads)
    out, start = [], 0
    for h in range(heads):
        stop = start + size + (h < extra)
        out.append(range(start, stop))
        start = stop
    return out


def _proxy(dense, x: Tensor | None) -> Tensor:
    """(d_ff, H+1): per neuron, a linear score m_i·[x; 1] that ranks neurons like their
    importance. Least squares on the calibration tokens, else read off the weights."""
    if x is not None:
        xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        gram = xa.t() @ xa
        gram.diagonal().add_(1e-4 * gram.diagonal().mean())
        return torch.linalg.solve(gram, xa.t() @ importance(dense, x)).t()
    v = dense.w_out.float().norm(dim=0)[:, None]
    if dense.w_gate is None:
        b = dense.b_in.float() if dense.b_in is not None else dense.w_in.new_zeros(
            dense.ffn_size).float()
        return torch.cat([dense.w_in.float(), b[:, None]], dim=1) * v
    scale = v * dense.w_in.float().norm(dim=1)[:, None]
    g = dense.w_gate.float()
    return torch.cat([g, g.new_zeros(g.shape[0], 1)], dim=1) * scale


def _assign(cost: Tensor, room: Tensor) -> Tensor:
    """Each row of ``cost`` (n, g) to a column, at most ``room[j]`` rows per column, greedily
    minimising the total cost: in rounds, every unplaced row bids for its cheapest column
    with room and each column takes its cheapest bids."""
    n, g = cost.shape
    out = torch.full((n,), -1, dtype=torch.long)
    room = room.clone()
    todo = torch.arange(n)
    while todo.numel():
        open_ = (room > 0).nonzero().squeeze(1)
        sub = cost[todo][:, open_]
        best, pick = sub.min(dim=1)
        want = open_[pick]
        order = torch.argsort(best, stable=True)
        want_sorted = want[order]
        # rank of each bid among the bids for the same column, cheapest first
        by_col = torch.argsort(want_sorted, stable=True)
        sorted_cols = want_sorted[by_col]
        starts = torch.searchsorted(sorted_cols, sorted_cols, right=False)
        rank = torch.empty_like(by_col)
        rank[by_col] = torch.arange(by_col.numel()) - starts
        win = rank < room[want_sorted]
        winners = order[win]
        out[todo[winners]] = want[winners]
        room -= torch.bincount(want[winners], minlength=g)
        keep = torch.ones(todo.numel(), dtype=torch.bool)
        keep[winners] = False
        todo = todo[keep]
    return out


def _additive(m: Tensor, w: Tensor, rows: Tensor, cols: Tensor, n1: int, n2: int,
              sweeps: int = 4) -> tuple[Tensor, Tensor]:
    """Weighted least-squares r (n1, D), c (n2, D) with m_i ≈ r[rows[i]] + c[cols[i]], neuron
    i weighing w[i] (alternating weighted means, as one-hot GEMMs: tiny index ops crawl
    when the cores are shared; an empty row or column gets zeros)."""
    one_r = F.one_hot(rows, n1).to(m.dtype).t() * w  # (n1, n), weighted
    one_c = F.one_hot(cols, n2).to(m.dtype).t() * w
    mass_r = one_r.sum(1, keepdim=True).clamp_min(1e-12)
    mass_c = one_c.sum(1, keepdim=True).clamp_min(1e-12)
    c = m.new_zeros(n2, m.shape[1])
    for _ in range(sweeps):
        r = one_r @ (m - c[cols]) / mass_r
        c = one_c @ (m - r[rows]) / mass_c
    return r, c


def _place(m: Tensor, w: Tensor, n1: int, n2: int, generator: torch.Generator
           ) -> tuple[Tensor, Tensor]:
    """Grid placement (rows, cols) of the neurons (rows of m, whitened; weights w), one per
    cell, that makes m_i ≈ r_a + c_b accurate: balanced k-means rows, then coordinate
    descent."""
    n = m.shape[0]
    # rows: balanced k-means (capacity n2 per row) from random neurons as centres
    centres = m[torch.randperm(n, generator=generator)[:n1]].clone()
    room = torch.full((n1,), n2)
    for _ in range(8):
        rows = _assign(torch.cdist(m, centres).square() * w[:, None], room)
        one = F.one_hot(rows, n1).to(m.dtype).t() * w  # (n1, n)
        centres = one @ m / one.sum(1, keepdim=True).clamp_min(1e-12)
    # columns: k-means of what the rows leave, then each row's neurons on distinct columns
    resid = m - centres[rows]
    cc = resid[torch.randperm(n, generator=generator)[:n2]].clone()
    for _ in range(8):
        lab = torch.cdist(resid, cc).argmin(1)
        sums = resid.new_zeros(n2, m.shape[1]).index_add_(0, lab, resid)
        cnt = torch.bincount(lab, minlength=n2)
        cc = torch.where(cnt[:, None] > 0, sums / cnt.clamp_min(1)[:, None].to(m.dtype), cc)
    cols = _within(rows, resid, w, resid.new_zeros(n1, m.shape[1]), cc)
    for _ in range(_PLACEMENT_SWEEPS):
        r, c = _additive(m, w, rows, cols, n1, n2)
        # move each neuron to a better row within its column (rows distinct per column)
        rows = _within(cols, m, w, c, r)
        r, c = _additive(m, w, rows, cols, n1, n2)
        cols = _within(rows, m, w, r, c)
    return rows, cols


def _within(group: Tensor, points: Tensor, w: Tensor, offsets: Tensor, slots: Tensor
            ) -> Tensor:
    """For each group g, its members (``group == g``) onto distinct slots s, by the cost
    w[i]·‖points[i] − offsets[g] − slots[s]‖²."""
    out = torch.empty_like(group)
    ones = torch.ones(slots.shape[0], dtype=torch.long)
    for g in range(offsets.shape[0]):
        idx = (group == g).nonzero().squeeze(1)
        if idx.numel():
            cost = torch.cdist(points[idx] - offsets[g], slots).square() * w[idx, None]
            out[idx] = _assign(cost, ones)
    return out


def _factor(scores: Tensor, half: int) -> tuple[Tensor, Tensor]:
    """scores (n, F) ≈ keys (n, half) @ proj (half, F): truncated SVD, the singular values
    split evenly between the two factors (exact when half ≥ rank)."""
    u, s, vh = torch.linalg.svd(scores, full_matrices=False)
    r = min(half, s.numel())
    root = s[:r].sqrt()
    keys = scores.new_zeros(scores.shape[0], half)
    proj = scores.new_zeros(half, scores.shape[1])
    keys[:, :r] = u[:, :r] * root
    proj[:r] = root[:, None] * vh[:r]
    return keys, proj


@torch.no_grad()
def init_retrieval(layer: PEER, dense, x: Tensor | None, generator: torch.Generator
                   ) -> Tensor:
    """Place the neurons on the grid and set keys and query from the additive model of
    their linear importance proxy (module docstring, steps 1–3). Returns the cell of each
    neuron (d_ff,)."""
    n1, n2 = layer.grid
    heads, half, hid = layer.heads, layer.key_dim // 2, layer.hidden_size
    m = _proxy(dense, x)  # (d_ff, H+1)
    if x is not None:  # the calibration inputs' metric: E[(δ·[x; 1])²] = ‖δ L‖²
        xa = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        second = xa.t() @ xa / x.shape[0]
        second.diagonal().add_(1e-4 * second.diagonal().mean())
        chol = torch.linalg.cholesky(second)
    else:
        chol = torch.eye(hid + 1)
    # all neurons weigh the same (weighting each by how often it is among a token's top-k
    # did not help on all-MiniLM-L6-v2)
    w = torch.ones(dense.ffn_size)
    rows, cols = _place(m @ chol, w, n1, n2, generator)
    r, c = _additive(m @ chol, w, rows, cols, n1, n2, sweeps=8)
    r = torch.linalg.solve_triangular(chol, r, upper=False, left=False)  # back to [x; 1]
    c = torch.linalg.solve_triangular(chol, c, upper=False, left=False)
    # per head: its own rows' functions; the others pushed far below any own score
    scale = (m @ chol).norm(dim=1).max().clamp_min(1e-6)
    blocked = torch.zeros(hid + 1)
    blocked[-1] = -_BLOCKED * scale
    per_head = []
    for block in _row_blocks(n1, heads):
        rh = blocked.expand(n1, -1).clone()
        rh[block.start:block.stop] = r[block.start:block.stop]
        per_head.append(rh)
    keys_a, proj_a = _factor(torch.cat(per_head, dim=1), half)  # (n1, half), (half, h(H+1))
    keys_b, proj_b = _factor(c.repeat(1, heads), half)
    weight = torch.empty(heads, layer.key_dim, hid + 1)
    weight[:, :half] = proj_a.view(half, heads, hid + 1).transpose(0, 1)
    weight[:, half:] = proj_b.view(half, heads, hid + 1).transpose(0, 1)
    weight = weight.reshape(heads * layer.key_dim, hid + 1)
    dtype, device = layer.down.dtype, layer.down.device
    layer.keys_a.copy_(keys_a)
    layer.keys_b.copy_(keys_b)
    layer.query.weight.copy_(weight[:, :hid])
    bn = layer.query_norm
    if x is not None:  # BatchNorm around the calibration statistics of the query's output
        z = x @ weight[:, :hid].t()
        mean, var = z.mean(0), z.var(0)
    else:
        mean, var = torch.zeros(weight.shape[0]), torch.ones(weight.shape[0])
    # eval: (z − mean)/√(var + eps)·γ + β  ==  z + const  with these γ, β
    bn.running_mean.copy_(mean)
    bn.running_var.copy_(var)
    bn.weight.copy_((var + bn.eps).sqrt())
    bn.bias.copy_(mean + weight[:, hid])
    bn.num_batches_tracked.fill_(1)
    layer.to(dtype=dtype, device=device)
    return rows * n2 + cols


@torch.no_grad()
def reassign(layer: PEER, dense, x: Tensor, cells: Tensor, chunk: int = 2048,
             tokens: int = 8192) -> Tensor:
    """The neurons' best cells for the layer's retrieval as it stands (module docstring,
    step 5): which cells a token retrieves depends only on the keys and query, not on which
    neuron sits where, so moving the neurons is an assignment problem. Neuron i placed at
    cell c gains Σ_t [c retrieved for t]·importance_i(t)² (the output energy it then keeps),
    summed over (the first ``tokens`` of) ``x``; pairwise swaps (a pad is an empty neuron)
    raise the total from the current placement."""
    x = x[:tokens]
    gain = x.new_zeros(dense.ffn_size, layer.num_experts)
    k = layer.top_k
    for i in range(0, x.shape[0], chunk):
        xb = x[i:i + chunk]
        s = layer.key_scores(xb)  # (B, heads, N)
        got = torch.zeros_like(s).scatter_(-1, s.topk(k, dim=-1).indices, 1.0).amax(1)
        gain += importance(dense, xb).square().t() @ got  # (d_ff, N)
    return _swaps(gain, cells)


def _swaps(gain: Tensor, cells: Tensor, rounds: int = 200) -> Tensor:
    """Improve the placement ``cells`` (n,) under ``gain`` (n, N) by swapping the cells of
    pairs of neurons (pads: zero-gain neurons) while a swap raises the total; each round
    applies the swaps that are each other's best."""
    n, cells_n = gain.shape
    full = torch.cat([gain, gain.new_zeros(cells_n - n, cells_n)])  # (N, N), pads appended
    taken = torch.zeros(cells_n, dtype=torch.bool)
    taken[cells] = True
    cur = torch.cat([cells, (~taken).nonzero().squeeze(1)])  # a permutation of the cells
    idx = torch.arange(cells_n)
    for _ in range(rounds):
        here = full[idx, cur]  # (N,)
        swap = full[:, cur]  # swap[i, j]: i's gain at j's cell
        delta = swap + swap.t() - here[:, None] - here[None, :]
        best, partner = delta.max(dim=1)
        mutual = (partner[partner] == idx) & (best > 1e-9 * here.abs().sum()) & (partner > idx)
        if not mutual.any():
            break
        i = mutual.nonzero().squeeze(1)
        j = partner[i]
        cur[i], cur[j] = cur[j].clone(), cur[i].clone()
    return cur[:n]


@torch.enable_grad()
def fit_retrieval(layer: PEER, dense, x: Tensor, val: Tensor, cells: Tensor, steps: int,
                  generator: torch.Generator, lr: float = 0.01) -> dict:
    """Adam on keys, query and BatchNorm affine (module docstring, step 4) on mini-batches
    of ``x`` (float32; ``layer`` a float32 CPU layer, in eval mode throughout). The loss is
    the relative error of the dense FFN's output summed over a soft top-k: neuron i counts
    σ(16·(s_i − s_(k)) / std(s)) times. Each tensor's step size is ``lr`` times its RMS (keys
    and query come in the importance's units). If the fit does not lower the hard top-k
    error on the tokens ``val``, the initial retrieval is kept. Returns the validation
    errors before and after."""
    params = [layer.keys_a, layer.keys_b, layer.query.weight, layer.query_norm.weight,
              layer.query_norm.bias]
    before = measure(layer, dense, val, cells)["rel_err"]
    start = {k: v.clone() for k, v in layer.state_dict().items()}
    saved = [(p, p.requires_grad) for p in layer.parameters()]
    mode = layer.training
    layer.eval()
    fitted = {id(p) for p in params}
    for p in layer.parameters():
        p.requires_grad_(id(p) in fitted)
    opt = torch.optim.Adam([{"params": [p], "lr": lr * float(p.detach().square().mean().sqrt())}
                            for p in params])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(steps, 1))
    w_out = dense.w_out.new_zeros(dense.hidden_size, layer.num_experts)
    w_out[:, cells] = dense.w_out  # (H, N): the output column of the neuron in each cell
    k = layer.top_k
    try:
        for _ in range(steps):
            idx = torch.randint(0, x.shape[0], (min(_BATCH, x.shape[0]),), generator=generator)
            xb = x[idx]
            with torch.no_grad():
                h = xb.new_zeros(xb.shape[0], layer.num_experts)
                h[:, cells] = hidden(dense, xb)  # (B, N), pads 0
                y_dense = h @ w_out.t()
            s = layer.key_scores(xb)  # (B, heads, N)
            kth = s.topk(min(k + 1, s.shape[-1]), dim=-1).values[..., k - 1:].mean(
                -1, keepdim=True)  # between the k-th and (k+1)-th score
            spread = s.std(-1, keepdim=True).clamp_min(1e-6).detach()
            soft = torch.sigmoid((s - kth) / spread * _SHARPNESS).sum(1)  # (B, N), heads summed
            y = (h * soft) @ w_out.t()
            loss = (y - y_dense).square().sum() / y_dense.square().sum().clamp_min(1e-12)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
        layer.train(mode)
    after = measure(layer, dense, val, cells)["rel_err"]
    if not after < before:
        layer.load_state_dict(start)
    return {"fit_val_rel_err_before": before, "fit_val_rel_err_after": after,
            "fit_kept": after < before}


@torch.no_grad()
def measure(layer: PEER, dense, x: Tensor, cells: Tensor) -> dict:
    """On tokens x: recall (share of each token's top-(heads·top_k) neurons by importance
    that the layer retrieves), the share of retrieved slots that repeat a neuron, and the
    relative error of the layer's output against the dense FFN's, ‖y_peer − y_dense‖ /
    ‖y_dense‖ (output bias included, as the split's fits measure it)."""
    mode = layer.training
    layer.eval()
    ids = layer.route(x.to(layer.down.dtype)).ids.flatten(1).cpu()  # (T, heads·k)
    layer.train(mode)
    imp = importance(dense, x)
    t, d_ff = imp.shape
    neuron_at = torch.full((layer.num_experts,), d_ff, dtype=torch.long)  # d_ff: a pad
    neuron_at[cells.cpu()] = torch.arange(d_ff)
    got = neuron_at[ids]
    counts = torch.zeros(t, d_ff + 1).scatter_add_(1, got, torch.ones_like(got, dtype=torch.float))
    counts = counts[:, :d_ff]
    k = min(ids.shape[1], d_ff)
    true = imp.topk(k, dim=1).indices
    recall = float((counts.gather(1, true) > 0).float().mean())
    h = hidden(dense, x)
    w_out = dense.w_out.float()
    b_out = 0 if dense.b_out is None else dense.b_out.float()
    y_dense = h @ w_out.t() + b_out
    y_peer = (h * counts) @ w_out.t() + b_out
    rel = float((y_peer - y_dense).norm() / y_dense.norm().clamp_min(1e-12))
    dup = float((counts > 1).sum() / max(ids.numel(), 1))
    return {"retrieval_recall": recall, "rel_err": rel, "duplicate_share": dup}
