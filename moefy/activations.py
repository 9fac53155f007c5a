"""Activation functions an expert may use, by name.

Each entry knows its plain PyTorch form and, where oneDNN can fuse it into a GEMM, the
post-op that does so (the CPU fast path in ``moefy.runtime`` uses that).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x).square()


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _quick_gelu_grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(1.702 * x)
    return g * (s + 1.702 * x * s * (1 - s))


_aten = torch.ops.aten


@dataclass(frozen=True)
class Activation:
    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    # grad(grad_output, x) -> grad_input, for hand-written backward passes.
    grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    # oneDNN linear post-op (attr, algorithm) that computes fn fused into the GEMM, or None.
    onednn: tuple[str, str] | None


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("relu", torch.relu, lambda g, x: g * (x > 0), ("relu", "")),
        Activation("gelu", F.gelu,  # erf form
                   lambda g, x: _aten.gelu_backward(g, x, approximate="none"), ("gelu", "none")),
        Activation("gelu_tanh", lambda x: F.gelu(x, approximate="tanh"),
                   lambda g, x: _aten.gelu_backward(g, x, approximate="tanh"), ("gelu", "tanh")),
        Activation("silu", F.silu, _aten.silu_backward, ("swish", "")),
        Activation("squared_relu", _squared_relu, lambda g, x: g * 2 * torch.relu(x), None),
        Activation("quick_gelu", _quick_gelu, _quick_gelu_grad, None),
        # x · relu6(x + 3) / 6 (MobileNetV3, some vision FFNs); oneDNN fuses it as a post-op
        Activation("hardswish", F.hardswish, _aten.hardswish_backward, ("hardswish", "")),
    )
}
_ALIASES = {"swish": "silu", "relu2": "squared_relu", "gelu_new": "gelu_tanh",
            "gelu_pytorch_tanh": "gelu_tanh"}


def custom_activation(fn: Callable[[torch.Tensor], torch.Tensor]) -> Activation:
    """An element-wise function that no named activation matches (e.g. a subgraph found
    between an FFN's projections), as an ``Activation``: its gradient comes from autograd,
    no oneDNN post-op fuses it, and no ONNX lowering names it."""

    def grad(g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            return torch.autograd.grad(fn(x), x, g)[0]

    return Activation("custom", fn, grad, None)


def get_activation(name) -> Activation:
    """Return the activation called ``name`` (or one of its common aliases); an
    ``Activation`` is returned as it is, and a callable (an element-wise ``nn.Module``)
    becomes a custom activation.

    >>> get_activation("silu").fn(torch.zeros(1))
    tensor([0.])
    """
    if isinstance(name, Activation):
        return name
    if callable(name):
        return custom_activation(name)
    key = _ALIASES.get(name, name)
    if key not in ACTIVATIONS:
        known = ", ".join(sorted(ACTIVATIONS))
        raise ValueError(f"unknown activation {name!r}; expected one of: {known}")
    return ACTIVATIONS[key]
