"""Single-neuron experts: layers that read, per token, only the weights its largest inputs
need (``MoEConfig(method="neuron")``).

    SparseLinear   x ──keep x_j where |x_j|·s_j > t──▶ W[:, kept] · x[kept] + b
                   (an attention projection; s_j = ‖W[:, j]‖, WINA's weight-aware score)

    NeuronFFN, selection="input" (TEAL / WINA on both projections):
        x ──keep x_j: |x_j|·s_j > t_in──▶ [gate; up] ──act(g)·u = h
          ──keep h_i: |h_i|·‖W_down[:, i]‖ > t_h──▶ down
    NeuronFFN, selection="gate" (two-stage, CATS-like: each neuron is an expert the gate routes):
        x ──keep x_j: |x_j|·s_j > t_in──▶ gate g ──keep i: |act(g_i)|·c_i > t_h──▶ up_i, down_i only
    NeuronFFN, selection="sequence" (GRIFFIN: one set of neurons per sequence, from its prompt):
        a call of S > 1 tokens (the prompt) ──dense, exact──▶ y, and per sequence the
            ⌈keep·I⌉ neurons of largest ‖h_:,i / ‖h_t,:‖‖ over its tokens, their gate/up rows
            and down columns copied out contiguous
        a call of one token per sequence (decoding) ──▶ the dense FFN of those neurons only
    NeuronFFN, selection="static" (one set for every token, picked on calibration data):
        x ──▶ the dense FFN of its ffn_size neurons (the dense FFN's others dropped and their
            mean and linear part refit into down: ``moefy.passes.neuron.PruneStatic``)

Every neuron is an expert and the selection is its router: the signals are ones the layer
computes anyway, so routing reads nothing extra. Thresholds, not a fixed k: a token with a
few large entries reads little, one with many reads more, and the thresholds are calibrated
(``moefy.passes.neuron``) so that the *mean* share of weights read meets the budget. A
threshold below 0 keeps everything: the layer is then exactly the dense one.

Weights are stored so that what is read together is contiguous: the input-sparse matrices
transposed (row j = input channel j's weights), the gate-routed up projection as rows.
A dropped entry is skipped, never multiplied by 0 (an inf there does not become a NaN); a NaN
score keeps its entry (a NaN input stays visible in the output, as in the dense layer).

Selection "sequence" keeps state between calls, as generation does: a call with more than one
token per sequence picks the set (and is exact), a call with one token per sequence and the
same number of sequences decodes with it. A new sequence therefore starts with a call of more
than one token, or after ``NeuronFFN.forget()``: a one-token prompt that follows another
sequence of the same batch size would decode with the old sequence's set. Padding tokens of a
prompt count in the set's statistic (the layer does not see the attention mask). The set is
the model's state, as a KV cache held inside it would be: one generation at a time per model
(two threads decoding different sequences through one model would share it). In training
mode a call of S > 1 tokens runs as generation would, statelessly: each sequence's first half
dense, the rest through the set the first half picks (distillation then trains what decoding
computes).
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from moefy.activations import get_activation
from moefy.errors import InputError
from moefy.layers.inputs import check_layer_input
from moefy.layers.record import ConversionRecord
from moefy.runtime import neuron as kernels

SELECTIONS = ("input", "gate", "sequence", "static")
DENSE = -1.0  # a threshold that keeps every entry


@contextlib.contextmanager
def every_row_kept(layers):
    """Every input channel and neuron of ``layers`` (NeuronFFN / SparseLinear) kept for the
    duration: each is then exactly the dense projection it was built from."""
    names = ("threshold", "in_threshold", "h_threshold", "keep")
    layers = list(layers)
    saved = [(getattr(m, n), getattr(m, n).clone()) for m in layers for n in names
             if hasattr(m, n)]
    try:
        for t, _ in saved:
            t.fill_(DENSE)
        yield
    finally:
        for t, value in saved:
            t.copy_(value)
        for m in layers:  # a set picked meanwhile belongs to text the caller never sent
            if isinstance(m, NeuronFFN):
                m.forget()


def only_set(h: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``h`` (rows, S, I) with every neuron outside each row's set ``chosen`` (rows, k) zeroed:
    what a sequence's tokens compute through its set (selection "sequence")."""
    kept = torch.zeros(h.shape[0], 1, h.shape[2], dtype=torch.bool, device=h.device)
    kept.scatter_(-1, chosen.unsqueeze(1), True)
    return torch.where(kept, h, 0.0)


