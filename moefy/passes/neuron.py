"""``method="neuron"``: building single-neuron layers, sparsifying the other projections of
their blocks, and spending the budget where it costs least.

    dense FFN ──build_neuron──▶ NeuronFFN (thresholds off: exactly the dense FFN)
    its block's other nn.Linear (attention q/k/v/o) ──SparsifyProjections──▶ SparseLinear
    selection "static" ──PruneStatic (moefy/passes/neuron_static.py)──▶ the dense FFN of the
        active share of its neurons, down refit by least squares
    a causal LM's head ──ReadHeadByRows──▶ DecodeLinear (dense, exact, read by rows at decode)
    calibration batches ──AllocateBudget──▶ per knob (one threshold each):
        a sample of its scores                   (share kept ρ ⇒ threshold: a quantile)
        its cost at ρ = 0.95 … 0.05              (the others dense): the mean over tokens of
                                                 (g · Δy)², Δy the change of the layer's
                                                 output, g the gradient there of a loss
                                                 sampled from the model itself — the Fisher
                                                 estimate of twice the output divergence
                                                 (one backward pass measures every layer)
      ⇒ greedy: lower, step by step, the knob whose next step costs the least divergence
        per weight saved, until the weights read per token are ``config.active`` of the
        total (TEAL's greedy allocation, per layer and per matrix, costed at the model's
        output instead of each block's)

A knob's share ρ is the mean share of its rows read per token on the calibration data; its
weights are those rows (e.g. the attention projection's whole (in × out) matrix, or a
NeuronFFN's gate and up for its input knob). A ``selection="sequence"`` FFN has one knob,
``keep``, the share of its neurons a sequence's set holds (what each decoded token reads of
its gate, up and down); its cost at each level is measured as it runs: each calibration
sequence's set picked from its first half, applied to the second.

``active`` counts the decoder layers' projection weights (the converted FFNs plus, unless
``ffn_only``, the projections beside them in each block); embeddings and the LM head are not
in it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from moefy.errors import ConversionError, first_line
from moefy.layers.neuron import DENSE, DecodeLinear, NeuronFFN, SparseLinear, only_set
from moefy.layers.record import ConversionRecord
from moefy.passes import trace
from moefy.passes.base import Pass, PassResult
from moefy.passes.build import DenseWeights
from moefy.passes.calibrate import token_mask
from moefy.passes.stages import Converted, Request, Statistics

_log = logging.getLogger("moefy.convert")
SAMPLE_TOKENS = 1024  # tokens per knob whose scores set the thresholds
FISHER_TOKENS = 512  # tokens on which each knob's cost is measured
LEVELS = tuple(round(1 - 0.05 * i, 2) for i in range(20))  # shares kept: 1.0, 0.95 … 0.05
STEP = 0.025  # the allocation moves in these steps (costs interpolated between LEVELS)


def check_neuron(name: str, dense: DenseWeights) -> None:
    """Raise (before anything changes) when single neurons of ``dense`` cannot be chosen."""
    if dense.indivisible is not None:
        raise ConversionError(f"{name}: {dense.indivisible}, so single neurons cannot be "
                              "chosen per token. Use method='upcycle', or leave it dense with "
                              "MoEConfig(skip=[...])")
    if not isinstance(dense.activation, str):
        raise ConversionError(
            f"{name}: its activation is a custom element-wise function, which the neuron "
            "kernels cannot compute; method='split' or 'upcycle' converts it, or leave it "
            "dense with MoEConfig(skip=[...])")


def build_neuron(dense: DenseWeights, selection: str, name: str) -> NeuronFFN:
    """A ``NeuronFFN`` holding ``dense``'s weights, every neuron kept (exactly the FFN)."""
    check_neuron(name, dense)
    bias = any(b is not None for b in (dense.b_in, dense.b_gate, dense.b_out))
    w = dense.w_in
    with torch.device("meta"):
        layer = NeuronFFN(dense.hidden_size, dense.ffn_size, dense.w_out.shape[0],
                          activation=dense.activation, gated=dense.w_gate is not None,
                          bias=bias, selection=selection, dtype=w.dtype)
    layer = layer.to_empty(device=w.device)
    with torch.no_grad():
        for t in [*layer.parameters(), *layer.buffers()]:
            t.zero_()
        for name in ("in_threshold", "h_threshold", "keep"):
            if hasattr(layer, name):
                getattr(layer, name).fill_(DENSE)
    return layer.load_dense(dense.w_in, dense.w_out, dense.w_gate, dense.b_in, dense.b_gate,
                            dense.b_out)


