"""Single-neuron and input-channel sparsity: projections that read only the weights they use.

    x (…, K), wt (K, N), scale (K)
      ⇒ keep channel j where |x_j|·scale_j > threshold  ⇒  y = Σ_kept x_j·wt[j]  (+ bias)
    x (…, H), g (…, F) the gate's pre-activation, coef (F)
      ⇒ a = act(g); keep neuron i where |a_i|·coef_i > threshold
      ⇒ y = Σ_kept a_i·u_i·w_down_t[i],  u_i = w_up[i]·x + b_up[i] (gated FFN), else 1

Weights are passed transposed (``wt = linear.weight.T``, ``w_down_t = down.weight.T``, made
contiguous once): a row is then one input channel's (one neuron's) weights, and skipping a
channel skips a contiguous row.

Three implementations, chosen per call:
- the C++ kernels ``torch.ops.moefy_cpu.sparse_input_linear`` / ``neuron_ffn`` /
  ``input_sparse_ffn`` (a whole FFN of selection "input" in one call) / ``rows_linear`` (a
  dense projection read in place) (csrc/neuron.cpp): eager CPU float32, no autograd, at
  most ``KERNEL_MAX_TOKENS`` tokens — decode, where a projection costs what reading its
  weights costs and only the selected rows are read;
- their CUDA counterparts for ``sparse_input_linear`` and ``neuron_ffn``, in Triton
  (moefy/runtime/neuron_triton.py, imported only for CUDA tensors, where triton is
  installed): float32 / bfloat16 / float16, no autograd, at most ``KERNEL_MAX_TOKENS``
  tokens (``input_sparse_ffn`` on CUDA runs as its three steps, two of them these);
- the masked dense PyTorch expression: any device, dtype and batch, differentiable,
  traceable (prefill, training, export). It reads every weight.

Both select exactly the same entries (strict ``>``, the score computed in the input's dtype;
a NaN score keeps its entry, so a NaN input stays visible as in the dense layer).
A threshold is a Python float, or the layer's 0-d buffer itself (``threshold_of``): under
tracing its value is unknown, so the masked path compares with the tensor, and the traced
graph (an ONNX export) holds the threshold as a weight, not a constant baked in.
A dropped entry contributes nothing: it is set to 0 with ``where`` (never multiplied by 0,
which would turn an inf there into a NaN).
"""

from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from moefy.activations import ACTIVATIONS, Activation, get_activation
from moefy.errors import InputError, first_line
from moefy.runtime.kernels import neuron_kernels_available

Tensor = torch.Tensor

# Up to this many tokens the C++ kernels beat the masked dense path (benchmarks/
# bench_neuron.py, token sweep, 50% kept per token, 2 threads): 1.3-1.5x at 16 tokens, even to
# 0.8x at 32. The union of the tokens' selected rows grows with the token count (at 8 tokens
# almost every row is someone's), and then one GEMM over every row wins. The C++ side accepts
# at most 64 (kMaxTokens in csrc/neuron.cpp).
KERNEL_MAX_TOKENS = 16
# The activations csrc/common.h's parse_activation knows.
KERNEL_ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu", "squared_relu", "quick_gelu",
                      "hardswish")


def sparse_input_linear(x: Tensor, wt: Tensor, scale: Tensor, threshold: float | Tensor,
                        bias: Tensor | None = None) -> Tensor:
    """A linear layer that skips the input channels whose score is at most ``threshold``.

    ``y = Σ_{j : |x_j|·scale_j > threshold} x_j·wt[j, :] + bias`` for each token of ``x``
    (…, K); ``wt`` (K, N) is the layer's weight transposed, ``scale`` (K) ≥ 0 weighs the
    channels (e.g. ``linear.weight.norm(dim=0)``, or ones). Returns (…, N).

    >>> linear = torch.nn.Linear(8, 4)
    >>> wt = linear.weight.detach().T.contiguous()
    >>> x = torch.randn(2, 8)
    >>> y = sparse_input_linear(x, wt, torch.ones(8), -1.0, linear.bias.detach())
    >>> torch.allclose(y, linear(x).detach(), atol=1e-6)
    True
    """
    _check_linear(x, wt, scale, bias)
    K, N = wt.shape
    tokens = math.prod(x.shape[:-1])
    weights = (wt, scale) if bias is None else (wt, scale, bias)
    if x.is_cuda and _cuda_kernel_applies(x, tokens, weights[:1] + weights[2:], (scale,),
                                          threshold):
        flat = x if x.dim() == 2 else x.reshape(tokens, K)
        y = _on_cuda(_triton().sparse_input_linear, flat.contiguous(), wt, scale,
                     float(threshold))
        if y is not None:
            if bias is not None:
                y += bias
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)
    if _kernel_applies(x, tokens, weights) and not _needs_grad(x, *weights):
        flat = x if x.dim() == 2 else x.reshape(tokens, K)
        y = _sparse_input_linear_op(flat.contiguous(), wt, scale, float(threshold))
        if bias is not None:
            y += bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], N)
    return _masked_input_linear(x, wt, scale, threshold, bias)


