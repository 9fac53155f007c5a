"""The input checks every moefy layer makes before it computes anything."""

from __future__ import annotations

import torch

from moefy.errors import InputError


def check_layer_input(x, hidden_size: int, weight: torch.Tensor, layer: str, var: str) -> None:
    """``x`` must be a (..., hidden_size) tensor of ``weight``'s dtype and device, and a layer
    whose weights are inference tensors cannot run in grad mode. ``layer`` names the layer in
    messages ("MoE"), ``var`` the variable in the suggested fix ("moe")."""
    if not isinstance(x, torch.Tensor):
        raise InputError(f"{layer} expects a tensor of shape (..., {hidden_size}), got "
                         f"{type(x).__name__}")
    if x.dim() == 0 or x.shape[-1] != hidden_size:
        raise InputError(
            f"{layer} expects input of shape (..., {hidden_size}), got {tuple(x.shape)}")
    if x.dtype != weight.dtype:
        fix = (f"cast the input (x.to({weight.dtype})) or the layer ({var}.to({x.dtype}))"
               if x.is_floating_point() else
               f"pass floating-point input (x.to({weight.dtype}))")
        raise InputError(f"{layer}: input is {x.dtype} but the layer's weights are "
                         f"{weight.dtype}; {fix}")
    if x.device != weight.device and weight.device.type != "meta":
        raise InputError(f"{layer}: input is on {x.device} but the layer is on {weight.device}; "
                         f"move one of them ({var}.to({str(x.device)!r}))")
    # one check per forward, not a walk over the parameters: they are made together
    if torch.is_grad_enabled() and not torch.compiler.is_compiling() and (
            weight.requires_grad and weight.is_inference()):
        raise InputError(
            f"{layer}: this layer's weights were created under torch.inference_mode() and "
            "cannot take part in autograd; call it under torch.no_grad() or "
            "torch.inference_mode(), or rebuild it outside inference mode")
