"""CUDA decode kernels (Triton) for single-neuron and input-channel sparsity: the same
selection as ``moefy.runtime.neuron``'s C++ CPU kernels, reading only the weight rows a token
uses.

    sparse_input_linear(x (T, K), wt (K, N), scale (K), threshold) -> (T, N)
        y[t] = Σ_{j : |x[t, j]|·scale[j] > threshold} x[t, j]·wt[j, :]
    neuron_ffn(x (T, H), g (T, F), w_up (F, H)?, b_up (F)?, w_down_t (F, O), coef (F),
               threshold, activation) -> (T, O)
        a = act(g); kept (t, i): |a[t, i]|·coef[i] > threshold
        y[t] = Σ_kept a[t, i]·u[t, i]·w_down_t[i, :],  u = w_up[i]·x[t] + b_up[i] (or 1)

Layout: a program owns one token and one tile of rows (input channels, or neurons) and loops
over the output columns; a row it does not keep is never loaded (its loads are masked off, so
no memory transaction is issued for it), and a kept row is read as contiguous segments. Each
program writes its partial sums to its own slice of a float32 buffer (rows tiles, T, N),
which one ``sum`` reduces: no atomics, so results are reproducible (the buffer is T/16 of
the weight's bf16 bytes per row tile of 32: small at decode sizes). Accumulation is float32
for float32, bfloat16 and float16 weights. The selection is PyTorch's: the activation rounded
to g's dtype, the score ``|v|·scale`` computed in the dtype PyTorch computes it in (float32
unless both are half precision) and compared with the threshold rounded to it; a NaN score
keeps its entry.

Importing this module needs ``triton``; ``moefy.runtime.neuron`` imports it only for CUDA
tensors (``available()``). On a machine without a GPU the kernels run under Triton's
interpreter (``TRITON_INTERPRET=1`` before this module is imported), which is how the tests
check them against the definition.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
# the activations _act computes, by the code it takes (the names of moefy.activations)
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3, "squared_relu": 4,
                    "quick_gelu": 5, "hardswish": 6}
ROWS = 32  # rows (input channels, neurons) per program
COLS = 128  # output columns per inner step
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _act(v, ACT: tl.constexpr):
    # codes: ACTIVATION_CODES
    if ACT == 0:  # relu
        out = tl.maximum(v, 0.0)
    elif ACT == 1:  # gelu (erf)
        out = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 2:  # gelu_tanh: tanh(z) = 2·sigmoid(2z) - 1
        z = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        out = 0.5 * v * (2.0 * tl.sigmoid(2.0 * z))
    elif ACT == 3:  # silu
        out = v * tl.sigmoid(v)
    elif ACT == 4:  # squared_relu
        r = tl.maximum(v, 0.0)
        out = r * r
    elif ACT == 5:  # quick_gelu
        out = v * tl.sigmoid(1.702 * v)
    else:  # hardswish
        out = v * tl.minimum(tl.maximum(v + 3.0, 0.0), 6.0) / 6.0
    return out


@triton.jit
def _sparse_input_linear_kernel(x_ptr, wt_ptr, scale_ptr, out_ptr, K, N, threshold,
                                ROUND: tl.constexpr, ROWS_: tl.constexpr,
                                COLS_: tl.constexpr):
    tile = tl.program_id(0)
    t = tl.program_id(1)
    T = tl.num_programs(1)
    rows = tile * ROWS_ + tl.arange(0, ROWS_)
    inside = rows < K
    xv = tl.load(x_ptr + t * K + rows, mask=inside, other=0.0).to(tl.float32)
    s = tl.load(scale_ptr + rows, mask=inside, other=0.0).to(tl.float32)
    score = tl.abs(xv) * s
    if ROUND:  # PyTorch computes the score in x's (half-precision) dtype: round as it does
        score = score.to(x_ptr.dtype.element_ty).to(tl.float32)
    keep = inside & ~(score <= threshold)  # a NaN score keeps its channel
    coef = tl.where(keep, xv, 0.0)
    for c0 in range(0, N, COLS_):
        cols = c0 + tl.arange(0, COLS_)
        w = tl.load(wt_ptr + rows[:, None] * N + cols[None, :],
                    mask=keep[:, None] & (cols[None, :] < N), other=0.0).to(tl.float32)
        part = tl.sum(coef[:, None] * w, axis=0)
        tl.store(out_ptr + (tile * T + t) * N + cols, part, mask=cols < N)


@triton.jit
def _neuron_ffn_kernel(x_ptr, g_ptr, w_up_ptr, b_up_ptr, w_down_ptr, coef_ptr, out_ptr,
                       H, F, O, threshold, ACT: tl.constexpr, HAS_UP: tl.constexpr,
                       HAS_B_UP: tl.constexpr, ROUND: tl.constexpr, ROWS_: tl.constexpr,
                       COLS_: tl.constexpr):
    tile = tl.program_id(0)
    t = tl.program_id(1)
    T = tl.num_programs(1)
    rows = tile * ROWS_ + tl.arange(0, ROWS_)
    inside = rows < F
    a = _act(tl.load(g_ptr + t * F + rows, mask=inside, other=0.0).to(tl.float32), ACT)
    # as PyTorch's act(g) in g's dtype: rounded to it (a no-op in float32)
    a = a.to(g_ptr.dtype.element_ty).to(tl.float32)
    c = tl.load(coef_ptr + rows, mask=inside, other=0.0).to(tl.float32)
    score = tl.abs(a) * c
    if ROUND:
        score = score.to(g_ptr.dtype.element_ty).to(tl.float32)
    keep = inside & ~(score <= threshold)  # a NaN score keeps its neuron
    coef = a
    if HAS_UP:
        u = tl.zeros((ROWS_,), dtype=tl.float32)
        for h0 in range(0, H, COLS_):
            cols = h0 + tl.arange(0, COLS_)
            xv = tl.load(x_ptr + t * H + cols, mask=cols < H, other=0.0).to(tl.float32)
            w = tl.load(w_up_ptr + rows[:, None] * H + cols[None, :],
                        mask=keep[:, None] & (cols[None, :] < H), other=0.0).to(tl.float32)
            u += tl.sum(w * xv[None, :], axis=1)
        if HAS_B_UP:
            u += tl.load(b_up_ptr + rows, mask=keep, other=0.0).to(tl.float32)
        coef = a * u
    coef = tl.where(keep, coef, 0.0)  # a dropped neuron contributes nothing (never inf · 0)
    for o0 in range(0, O, COLS_):
        cols = o0 + tl.arange(0, COLS_)
        w = tl.load(w_down_ptr + rows[:, None] * O + cols[None, :],
                    mask=keep[:, None] & (cols[None, :] < O), other=0.0).to(tl.float32)
        part = tl.sum(coef[:, None] * w, axis=0)
        tl.store(out_ptr + (tile * T + t) * O + cols, part, mask=cols < O)


def sparse_input_linear(x: Tensor, wt: Tensor, scale: Tensor, threshold: float) -> Tensor:
    """``x`` (T, K) contiguous, ``wt`` (K, N) contiguous of ``x``'s dtype, ``scale`` (K)
    float32, on one device: (T, N) in ``x``'s dtype (the caller adds a bias)."""
    T, K = x.shape
    N = wt.shape[1]
    tiles = triton.cdiv(K, ROWS)
    part = torch.empty(tiles, T, N, dtype=torch.float32, device=x.device)
    round_, threshold = _score_dtype(x.dtype, scale.dtype, threshold)
    if T and tiles and N:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _sparse_input_linear_kernel[(tiles, T)](x, wt, scale, part, K, N, threshold,
                                                    ROUND=round_, ROWS_=ROWS, COLS_=COLS)
    return part.sum(0).to(x.dtype)