def neuron_ffn(x: Tensor, g: Tensor, w_up: Tensor | None, b_up: Tensor | None,
               w_down_t: Tensor, coef: Tensor, threshold: float | Tensor,
               activation: str | Activation) -> Tensor:
    """An FFN's second half over the neurons whose activation scores above ``threshold``.

    With ``a = act(g)`` (``g`` (…, F): the first projection, pre-activation, computed by the
    caller), neuron ``i`` is kept for a token where ``|a_i|·coef_i > threshold``, and
    ``y = Σ_kept a_i·u_i·w_down_t[i, :]`` with ``u_i = w_up[i]·x + b_up[i]`` for a gated FFN
    (``w_up`` (F, H), ``b_up`` (F) optional), else ``u_i = 1``. ``w_down_t`` (F, O) is the down
    projection's weight transposed; its bias is the caller's to add. Returns (…, O).

    >>> x, w_gate = torch.randn(3, 8), torch.randn(16, 8)
    >>> w_up, w_down = torch.randn(16, 8), torch.randn(8, 16)
    >>> y = neuron_ffn(x, x @ w_gate.T, w_up, None, w_down.T.contiguous(), torch.ones(16),
    ...                -1.0, "silu")
    >>> dense = (torch.nn.functional.silu(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T
    >>> torch.allclose(y, dense, atol=1e-4)
    True
    """
    act = _activation(activation)
    _check_ffn(x, g, w_up, b_up, w_down_t, coef)
    F_, O = w_down_t.shape
    lead = x.shape[:-1]
    tokens = math.prod(g.shape[:-1])
    weights = tuple(t for t in (w_up, b_up, w_down_t, coef) if t is not None)
    known = act.name in KERNEL_ACTIVATIONS and ACTIVATIONS.get(act.name) is act
    if (known and x.is_cuda and not _needs_grad(g) and _cuda_kernel_applies(
            x, tokens, tuple(t for t in (g, w_up, b_up, w_down_t) if t is not None), (coef,),
            threshold)):
        x2, g2 = ((x, g) if x.dim() == 2
                  else (x.reshape(tokens, x.shape[-1]), g.reshape(tokens, F_)))
        y = _on_cuda(_triton().neuron_ffn, x2.contiguous(), g2.contiguous(), w_up, b_up,
                     w_down_t, coef, float(threshold), act.name)
        if y is not None:
            return y if len(lead) == 1 else y.reshape(*lead, O)
    if (known and _kernel_applies(x, tokens, weights) and g.is_cpu
            and g.dtype == torch.float32 and not _needs_grad(x, g, *weights)):
        if x.dim() != 2:
            x, g = x.reshape(tokens, x.shape[-1]), g.reshape(tokens, F_)
        y = _neuron_ffn_op(x.contiguous(), g.contiguous(), w_up, b_up, w_down_t, coef,
                           float(threshold), act.name)
        return y if len(lead) == 1 else y.reshape(*lead, O)
    return _masked_neuron_ffn(x, g, w_up, b_up, w_down_t, coef, threshold, act)