def _block_of(path: str) -> str:
    return path.rpartition(".")[0]


class SparsifyProjections(Pass):
    """method="neuron" without ``ffn_only``: every ``nn.Linear`` in a converted FFN's block
    (the FFN module's parent: a decoder layer; none when the parent is the model itself)
    outside the FFN becomes a ``SparseLinear`` (input-channel sparsity of the attention
    projections, TEAL's q/k/v/o)."""

    needs = (Converted,)

    def call(self, r: Request, converted: Converted) -> PassResult:
        if (r.config.method != "neuron" or r.config.ffn_only
                or r.config.selection == "static"):  # static: the FFNs only
            return PassResult(False)
        target = converted.target
        ffns = [p for p, m in target.named_modules() if isinstance(m, NeuronFFN)]
        # an FFN's parent is its block (a decoder layer); one hung on the model itself has
        # no block: the model's other projections (its head) are not beside it
        blocks = sorted({_block_of(p) for p in ffns if _block_of(p)})
        originals = dict(converted.originals)
        swapped = 0
        for block in blocks:
            host = target.get_submodule(block)
            inside = [p.removeprefix(block + ".") for p in ffns if _block_of(p) == block]
            for name, module in list(host.named_modules()):
                if type(module) is not nn.Linear or any(
                        name == f or name.startswith(f + ".") for f in inside):
                    continue
                path = f"{block}.{name}"
                if r.inplace:
                    originals.setdefault(path, module)
                sparse = SparseLinear.from_linear(module)
                sparse.conversion = ConversionRecord(name=path, method="neuron")
                target.set_submodule(path, sparse)
                swapped += 1
        if blocks and not swapped:
            _log.info("neuron: no nn.Linear beside the FFNs in their blocks; only the FFNs "
                      "are sparse")
        return PassResult(bool(swapped), {"projections": swapped},
                          Converted(target, originals))


class ReadHeadByRows(Pass):
    """method="neuron": a causal LM's head (``get_output_embeddings()``, an ``nn.Linear``)
    becomes a ``DecodeLinear`` over the same parameters: the same function, read at decode
    by moefy's row kernel. Every decoded token reads the head whole (it is not in the
    budget: 21% of SmolLM2-135M's bytes per token), and a batch-1 ``F.linear`` reads it at
    about half the memory's bandwidth."""

    needs = (Converted,)

    def call(self, r: Request, converted: Converted) -> PassResult:
        target = converted.target
        if r.config.method != "neuron" or not any(isinstance(m, NeuronFFN)
                                                   for m in target.modules()):
            return PassResult(False)
        heads = getattr(target, "get_output_embeddings", None)
        head = heads() if callable(heads) else None
        if type(head) is not nn.Linear:
            return PassResult(False)
        path = next(p for p, m in target.named_modules() if m is head)
        originals = dict(converted.originals)
        if r.inplace:
            originals.setdefault(path, head)
        target.set_submodule(path, DecodeLinear.from_linear(head))
        return PassResult(True, {"head": path}, Converted(target, originals))


@dataclass
class Knob:
    """One threshold: a layer's attribute, the weights it gates, its scores and costs."""

    path: str  # the layer's module path
    layer: nn.Module
    attr: str  # "threshold" | "in_threshold" | "h_threshold" | "keep" | "static"
    weights: int  # weight elements read per token when every row is kept
    samples: list = field(default_factory=list)  # captured inputs (tokens, width)
    sampled: int = 0
    scores: torch.Tensor | None = None  # sorted, float32
    errors: list = field(default_factory=list)  # the estimated divergence at each of LEVELS
    share: float = 1.0  # chosen share of rows read

    @property
    def name(self) -> str:
        return f"{self.path}.{self.attr}"

    def threshold(self, share: float) -> float:
        """The threshold that keeps ``share`` of the sampled scores (DENSE for 1); for a
        ``keep`` knob, the share itself."""
        if self.attr == "keep":
            return DENSE if share >= 1 - 1e-9 else share
        n = self.scores.numel()
        drop = int(round((1.0 - share) * n))
        if drop <= 0 or n == 0:
            return DENSE
        if drop >= n:
            return float(self.scores[-1])
        # halfway between the last dropped and the first kept score: a token that scores
        # exactly as a calibration token did is not on the edge (ONNX validation would
        # otherwise see float-error flips)
        low, high = float(self.scores[drop - 1]), float(self.scores[drop])
        return low + (high - low) / 2 if math.isfinite(high) else low

    def set(self, share: float) -> None:
        getattr(self.layer, self.attr).fill_(self.threshold(share))

    def error(self, share: float) -> float:
        """The estimated divergence at ``share``, interpolated between LEVELS."""
        levels = LEVELS
        if share >= levels[0]:
            return self.errors[0]
        for i in range(1, len(levels)):
            if share >= levels[i] - 1e-9:
                hi, lo = levels[i - 1], levels[i]
                w = (share - lo) / (hi - lo)
                return w * self.errors[i - 1] + (1 - w) * self.errors[i]
        # below the last level: extrapolate linearly towards the error with nothing kept
        return self.errors[-1] + (self.errors[-1] - self.errors[-2]) * (
            (levels[-1] - share) / (levels[-2] - levels[-1]))