def neuron_ffn(x: Tensor, g: Tensor, w_up: Tensor | None, b_up: Tensor | None,
               w_down_t: Tensor, coef: Tensor, threshold: float, activation: str) -> Tensor:
    """``x`` (T, H), ``g`` (T, F), ``w_up`` (F, H)?, ``b_up`` (F)?, ``w_down_t`` (F, O), all
    contiguous, of one dtype and device, ``coef`` (F) float32: (T, O) in ``x``'s dtype."""
    T, H = x.shape
    F_, O = w_down_t.shape
    tiles = triton.cdiv(F_, ROWS)
    part = torch.empty(tiles, T, O, dtype=torch.float32, device=x.device)
    round_, threshold = _score_dtype(g.dtype, coef.dtype, threshold)
    if T and tiles and O:
        with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            _neuron_ffn_kernel[(tiles, T)](
                x, g, w_up if w_up is not None else x, b_up if b_up is not None else x,
                w_down_t, coef, part, H, F_, O, threshold, ACT=ACTIVATION_CODES[activation],
                HAS_UP=w_up is not None, HAS_B_UP=b_up is not None, ROUND=round_, ROWS_=ROWS,
                COLS_=COLS)
    return part.sum(0).to(x.dtype)


def _score_dtype(values: torch.dtype, scales: torch.dtype,
                 threshold: float) -> tuple[bool, float]:
    """Where PyTorch's ``values.abs() * scale <= threshold`` computes in a half-precision
    dtype (values and scales both half precision), the kernels round the score, and the
    threshold, to it as PyTorch does; with a float32 scale it computes in float32 and the
    threshold is rounded to float32. Returns (round the score?, the threshold to compare)."""
    dtype = torch.promote_types(values, scales)
    return dtype != torch.float32, float(torch.tensor(threshold, dtype=dtype))