def input_sparse_ffn(x: Tensor, w_in_t: Tensor, in_scale: Tensor,
                     in_threshold: float | Tensor, b_in: Tensor | None, w_out_t: Tensor,
                     h_scale: Tensor, h_threshold: float | Tensor,
                     activation: str | Activation, gated: bool) -> Tensor:
    """A whole input-sparse FFN (selection "input"), its output bias left to the caller:

        g = sparse_input_linear(x, w_in_t, in_scale, in_threshold, b_in)   (…, G)
        h = act(g[…, :I]) · g[…, I:]  (gated: G = 2I, ``w_in_t`` = [gate; up]ᵀ)  or act(g)
        y = sparse_input_linear(h, w_out_t, h_scale, h_threshold)          (…, O)

    At decode sizes one C++ call (``torch.ops.moefy_cpu.input_sparse_ffn``) does all three:
    a decoded token pays one call's overhead per FFN instead of five. Otherwise the three
    steps as written (each with its own choice of path).

    >>> H, I = 8, 16
    >>> w_in_t, w_out_t = torch.randn(H, 2 * I), torch.randn(I, H)
    >>> x = torch.randn(1, H)
    >>> y = input_sparse_ffn(x, w_in_t, torch.ones(H), -1.0, None, w_out_t, torch.ones(I),
    ...                      -1.0, "silu", True)
    >>> g, u = (x @ w_in_t).chunk(2, dim=-1)
    >>> torch.allclose(y, (torch.nn.functional.silu(g) * u) @ w_out_t, atol=1e-4)
    True
    """
    act = _activation(activation)
    if isinstance(x, torch.Tensor):
        _check_linear(x, w_in_t, in_scale, b_in)
        G, I = w_in_t.shape[1], w_out_t.shape[0]
        if G != (2 * I if gated else I):
            raise InputError(f"input_sparse_ffn: w_in_t has {G} columns; a "
                             f"{'gated' if gated else 'plain'} FFN of {I} neurons (w_out_t's "
                             f"rows) needs {2 * I if gated else I}")
        _check_linear(x.new_empty(0, I), w_out_t, h_scale, None)
        K = w_in_t.shape[0]
        tokens = math.prod(x.shape[:-1])
        weights = tuple(t for t in (w_in_t, in_scale, b_in, w_out_t, h_scale) if t is not None)
        if (act.name in KERNEL_ACTIVATIONS and ACTIVATIONS.get(act.name) is act
                and not isinstance(in_threshold, torch.Tensor)
                and not isinstance(h_threshold, torch.Tensor)
                and _kernel_applies(x, tokens, weights) and not _needs_grad(x, *weights)):
            flat = x if x.dim() == 2 else x.reshape(tokens, K)
            y = _input_sparse_ffn_op(flat.contiguous(), w_in_t, in_scale, float(in_threshold),
                                     b_in, w_out_t, h_scale, float(h_threshold), act.name,
                                     gated)
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], w_out_t.shape[1])
    g = sparse_input_linear(x, w_in_t, in_scale, in_threshold, b_in)
    if gated:
        g, u = g.chunk(2, dim=-1)
        h = act.fn(g) * u
    else:
        h = act.fn(g)
    return sparse_input_linear(h, w_out_t, h_scale, h_threshold)