def knobs_of(model: nn.Module) -> list[Knob]:
    """Every threshold of the model's neuron layers, in model order."""
    knobs = []
    for path, m in model.named_modules():
        if isinstance(m, SparseLinear):
            knobs.append(Knob(path, m, "threshold", m.in_features * m.out_features))
        elif isinstance(m, NeuronFFN) and m.selection == "static":
            continue  # no per-token choice: PruneStatic (neuron_static.py) picked them once
        elif isinstance(m, NeuronFFN) and m.selection == "sequence":
            knobs.append(Knob(path, m, "keep", m.w_in_t.numel() + m.w_out_t.numel()))
        elif isinstance(m, NeuronFFN):
            # selection "input": [gate; up] by x, down by h; "gate": the gate by x, then the
            # neurons' up and down rows
            second = m.w_out_t.numel() + (0 if m.w_up is None else m.w_up.numel())
            knobs.append(Knob(path, m, "in_threshold", m.w_in_t.numel()))
            knobs.append(Knob(path, m, "h_threshold", second))
    return knobs


def knob_weights(layer: nn.Module) -> dict[str, int]:
    """Per threshold of a neuron layer, the weight elements it gates (read per token when
    every row is kept). A static FFN counts the dense FFN it was cut from."""
    if isinstance(layer, NeuronFFN) and layer.selection == "static":
        share = float(layer.conversion.get("share_keep", 1.0))
        return {"static": round((layer.w_in_t.numel() + layer.w_out_t.numel()) / share)}
    return {k.attr: k.weights for k in knobs_of(layer)}