def _threshold_buffer() -> torch.Tensor:
    return torch.tensor(DENSE, dtype=torch.float32)


class SparseLinear(nn.Module):
    """An ``nn.Linear`` (``in_features → out_features``) that reads, per token, only the
    weight columns of its input channels whose score ``|x_j| · scale_j`` exceeds
    ``threshold`` (``scale``: the columns' norms, so a channel counts by what it can change).

    ``weight_t`` holds ``W`` transposed, (in, out): the columns of one channel are one
    contiguous row. ``threshold < 0`` (the default) keeps every channel: ``nn.Linear`` exactly.

    >>> lin = nn.Linear(8, 4)
    >>> sparse = SparseLinear.from_linear(lin)
    >>> x = torch.randn(3, 8)
    >>> bool(torch.allclose(sparse(x), lin(x), atol=1e-6))
    True
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SparseLinear: {name} must be a positive int, got {value!r}")
        kw = {"dtype": dtype, "device": device}
        self.in_features, self.out_features = in_features, out_features
        self.weight_t = nn.Parameter(torch.empty(in_features, out_features, **kw))
        self.bias = nn.Parameter(torch.zeros(out_features, **kw)) if bias else None
        self.register_buffer("scale", torch.ones(in_features, dtype=torch.float32,
                                                 device=device))
        self.register_buffer("threshold", _threshold_buffer().to(device))
        nn.init.kaiming_uniform_(self.weight_t.T, a=5 ** 0.5)  # nn.Linear's initialisation
        self.conversion = ConversionRecord()

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear) -> SparseLinear:
        """The same map as ``linear``, keeping every channel until a threshold is set; the
        scores weigh each channel by its column's norm."""
        w = linear.weight.detach()
        out = cls(linear.in_features, linear.out_features, linear.bias is not None,
                  dtype=w.dtype, device=w.device)
        out.weight_t.copy_(w.t())
        if linear.bias is not None:
            out.bias.copy_(linear.bias.detach())
        out.scale.copy_(w.float().norm(dim=0))
        out.train(linear.training)
        return out

    @property
    def weight(self) -> torch.Tensor:
        """``W`` in ``nn.Linear`` layout (out, in): a view of ``weight_t``, for code that reads
        a projection's weight (its dtype or device)."""
        return self.weight_t.t()

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Each input channel's score ``|x_j| · scale_j`` (what the threshold is compared
        with), float32."""
        return x.float().abs() * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.in_features, self.weight_t, "SparseLinear", "layer")
        t = kernels.threshold_of(self.threshold, x)  # a tensor under tracing: never "dense"
        if isinstance(t, float) and t < 0:
            y = x @ self.weight_t
            return y if self.bias is None else y + self.bias
        return kernels.sparse_input_linear(x, self.weight_t, self.scale, t, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, threshold={float(self.threshold):.4g}")


class DecodeLinear(nn.Linear):
    """An ``nn.Linear`` whose decode calls (at most ``KERNEL_MAX_TOKENS`` tokens, CPU float32,
    no grad) read its weight with moefy's row kernel (``moefy.runtime.neuron.rows_linear``:
    every row, in place, at close to the memory's bandwidth, where a batch-1 ``F.linear``
    reaches about half of it); every other call is ``F.linear``. The same function, sums in
    another order. ``method="neuron"`` puts it on a causal LM's head, which every decoded
    token reads whole (it is not in the budget).

    ``from_linear`` shares the linear's parameters (not copies): a head tied to the input
    embedding stays tied, and the state dict keeps its names.

    >>> lin = nn.Linear(8, 32)
    >>> head = DecodeLinear.from_linear(lin)
    >>> head.weight is lin.weight
    True
    >>> x = torch.randn(1, 8)
    >>> bool(torch.allclose(head(x), lin(x), atol=1e-6))
    True
    """

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> DecodeLinear:
        """A DecodeLinear over ``linear``'s own parameters, in its train / eval mode."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"DecodeLinear.from_linear takes an nn.Linear, got "
                            f"{type(linear).__name__}")
        out = cls.__new__(cls)
        nn.Module.__init__(out)
        out.in_features, out.out_features = linear.in_features, linear.out_features
        out.register_parameter("weight", linear.weight)
        out.register_parameter("bias", linear.bias)  # None: registered as absent, as nn.Linear
        out.train(linear.training)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.rows_linear(x, self.weight, self.bias)


