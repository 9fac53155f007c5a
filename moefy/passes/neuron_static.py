"""``method="neuron", selection="static"``: one neuron set per FFN for every token, picked
on calibration data, with down refit so that the kept neurons stand in for the dropped.

    calibration batches ──PruneStatic──▶ per FFN: h on up to STATIC_TOKENS tokens
        ⇒ neurons ranked by Var(h_i)·‖W_down[:, i]‖² ⇒ the first ``active`` share kept
        ⇒ down and its bias: ridge least squares of the dense FFN's output on the kept h
        ⇒ a smaller NeuronFFN(selection="static"): a dense FFN, no per-token choice
"""

from __future__ import annotations

import logging

import torch

from moefy.errors import ConversionError
from moefy.layers.neuron import NeuronFFN
from moefy.layers.record import ConversionRecord
from moefy.passes.base import Pass, PassResult
from moefy.passes.neuron import Knob, knob_inputs, sample_inputs
from moefy.passes.stages import Converted, Request, Statistics

_log = logging.getLogger("moefy.convert")
STATIC_TOKENS = 16384  # tokens per FFN that pick and refit a static set
RIDGE = 1e-4  # the refit's ridge, relative to the mean diagonal of its Gram matrix


class PruneStatic(Pass):
    """selection="static": every FFN keeps, for every token, ``config.active`` of its neurons:
    those with the largest ``Var(h_i)·‖W_down[:, i]‖²`` on the calibration data (what
    dropping one moves the output, its mean aside); down and its bias are then refit by
    ridge least squares so that the kept neurons reproduce the dense FFN's output on that
    data (the dropped neurons' mean, and the part of them the kept ones span). The layer
    becomes the dense FFN of its kept neurons: smaller matrices, no per-token choice, faster
    wherever a dense FFN runs (ONNX Runtime included). Every FFN is fit on the dense model's
    inputs (one calibration pass serves them all).

    The same share in every FFN: on all-MiniLM-L6-v2 at 50%, shares allocated by the
    Fisher costs the per-token knobs use (an encoder's output change under a random
    projection) gave an embedding cosine of 0.924 against 0.939 for the uniform share."""

    needs = (Statistics, Converted)

    def call(self, r: Request, stats: Statistics, converted: Converted) -> PassResult:
        config = r.config
        if config.method != "neuron" or config.selection != "static":
            return PassResult(False)
        target = converted.target
        knobs = [Knob(p, m, "static", m.w_in_t.numel() + m.w_out_t.numel())
                 for p, m in target.named_modules()
                 if isinstance(m, NeuronFFN) and m.selection == "static"]
        active = 1.0 if config.active is None else config.active
        if active >= 1.0 or not knobs:
            return PassResult(False, {"ffns": len(knobs)})
        if r.calibration_data is None:
            raise ConversionError(f"method='neuron' with selection='static' and active="
                                  f"{active} picks each FFN's neurons on data: pass "
                                  "calibration_data")
        sample_inputs(r, target, knobs, stats.batches or r.calibration_data, STATIC_TOKENS)
        read = 0.0
        for k in knobs:  # one FFN's statistics at a time
            small = _StaticFit(k.layer, knob_inputs(k), k.path).layer_for(active)
            k.samples.clear()
            share = small.ffn_size / k.layer.ffn_size
            read += share * k.weights
            small.conversion = ConversionRecord.of(k.layer.conversion).with_(
                name=k.layer.conversion.get("name", k.path), method="neuron",
                share_keep=round(share, 4), calibration_tokens=k.sampled)
            target.set_submodule(k.path, small)
        total = sum(k.weights for k in knobs)
        _log.info("neuron: static neuron sets, %.1f%% of %.3gM FFN weights (asked %.1f%%), "
                  "down refit on %d calibration tokens per FFN; attention left dense",
                  100 * read / total, total / 1e6, 100 * active, max(k.sampled for k in knobs))
        return PassResult(True, {"ffns": len(knobs), "share_read": round(read / total, 4)},
                          Converted(target, dict(converted.originals)))


class _StaticFit:
    """One FFN's static sets: the neurons ranked by ``Var(h_i)·‖W_down[:, i]‖²`` on the
    inputs ``x`` (tokens, hidden), and for any share the ridge least-squares down and bias
    that make the first ``round(share · ffn_size)`` of them reproduce the FFN's output."""

    @torch.no_grad()
    def __init__(self, layer: NeuronFFN, x: torch.Tensor, name: str):
        self.layer = layer
        h = layer.hidden(x.to(layer.w_in_t.device, layer.w_in_t.dtype)).double().cpu()
        if not bool(torch.isfinite(h).all()):
            raise ConversionError(f"{name}: the calibration data gives it non-finite "
                                  "activations (NaN or inf), so no neuron set can be fitted: "
                                  "check the data")
        w_out = layer.w_out_t.detach().double().cpu()  # (I, O)
        importance = h.var(0, unbiased=False) * w_out.square().sum(1)
        self.order = importance.argsort(descending=True)
        self.h_mean = h.mean(0)
        hc = h - self.h_mean
        self.gram = hc.T @ hc  # (I, I): every set's normal equations are a block of it
        self.cross = hc.T @ (hc @ w_out)  # hcᵀ (centred dense output)
        self.w_out = w_out  # one FFN at a time: the Gram is ffn_size² float64

    def kept(self, share: float) -> torch.Tensor:
        I = self.layer.ffn_size
        n = min(I, max(1, round(share * I)))
        return self.order[:n].sort().values

    def solve(self, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (n, O), bias (O,)) for the neurons ``keep``, float64."""
        gram = self.gram[keep][:, keep].clone()
        gram.diagonal().add_(RIDGE * float(gram.diagonal().mean().clamp_min(1e-30)))
        down = torch.linalg.solve(gram, self.cross[keep])
        return down, self.h_mean @ self.w_out - self.h_mean[keep] @ down

    @torch.no_grad()
    def layer_for(self, share: float) -> NeuronFFN:
        """The dense FFN of the ``share`` of neurons kept, down and its bias refit."""
        layer, I = self.layer, self.layer.ffn_size
        keep = self.kept(share)
        down, bias = self.solve(keep)
        dev, dt = layer.w_in_t.device, layer.w_in_t.dtype
        small = NeuronFFN(layer.hidden_size, keep.numel(), layer.output_size,
                          activation=layer.activation, gated=layer.gated, bias=True,
                          selection="static", dtype=dt, device=dev)
        cols = (torch.cat([keep, keep + I]) if layer.gated else keep).to(dev)
        small.w_in_t.copy_(layer.w_in_t[:, cols])
        if layer.b_in is not None:
            small.b_in.copy_(layer.b_in[cols])
        small.w_out_t.copy_(down.to(dev, dt))
        if layer.b_out is not None:
            bias = bias + layer.b_out.detach().double().cpu()
        small.b_out.copy_(bias.to(dev, dt))
        small.in_scale.copy_(small.w_in_t.float().norm(dim=1))
        small.h_scale.copy_(small.w_out_t.float().norm(dim=1))
        return small