def rows_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` (``weight`` (N, K) in ``nn.Linear``'s layout, read in
    place), computed at decode sizes by the C++ kernel ``torch.ops.moefy_cpu.rows_linear``:
    each output a dot product with one contiguous row, the rows split evenly over the threads
    and read 8 at a time. The same function as ``F.linear`` (the sums in another order:
    float32 rounding apart); everything else (more than ``KERNEL_MAX_TOKENS`` tokens, grad,
    another device or dtype, tracing) takes ``F.linear`` itself.

    >>> w, x = torch.randn(16, 8), torch.randn(2, 8)
    >>> torch.allclose(rows_linear(x, w), x @ w.T, atol=1e-5)
    True
    """
    if (isinstance(x, torch.Tensor) and x.dim() >= 1 and weight.dim() == 2
            and x.shape[-1] == weight.shape[1]
            and _kernel_applies(x, math.prod(x.shape[:-1]), (weight,))
            and (bias is None or (bias.is_cpu and bias.dtype == torch.float32
                                  and bias.shape == weight.shape[:1]))
            and not _needs_grad(x, weight, bias)):
        K = weight.shape[1]
        flat = x if x.dim() == 2 else x.reshape(math.prod(x.shape[:-1]), K)
        y = _rows_linear_op(flat.contiguous(), weight)
        if bias is not None:
            y += bias
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)


def threshold_of(threshold: Tensor, x: Tensor) -> float | Tensor:
    """A layer's threshold (a 0-d buffer) as the functions above take it for input ``x``: a
    Python float eagerly (the kernels take a float, and ``< 0``, "keep everything", can be
    tested), the buffer itself under tracing (torch.export, torch.compile, FX), where reading
    its value would be a data-dependent guard; the traced graph then compares with it."""
    return threshold if _tracing(x) else float(threshold)


# --------------------------------------------------------------------------- checks, choice


def _sparse_input_linear_op(*args):
    return torch.ops.moefy_cpu.sparse_input_linear.default(*args)


def _input_sparse_ffn_op(*args):
    return torch.ops.moefy_cpu.input_sparse_ffn.default(*args)


def _rows_linear_op(*args):
    return torch.ops.moefy_cpu.rows_linear.default(*args)


def _prefill_mask(*args):
    return torch.ops.moefy_cpu.mask_inputs.default(*args)


def _neuron_ffn_op(*args):
    return torch.ops.moefy_cpu.neuron_ffn.default(*args)


def _activation(activation) -> Activation:
    try:
        return get_activation(activation)
    except ValueError as exc:
        raise InputError(f"neuron_ffn: {exc}") from None


def _tracing(x) -> bool:
    """Under torch.compile / torch.export / FX or JIT tracing: the dense expression only."""
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing() or type(x) not in (torch.Tensor, torch.nn.Parameter))


def _kernel_applies(x: Tensor, tokens: int, tensors: tuple[Tensor, ...]) -> bool:
    """The C++ kernels run eager CPU float32 decode batches on weights read in place (a
    non-contiguous weight would be copied whole on every call: the dense path reads it as is),
    outside autocast (which would make the dense path compute in another dtype) and with at
    least one input feature. Cheap checks first: this runs on every decode call."""
    if (tokens > KERNEL_MAX_TOKENS or not x.is_cpu or x.dtype != torch.float32
            or not x.shape[-1] or _tracing(x) or torch.is_autocast_enabled("cpu")):
        return False
    return (all(t.is_cpu and t.dtype == torch.float32 and t.is_contiguous() for t in tensors)
            and neuron_kernels_available())


def _cuda_kernel_applies(x: Tensor, tokens: int, weights: tuple[Tensor, ...],
                         scales: tuple[Tensor, ...], threshold) -> bool:
    """The Triton kernels (moefy/runtime/neuron_triton.py) run CUDA decode batches of
    float32 / bfloat16 / float16 whose weights (and bias) share ``x``'s dtype and device and
    are contiguous, with floating-point scales (a layer cast with ``.to(dtype)`` casts them
    too; the kernels read them as float32), a Python float threshold, nothing to
    differentiate and no autocast — unless a launch has failed in this process."""
    if (tokens > KERNEL_MAX_TOKENS or x.dtype not in _CUDA_DTYPES or not x.shape[-1]
            or _tracing(x) or not isinstance(threshold, float) or _TRITON_FAILED
            or torch.is_autocast_enabled("cuda")):
        return False
    return (all(t.device == x.device and t.dtype == x.dtype and t.is_contiguous()
                for t in weights)
            and all(t.device == x.device and t.is_floating_point() and t.is_contiguous()
                    for t in scales)
            and not _needs_grad(x, *weights, *scales) and _triton() is not None)


_CUDA_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_TRITON_FAILED = False  # set by the first launch that fails: the masked path from then on


def _on_cuda(kernel, *args):
    """``kernel(*args)`` (a Triton kernel's wrapper), or None after warning once where Triton
    cannot launch here (no compiler for its launcher, a driver it does not support): the
    caller then takes the masked path, as without triton."""
    global _TRITON_FAILED
    try:
        return kernel(*args)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - any launch failure: fall back, say so once
        _TRITON_FAILED = True
        warnings.warn(f"moefy: the Triton decode kernels failed to launch here "
                      f"({type(exc).__name__}: {first_line(exc)}); CUDA decode takes the "
                      "masked dense path from now on", RuntimeWarning, stacklevel=3)
        return None


@functools.cache
def _triton():
    """moefy.runtime.neuron_triton, or None where triton is not installed (the masked dense
    path then runs on CUDA)."""
    try:
        from moefy.runtime import neuron_triton
    except ImportError:
        return None
    return neuron_triton


def _needs_grad(*tensors: Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


# The checks below run on every decode call, where a microsecond is a few percent of a
# projection: plain size comparisons, and devices compared only when not all on the CPU.


def _check_devices(op: str, x: Tensor, named: tuple) -> None:
    if x.is_cpu and all(t is None or t.is_cpu for _, t in named):
        return
    for name, t in named:
        if t is not None and t.device != x.device:
            raise InputError(f"{op}: {name} is on {t.device} but x is on {x.device}")


def _check_linear(x, wt, scale, bias) -> None:
    if not isinstance(x, torch.Tensor):
        return  # an FX proxy: shapes unknown
    def fail(msg: str):
        raise InputError(f"sparse_input_linear: {msg}")

    xs, ws, ss = x.shape, wt.shape, scale.shape
    if len(ws) != 2:
        fail(f"wt must be the (K, N) transposed weight, got shape {tuple(ws)}")
    K, N = ws
    if not xs or xs[-1] != K:
        fail(f"x must be (…, K) with K = {K} (wt's rows), got shape {tuple(xs)}")
    if ss != (K,):
        fail(f"scale must be (K,) = ({K},), got shape {tuple(ss)}")
    if bias is not None and bias.shape != (N,):
        fail(f"bias must be (N,) = ({N},), got shape {tuple(bias.shape)}")
    _check_devices("sparse_input_linear", x, (("wt", wt), ("scale", scale), ("bias", bias)))


def _check_ffn(x, g, w_up, b_up, w_down_t, coef) -> None:
    if not isinstance(x, torch.Tensor):
        return  # an FX proxy: shapes unknown
    def fail(msg: str):
        raise InputError(f"neuron_ffn: {msg}")

    xs, gs, ds = x.shape, g.shape, w_down_t.shape
    if len(ds) != 2:
        fail(f"w_down_t must be the (F, O) transposed down weight, got shape {tuple(ds)}")
    F_ = ds[0]
    if not xs:
        fail("x must be (…, H), got a scalar")
    if gs != xs[:-1] + (F_,):
        fail(f"g must be (…, F) = {tuple(xs[:-1]) + (F_,)} (x's leading shape, F = "
             f"w_down_t's rows), got shape {tuple(gs)}")
    if coef.shape != (F_,):
        fail(f"coef must be (F,) = ({F_},), got shape {tuple(coef.shape)}")
    if w_up is not None and w_up.shape != (F_, xs[-1]):
        fail(f"w_up must be (F, H) = ({F_}, {xs[-1]}), got shape {tuple(w_up.shape)}")
    if b_up is not None:
        if w_up is None:
            fail("b_up is the up projection's bias: it needs w_up")
        if b_up.shape != (F_,):
            fail(f"b_up must be (F,) = ({F_},), got shape {tuple(b_up.shape)}")
    _check_devices("neuron_ffn", x, (("g", g), ("w_up", w_up), ("b_up", b_up),
                                     ("w_down_t", w_down_t), ("coef", coef)))


# --------------------------------------------------------------------------- PyTorch paths


def _masked_input_linear(x: Tensor, wt: Tensor, scale: Tensor, threshold: float | Tensor,
                         bias: Tensor | None) -> Tensor:
    if isinstance(threshold, float) and threshold < 0:  # every channel kept: no mask to apply
        y = x @ wt
        return y if bias is None else y + bias
    if (isinstance(threshold, float) and x.is_cpu and x.dtype == torch.float32
            and scale.dtype == torch.float32 and x.is_contiguous() and not _tracing(x)
            and not _needs_grad(x, wt, scale, bias) and neuron_kernels_available()):
        # prefill: the selection in one pass (four elementwise ops in eager PyTorch cost a
        # prefill ~15% over dense on SmolLM2), then one GEMM, the bias fused into it
        xs = _prefill_mask(x, scale, threshold)
        flat = xs.reshape(math.prod(x.shape[:-1]), wt.shape[0])
        y = torch.mm(flat, wt) if bias is None else torch.addmm(bias, flat, wt)
        return y.reshape(*x.shape[:-1], wt.shape[1])
    keep = ~(x.abs() * scale <= threshold)  # (…, K); a NaN score keeps its entry
    y = torch.where(keep, x, 0.0) @ wt  # (…, N)
    return y if bias is None else y + bias


def _masked_neuron_ffn(x: Tensor, g: Tensor, w_up: Tensor | None, b_up: Tensor | None,
                       w_down_t: Tensor, coef: Tensor, threshold: float | Tensor,
                       act: Activation) -> Tensor:
    a = act.fn(g)  # (…, F)
    keep = ~(a.abs() * coef <= threshold)  # a NaN score keeps its neuron
    if w_up is not None:
        u = x @ w_up.T  # (…, F)
        if b_up is not None:
            u = u + b_up
        a = a * u
    return torch.where(keep, a, 0.0) @ w_down_t  # (…, O)