def linears_by_rows(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every plain ``nn.Linear`` a ``DecodeLinear`` (the same
    function, read at decode by moefy's row kernel): the reference that says how much of a
    sparse model's decode speed-up is the kernel's rather than the sparsity's. The model
    given is not changed; weights tied inside it stay tied in the copy."""
    import copy

    out = copy.deepcopy(model)
    if type(out) is nn.Linear:
        return DecodeLinear.from_linear(out)
    for name, m in list(out.named_modules()):
        if type(m) is nn.Linear:
            out.set_submodule(name, DecodeLinear.from_linear(m))
    return out


class NeuronFFN(nn.Module):
    """A dense FFN ``W_down · act(W_gate x) ⊙ (W_up x)`` (plain: ``W_down · act(W_up x)``),
    ``hidden_size → output_size``, whose ``ffn_size`` neurons are single-neuron experts chosen
    per token (see the module docstring for the selections).

    Knobs: ``in_threshold`` on the input channels (scores ``|x_j|·in_scale_j``) and
    ``h_threshold`` on the neurons (selection "input": ``|h_i|·h_scale_i`` with
    ``h_scale_i = ‖W_down[:, i]‖``; "gate": ``|act(g_i)|·coef_i``, ``coef`` calibrated as the
    neuron's mean ``|u_i|`` times ``‖W_down[:, i]‖``). Selection "sequence" has one knob,
    ``keep``: the share of neurons a sequence's set holds (its gate/up rows and down columns
    are what a decoded token reads). Below 0 a knob keeps everything. Selection "static" has
    no knob: it is the dense FFN of its ``ffn_size`` neurons.
    """

    def __init__(self, hidden_size: int, ffn_size: int, output_size: int | None = None, *,
                 activation: str = "silu", gated: bool = True, bias: bool = False,
                 selection: str = "input", dtype: torch.dtype | None = None, device=None):
        super().__init__()
        output_size = hidden_size if output_size is None else output_size
        for name, value in (("hidden_size", hidden_size), ("ffn_size", ffn_size),
                            ("output_size", output_size)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NeuronFFN: {name} must be a positive int, got {value!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"NeuronFFN: selection must be one of {SELECTIONS}, got "
                             f"{selection!r}")
        if not isinstance(activation, str):
            raise ValueError("NeuronFFN: activation must be a name in moefy.activations "
                             f"(the kernels compute it), got {type(activation).__name__}")
        H, I, O = hidden_size, ffn_size, output_size
        self.hidden_size, self.ffn_size, self.output_size = H, I, O
        self.activation = get_activation(activation).name
        self.gated, self.selection = gated, selection
        kw = {"dtype": dtype, "device": device}

        def param(*shape):
            return nn.Parameter(torch.zeros(*shape, **kw))

        first = 2 * I if gated and selection != "gate" else I
        # the input-sparse first projection: [gate; up] (selection "input") or the gate alone
        self.w_in_t = param(H, first)
        self.b_in = param(first) if bias else None
        self.w_up = param(I, H) if gated and selection == "gate" else None
        self.b_up = param(I) if bias and self.w_up is not None else None
        self.w_out_t = param(I, O)
        self.b_out = param(O) if bias else None
        f32 = {"dtype": torch.float32, "device": device}
        self.register_buffer("in_scale", torch.ones(H, **f32))
        self.register_buffer("h_scale", torch.ones(I, **f32))  # ‖W_down[:, i]‖ or coef_i
        self.register_buffer("in_threshold", _threshold_buffer().to(device))
        self.register_buffer("h_threshold", _threshold_buffer().to(device))
        if selection == "sequence":
            self.register_buffer("keep", _threshold_buffer().to(device))
        self._set: _NeuronSet | None = None  # selection "sequence": the current neuron set
        self.conversion = ConversionRecord()

    @torch.no_grad()
    def load_dense(self, w_in: torch.Tensor, w_out: torch.Tensor, w_gate: torch.Tensor | None,
                   b_in: torch.Tensor | None = None, b_gate: torch.Tensor | None = None,
                   b_out: torch.Tensor | None = None) -> NeuronFFN:
        """Take a dense FFN's weights in ``nn.Linear`` layout (w_in = up (I, H), w_gate (I, H),
        w_out = down (O, I)) and set the scores' weight norms. Returns ``self``."""
        I = self.ffn_size
        if (w_gate is not None) != self.gated:
            raise ValueError(f"NeuronFFN.load_dense: the layer is {'' if self.gated else 'not '}"
                             f"gated but w_gate is {'missing' if self.gated else 'given'}")

        def zeros_if_none(b, n):
            return w_in.new_zeros(n) if b is None else b

        if self.selection != "gate":
            first = torch.cat([w_gate, w_in]) if self.gated else w_in
            self.w_in_t.copy_(first.t())
            if self.b_in is not None:
                self.b_in.copy_(torch.cat([zeros_if_none(b_gate, I), zeros_if_none(b_in, I)])
                                if self.gated else zeros_if_none(b_in, I))
        else:
            self.w_in_t.copy_((w_gate if self.gated else w_in).t())
            if self.b_in is not None:
                self.b_in.copy_(zeros_if_none(b_gate if self.gated else b_in, I))
            if self.gated:
                self.w_up.copy_(w_in)
                if self.b_up is not None:
                    self.b_up.copy_(zeros_if_none(b_in, I))
        self.w_out_t.copy_(w_out.t())
        if self.b_out is not None:
            self.b_out.copy_(zeros_if_none(b_out, self.output_size))
        self.in_scale.copy_(self.w_in_t.float().norm(dim=1))
        self.h_scale.copy_(self.w_out_t.float().norm(dim=1))
        return self

    def _act(self, g: torch.Tensor) -> torch.Tensor:
        return get_activation(self.activation).fn(g)

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        """The neurons' values before the second selection: ``h = act(g)·u`` (selection
        "input"), or ``act(g)`` (selection "gate", where ``u`` is computed only for the kept
        neurons), with the input selection applied."""
        g = self._first(x)
        if self.selection == "gate":
            return self._act(g)
        return self._gated(g)

    def _gated(self, g: torch.Tensor) -> torch.Tensor:
        """``act(g)·u`` from ``[g; u]`` (any number of neurons: all, or a sequence's set)."""
        if self.gated:
            g, u = g.chunk(2, dim=-1)
            return self._act(g) * u
        return self._act(g)

    def _first(self, x: torch.Tensor) -> torch.Tensor:
        t = kernels.threshold_of(self.in_threshold, x)
        if isinstance(t, float) and t < 0:
            y = x @ self.w_in_t
            return y if self.b_in is None else y + self.b_in
        return kernels.sparse_input_linear(x, self.w_in_t, self.in_scale, t, self.b_in)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_layer_input(x, self.hidden_size, self.w_in_t, "NeuronFFN", "layer")
        if self.selection == "sequence":
            return self._sequence_forward(x)
        if self.selection == "static":  # no per-token choice: plain matrix products (ONNX too)
            g = x @ self.w_in_t
            y = self._gated(g if self.b_in is None else g + self.b_in) @ self.w_out_t
            return y if self.b_out is None else y + self.b_out
        t = kernels.threshold_of(self.h_threshold, x)  # a tensor under tracing
        dense = isinstance(t, float) and t < 0
        if self.selection == "input":
            t_in = kernels.threshold_of(self.in_threshold, x)
            if dense and isinstance(t_in, float) and t_in < 0:  # every weight: exactly dense
                y = self._gated(x @ self.w_in_t if self.b_in is None
                                else x @ self.w_in_t + self.b_in) @ self.w_out_t
            else:
                y = kernels.input_sparse_ffn(x, self.w_in_t, self.in_scale, t_in, self.b_in,
                                             self.w_out_t, self.h_scale, t, self.activation,
                                             self.gated)
            return y if self.b_out is None else y + self.b_out
        g = self._first(x)
        if dense:  # every neuron: the dense FFN
            a = self._act(g)
            if self.w_up is not None:
                u = F.linear(x, self.w_up, self.b_up)
                a = a * u
            y = a @ self.w_out_t
        else:
            y = kernels.neuron_ffn(x, g, self.w_up, self.b_up, self.w_out_t, self.h_scale, t,
                                   self.activation)
        return y if self.b_out is None else y + self.b_out

    # ------------------------------------------------------------- selection "sequence"

    def kept_neurons(self) -> int | None:
        """Selection "sequence": how many neurons a sequence's set holds (None: every one,
        the dense FFN)."""
        share = float(self.keep)
        if not share >= 0 or share >= 1:  # DENSE, or NaN: everything
            return None
        return min(self.ffn_size, max(1, math.ceil(share * self.ffn_size - 1e-6)))

    def forget(self) -> None:
        """Drop the neuron set picked from the last prompt: the next call picks a new one
        (selection "sequence"; a no-op otherwise)."""
        self._set = None

    def pick(self, h: torch.Tensor, k: int) -> torch.Tensor:
        """GRIFFIN's set for each sequence of ``h`` (rows, S, I): the ``k`` neurons of largest
        ``‖h_:,i‖`` over the sequence's tokens, each token's row first scaled to unit norm (a
        token with large activations everywhere does not decide alone). (rows, k), sorted; a
        neuron with a NaN or inf ranks first (it stays visible)."""
        h = h.float()
        # the norm over finite entries: a NaN or inf neuron ranks itself first, not all
        finite = torch.where(torch.isfinite(h), h, 0.0)
        unit = h / finite.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        stat = unit.norm(dim=-2)  # (rows, I)
        stat = torch.where(torch.isnan(stat), torch.full_like(stat, math.inf), stat)
        return stat.topk(k, dim=-1).indices.sort(dim=-1).values

    @torch.no_grad()
    def prompt_then_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Selection "sequence", as generation runs it: each sequence of ``x`` (rows, S, H)
        picks its set from its first S // 2 tokens; returns the outputs on the other tokens
        through that set and through every neuron, (rows, S - S // 2, O) each, both without
        the output bias (their difference is the set's error). None when
        S < 2 (no prompt and continuation to split). Leaves no set behind."""
        if x.dim() < 2 or x.shape[-2] < 2:
            return None
        S = x.shape[-2]
        x3 = x.reshape(-1, S, self.hidden_size)
        half = S // 2
        rest = self.hidden(x3[:, half:])
        dense = rest @ self.w_out_t
        k = self.kept_neurons()
        if k is None:
            return dense, dense
        chosen = self.pick(self.hidden(x3[:, :half]), k)
        return only_set(rest, chosen) @ self.w_out_t, dense

    @torch.compiler.disable  # stateful: torch.compile runs it eagerly between its graphs
    def _sequence_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(kernels.threshold_of(self.keep, x), float):  # exported, traced
            raise InputError("NeuronFFN(selection='sequence') keeps its neuron set between "
                             "calls, which a traced or exported graph cannot; export a "
                             "conversion with selection='input' or 'gate'")
        k = self.kept_neurons()
        if k is None:
            return self._dense(x)
        lead, S = x.shape[:-2], (x.shape[-2] if x.dim() >= 2 else 1)
        rows = lead.numel() if x.dim() >= 2 else 1
        x3 = x.reshape(rows, S, self.hidden_size)
        if not x3.numel():
            return self._dense(x)
        if self.training and S >= 2:
            return self._as_generation(x3).reshape(*x.shape[:-1], self.output_size)
        current = self._set
        if S == 1 and current is not None and current.rows == rows and current.k == k:
            return self._decode(x3, current).reshape(*x.shape[:-1], self.output_size)
        h = self._gated(self._first(x3))  # the prompt: exact
        y = h @ self.w_out_t
        if self.b_out is not None:
            y = y + self.b_out
        self._set = _NeuronSet(self.pick(h.detach(), k), rows, k)
        return y.reshape(*x.shape[:-1], self.output_size)

    def _as_generation(self, x3: torch.Tensor) -> torch.Tensor:
        """Training: each sequence's first half dense, the rest through the set the first
        half picks (what decoding computes, differentiable through the kept neurons); no set
        is kept."""
        half = x3.shape[1] // 2
        h = self._gated(self._first(x3))
        chosen = self.pick(h[:, :half].detach(), self.kept_neurons())
        y = torch.cat([h[:, :half], only_set(h[:, half:], chosen)], dim=1) @ self.w_out_t
        return y if self.b_out is None else y + self.b_out

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        y = self._gated(self._first(x)) @ self.w_out_t
        return y if self.b_out is None else y + self.b_out

    def _decode(self, x3: torch.Tensor, chosen: _NeuronSet) -> torch.Tensor:
        """One token per sequence through its set's neurons only: (rows, 1, H) → (rows, 1, O)."""
        w_in, b_in, w_out = chosen.weights(self)
        if x3.shape[0] == 1:
            g = F.linear(x3[0], w_in[0], None if b_in is None else b_in[0])  # (1, k or 2k)
            y = (self._gated(g) @ w_out[0]).unsqueeze(0)
        else:
            g = torch.bmm(x3, w_in.transpose(1, 2))
            if b_in is not None:
                g = g + b_in.unsqueeze(1)
            y = torch.bmm(self._gated(g), w_out)
        return y if self.b_out is None else y + self.b_out

    def extra_repr(self) -> str:
        if self.selection == "sequence":
            return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                    f"output_size={self.output_size}, activation={self.activation!r}, "
                    f"gated={self.gated}, selection='sequence', keep={float(self.keep):.4g}")
        if self.selection == "static":
            return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                    f"output_size={self.output_size}, activation={self.activation!r}, "
                    f"gated={self.gated}, selection='static'")
        return (f"hidden_size={self.hidden_size}, ffn_size={self.ffn_size}, "
                f"output_size={self.output_size}, activation={self.activation!r}, "
                f"gated={self.gated}, selection={self.selection!r}, "
                f"in_threshold={float(self.in_threshold):.4g}, "
                f"h_threshold={float(self.h_threshold):.4g}")


class _NeuronSet:
    """The neurons a sequence decodes with (selection "sequence"): their indices (rows, k)
    and, outside autograd, their weights copied out contiguous once (the gate and up rows as
    one (rows, k·(1+gated), H) matrix, the down columns as (rows, k, O)), re-copied when the
    layer's weights change (their version, dtype or device)."""

    def __init__(self, index: torch.Tensor, rows: int, k: int):
        self.index, self.rows, self.k = index, rows, k
        self._copy, self._key = None, None

    def _gather(self, layer: NeuronFFN):
        idx = self.index.to(layer.w_in_t.device)
        if idx.is_inference() and not torch.is_inference_mode_enabled():
            idx = idx.clone()  # autograd may save it (index_select's backward)
        cols = torch.cat([idx, idx + layer.ffn_size], dim=-1) if layer.gated else idx
        w_in = layer.w_in_t.t()[cols]  # (rows, k·(1+gated), H)
        b_in = None if layer.b_in is None else layer.b_in[cols]
        return w_in.contiguous(), b_in, layer.w_out_t[idx]  # (rows, k, O)

    def weights(self, layer: NeuronFFN):
        params = [t for t in (layer.w_in_t, layer.b_in, layer.w_out_t) if t is not None]
        if torch.is_grad_enabled() and any(t.requires_grad for t in params):
            return self._gather(layer)  # differentiable: gathered afresh each call
        key = tuple((None if t.is_inference() else t._version, t.data_ptr(), t.dtype, t.device)
                    for t in params)
        if self._copy is None or key != self._key:
            with torch.no_grad():
                self._copy, self._key = self._gather(layer), key
        return self._copy