@torch.no_grad()
def kept_shares(layer: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Per threshold of ``layer`` (a ``NeuronFFN`` or ``SparseLinear``), the mean share of
    its rows that the tokens ``x`` (tokens, width) keep: what they read."""
    if isinstance(layer, SparseLinear):
        t = float(layer.threshold)
        return {"threshold": 1.0 if t < 0 else
                float((~(layer.scores(x) <= t)).float().mean())}
    if layer.selection == "static":  # every token reads the static set, of the dense FFN
        return {"static": float(layer.conversion.get("share_keep", 1.0))}
    if layer.selection == "sequence":  # what a decoded token reads: its sequence's set
        k = layer.kept_neurons()
        return {"keep": 1.0 if k is None else k / layer.ffn_size}
    t_in, t_h = float(layer.in_threshold), float(layer.h_threshold)
    scores_in = x.float().abs() * layer.in_scale
    out = {"in_threshold": 1.0 if t_in < 0 else float((~(scores_in <= t_in)).float().mean())}
    if t_h < 0:
        out["h_threshold"] = 1.0
    else:
        h = layer.hidden(x.to(layer.w_in_t.dtype)).float()
        out["h_threshold"] = float((~(h.abs() * layer.h_scale <= t_h)).float().mean())
    return out


def _rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    rows = x.detach().reshape(-1, x.shape[-1])
    if mask is not None and mask.numel() == rows.shape[0]:
        rows = rows[mask.to(rows.device)]
    return rows.float().cpu()


class AllocateBudget(Pass):
    """method="neuron": thresholds for every knob so that the model reads ``config.active``
    of its projection weights per token, spent where the calibration data says it costs
    least (see the module docstring). With ``active`` 1 nothing changes."""

    needs = (Statistics, Converted)

    def call(self, r: Request, stats: Statistics, converted: Converted) -> PassResult:
        config = r.config
        if config.method != "neuron":
            return PassResult(False)
        model = converted.target
        knobs = knobs_of(model)
        active = 1.0 if config.active is None else config.active
        if active >= 1.0 or not knobs:
            return PassResult(False, {"knobs": len(knobs)})
        if r.calibration_data is None:
            raise ConversionError(f"method='neuron' with active={active} calibrates its "
                                  "thresholds on data: pass calibration_data")
        # the batches Calibrate kept for distillation (config.minutes), else the stream
        kept = sample_inputs(r, model, knobs, stats.batches or r.calibration_data)
        with torch.no_grad():
            for k in knobs:
                if k.attr == "h_threshold" and k.layer.selection == "gate":
                    _set_coefficients(k)
            for k in knobs:
                k.scores = None if k.attr == "keep" else _scores(k)
        sites = _sensitivities(r, model, knobs, kept)
        with torch.no_grad():
            for k in knobs:
                k.errors = (_sequence_costs(k, sites[k.layer][2]) if k.attr == "keep" else
                            _costs(k, *sites[k.layer][:2]))
        total = sum(k.weights for k in knobs)
        allocate(knobs, active * total)
        read = sum(k.weights * k.share for k in knobs)
        with torch.no_grad():
            for k in knobs:
                k.set(k.share)
        for layer, mine in _layers_to_knobs(knobs).items():
            if isinstance(layer, NeuronFFN):
                layer.forget()  # a set picked from calibration text is not the caller's
            short = {k.attr: {"h_threshold": "h", "keep": "keep"}.get(k.attr, "in")
                     for k in mine}
            layer.conversion = ConversionRecord.of(layer.conversion).with_(
                name=layer.conversion.get("name", mine[0].path), method="neuron",
                **{f"share_{short[k.attr]}": round(k.share, 4) for k in mine},
                **{f"cost_{short[k.attr]}": float(k.error(k.share)) for k in mine},
                calibration_tokens=max(k.sampled for k in mine))
        _log.info("neuron: %d knobs; %.1f%% of %.3gM projection weights read per token "
                  "(asked %.1f%%), estimated divergence %.3g", len(knobs), 100 * read / total,
                  total / 1e6, 100 * active, sum(k.error(k.share) for k in knobs))
        return PassResult(True, {"knobs": len(knobs), "share_read": round(read / total, 4)})


def _call(r: Request, model: nn.Module, batch, index: int):
    args, kwargs = trace.batch_inputs(model, batch, f"calibration batch {index}",
                                      ConversionError)
    try:
        return model(*args, **kwargs), token_mask(kwargs)
    except Exception as exc:
        raise ConversionError(f"calibration batch {index} does not fit the model: "
                              f"{type(exc).__name__}: {first_line(exc)}") from exc


def sample_inputs(r: Request, model: nn.Module, knobs: list[Knob], data,
                   tokens: int = SAMPLE_TOKENS) -> list:
    """Run calibration batches through ``model`` (thresholds off) until every knob has seen
    ``tokens`` real tokens, keeping those inputs; returns the batches read."""
    mask = [None]
    hooks = []

    def take_input(layer_knobs):
        def hook(module, args):
            rows = _rows(args[0], mask[0])
            for k in layer_knobs:
                room = tokens - k.sampled
                if room > 0:
                    k.samples.append(rows[:room])
                    k.sampled += min(room, rows.shape[0])
        return hook

    for layer, mine in _layers_to_knobs(knobs).items():
        hooks.append(layer.register_forward_pre_hook(take_input(mine)))
    kept = []
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # the scores of the model as it will run, not of dropout's noise
    try:
        with torch.no_grad():
            for batch in data:
                args, kwargs = trace.batch_inputs(model, batch, f"calibration batch "
                                                  f"{len(kept)}", ConversionError)
                mask[0] = token_mask(kwargs)
                _call(r, model, batch, len(kept))
                kept.append(batch)
                if all(k.sampled >= tokens for k in knobs):
                    break
    finally:
        for h in hooks:
            h.remove()
        for m, training in modes:
            m.training = training
    if not kept:
        raise ConversionError("calibration_data yielded no batches")
    for k in knobs:
        if not k.sampled:
            raise ConversionError(f"calibration_data gave no token to {k.path} (every token "
                                  "padding?)")
    return kept


def _sensitivities(r: Request, model: nn.Module, knobs: list[Knob], batches: list
                   ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor, list]]:
    """Per neuron layer, (inputs x, gradients g of a sampled loss at its output, and the
    same per call in the call's shape) on the first FISHER_TOKENS tokens of ``batches``:
    ``(g · Δy)²`` then estimates twice the divergence a change Δy of the layer's output
    causes (the Fisher information, from one backward pass).

    A causal LM's loss is the negative log-likelihood of next tokens *sampled from the model
    itself* (so that the gradient's outer product is the Fisher of its output distribution);
    any other model's is ``⟨output, r⟩`` with r standard normal (then ``E (g·Δy)²`` is the
    squared change of the output). The weights are frozen meanwhile: only activations need
    gradients."""
    layers = _layers_to_knobs(knobs)
    calls: dict[nn.Module, list] = {layer: [] for layer in layers}
    generator = torch.Generator().manual_seed(r.config.seed)
    hooks = []

    def pre(module, args):
        x = args[0]
        if not x.requires_grad:  # the first layer of the chain: a leaf that now needs grad
            x = x.detach().requires_grad_()
            return (x, *args[1:])

    def post_for(layer):
        def post(module, args, out):
            entry = [args[0].detach(), None]
            calls[layer].append(entry)
            if out.requires_grad:
                out.register_hook(lambda g: entry.__setitem__(1, g.detach()))
        return post

    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    for layer in layers:
        hooks.append(layer.register_forward_pre_hook(pre))
        hooks.append(layer.register_forward_hook(post_for(layer)))
    tokens = 0
    modes = [(m, m.training) for m in model.modules()]
    model.eval()  # dropout would make the gradients noise
    try:
        with torch.enable_grad():
            for i, batch in enumerate(batches):
                out, mask = _call(r, model, batch, i)
                loss = _sampled_loss(out, mask, generator)
                if loss is not None and loss.requires_grad:
                    loss.backward()
                tokens += next(iter(calls.values()))[-1][0].shape[:-1].numel() if calls else 0
                if tokens >= FISHER_TOKENS:
                    break
    finally:
        for h in hooks:
            h.remove()
        for p in frozen:
            p.requires_grad_(True)
        for m, training in modes:
            m.training = training
    out = {}
    for layer, entries in calls.items():
        xs = [x.reshape(-1, x.shape[-1]) for x, g in entries]
        gs = [(torch.zeros(*x.shape[:-1], _width(layer), dtype=x.dtype) if g is None else g)
              .reshape(-1, _width(layer)) for x, g in entries]
        x, g = torch.cat(xs)[:FISHER_TOKENS], torch.cat(gs)[:FISHER_TOKENS]
        out[layer] = (x, g.float(), entries)
    if all(float(g.abs().sum()) == 0 for _, g, _ in out.values()):
        raise ConversionError("method='neuron': no gradient reached the converted layers "
                              "from the model's output on the calibration data, so their "
                              "effect on it cannot be measured")
    return out


def _width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, SparseLinear) else layer.output_size


def _sampled_loss(out, mask: torch.Tensor | None, generator: torch.Generator):
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        flat = logits.reshape(-1, logits.shape[-1]).float()
        with torch.no_grad():
            labels = torch.multinomial(flat.softmax(-1).cpu(), 1, generator=generator)
        nll = torch.nn.functional.cross_entropy(flat, labels.view(-1).to(flat.device),
                                                reduction="none")
        if mask is not None and mask.numel() == nll.numel():
            nll = nll * mask.to(nll.device)
        return nll.sum()
    first = out if isinstance(out, torch.Tensor) else next(
        (t for t in (out.values() if isinstance(out, dict) else out)
         if isinstance(t, torch.Tensor) and t.is_floating_point()), None)
    if first is None:
        return None
    noise = torch.randn(first.shape, generator=generator).to(first.device, first.dtype)
    return (first * noise).sum()


def _costs(k: Knob, x: torch.Tensor, g: torch.Tensor) -> list[float]:
    """The knob's estimated divergence at each of LEVELS (the others dense): the mean over
    tokens of (g · Δy)², Δy the change of the layer's output."""
    layer = k.layer
    x = x.to(layer.w_in_t.device if isinstance(layer, NeuronFFN) else layer.weight_t.device)
    base = layer(x).float()
    costs = [0.0]
    for share in LEVELS[1:]:
        k.set(share)
        delta = layer(x).float() - base
        costs.append(float(((delta * g.to(delta.device)).sum(-1)).square().mean()))
    k.set(1.0)
    # more kept never costs more: a noisy bump would stall the greedy search
    for i in range(len(costs) - 2, -1, -1):
        costs[i] = min(costs[i], costs[i + 1])
    return [c if math.isfinite(c) else math.inf for c in costs]


def _sequence_costs(k: Knob, entries: list) -> list[float]:
    """A ``keep`` knob's estimated divergence at each of LEVELS, as the layer decodes: each
    calibration sequence's set picked from its first half (the prompt) and applied to its
    second half, the mean over those tokens of (g · Δy)²."""
    layer = k.layer
    parts = []
    for x, g in entries:
        if g is None or x.dim() < 2 or x.shape[-2] < 2:
            continue
        S = x.shape[-2]
        x3 = x.reshape(-1, S, x.shape[-1])
        half = S // 2
        parts.append((layer.hidden(x3[:, :half]), layer.hidden(x3[:, half:]),
                      g.reshape(x3.shape[0], S, -1)[:, half:].float()))
    if not parts:
        raise ConversionError(f"{k.path}: selection='sequence' picks each sequence's neurons "
                              "from its prompt, so its cost is measured on calibration "
                              "sequences of at least 2 tokens; these had none")
    costs = [0.0]
    for share in LEVELS[1:]:
        k.set(share)
        n = layer.kept_neurons()
        total = count = 0.0
        for prompt, rest, g in parts:
            chosen = layer.pick(prompt, n)  # (rows, n)
            # sparse − dense output: minus what the neurons outside the set contribute
            delta = ((only_set(rest, chosen) - rest) @ layer.w_out_t).float()
            total += float((delta * g).sum(-1).square().sum())
            count += delta.shape[0] * delta.shape[1]
        costs.append(total / count)
    k.set(1.0)
    for i in range(len(costs) - 2, -1, -1):
        costs[i] = min(costs[i], costs[i + 1])
    return [c if math.isfinite(c) else math.inf for c in costs]


def _layers_to_knobs(knobs: list[Knob]) -> dict[nn.Module, list[Knob]]:
    out: dict[nn.Module, list[Knob]] = {}
    for k in knobs:
        out.setdefault(k.layer, []).append(k)
    return out


def knob_inputs(k: Knob) -> torch.Tensor:
    return torch.cat(k.samples) if k.samples else torch.empty(0)


def _set_coefficients(k: Knob) -> None:
    """Selection "gate": c_i = mean |u_i| (the up projection on the sampled inputs) times
    ‖W_down[:, i]‖; ungated, c_i = ‖W_down[:, i]‖."""
    layer = k.layer
    norms = layer.w_out_t.detach().float().norm(dim=1)
    if layer.w_up is not None:
        x = knob_inputs(k).to(layer.w_up.device, layer.w_up.dtype)
        u = torch.nn.functional.linear(x, layer.w_up, layer.b_up).float()
        norms = norms * u.abs().mean(0).cpu().to(norms.device)
    layer.h_scale.copy_(norms)


def _scores(k: Knob) -> torch.Tensor:
    """Every sampled (token, row) score of the knob, sorted."""
    layer, x = k.layer, knob_inputs(k)
    if isinstance(layer, SparseLinear):
        s = layer.scores(x.to(layer.scale.device))
    elif k.attr == "in_threshold":
        s = x.to(layer.in_scale.device).abs() * layer.in_scale
    else:
        h = layer.hidden(x.to(layer.w_in_t.device, layer.w_in_t.dtype))
        s = h.float().abs() * layer.h_scale
    s = s.reshape(-1).cpu()
    s = torch.where(torch.isnan(s), torch.full_like(s, math.inf), s)  # NaN: always kept
    return s.sort().values


def allocate(knobs: list[Knob], budget: float) -> None:
    """Greedy: from everything kept, lower the knob whose next STEP costs the least
    estimated divergence per weight saved until the weights read fit ``budget``."""
    read = float(sum(k.weights for k in knobs))
    for k in knobs:
        k.share = 1.0
    floor = STEP
    while read > budget:
        best, best_cost = None, math.inf
        for k in knobs:
            if k.share - STEP < floor - 1e-9:
                continue
            cost = (k.error(k.share - STEP) - k.error(k.share)) / (k.weights * STEP)
            if cost < best_cost:
                best, best_cost = k, cost
        if best is None:
            break
        best.share = round(best.share - STEP, 6)
        read -= best.weights * STEP
