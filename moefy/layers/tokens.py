"""Token ids for hash routers: a converted model's forward hands its ``input_ids`` to its
hash-routed layers.

    model(input_ids, ...) → TokenIdsIn (pre-hook) pushes the ids → each hash-routed MoE reads
    them (``current_token_ids``) → TokenIdsOut (post-hook, always called) pops them

A context variable holds a stack of ids, so threads and nested models never see each other's
ids, and nothing stays behind on any module. The hooks are recognised by their type.
"""

from __future__ import annotations

import contextvars

import torch
import torch.nn as nn

from moefy.errors import ConversionError

_TOKEN_IDS: contextvars.ContextVar[tuple[torch.Tensor, ...]] = contextvars.ContextVar(
    "moefy_token_ids", default=())


def push_token_ids(ids: torch.Tensor) -> None:
    """Make ``ids`` the token ids that hash-routed MoE layers read until ``pop_token_ids``."""
    _TOKEN_IDS.set((*_TOKEN_IDS.get(), ids))


def pop_token_ids() -> None:
    _TOKEN_IDS.set(_TOKEN_IDS.get()[:-1])


def current_token_ids() -> torch.Tensor | None:
    stack = _TOKEN_IDS.get()
    return stack[-1] if stack else None


def token_ids(args: tuple, kwargs: dict) -> torch.Tensor:
    """A hash-routed model's token ids: ``input_ids``, else its first tensor argument."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.is_complex():
        raise ConversionError(
            "router='hash' routes by token id: the model must be called with input_ids (an "
            "integer tensor, as a keyword or its first argument); got "
            f"{getattr(ids, 'dtype', type(ids).__name__)}. Use another router for models "
            "without token ids.")
    return ids


class TokenIdsIn:
    """Forward pre-hook: the call's token ids become those its hash-routed layers read."""

    def __call__(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        push_token_ids(token_ids(args, kwargs))


class TokenIdsOut:
    """Forward hook (also called when the forward raises): the ids pushed before are popped."""

    def __call__(self, model: nn.Module, args: tuple, output) -> None:
        pop_token_ids()


def install_token_hooks(model: nn.Module) -> None:
    """Hand ``model``'s token ids to its hash-routed layers on every forward."""
    model.register_forward_pre_hook(TokenIdsIn(), with_kwargs=True)
    model.register_forward_hook(TokenIdsOut(), always_call=True)


def has_token_hooks(model: nn.Module) -> bool:
    return any(isinstance(h, TokenIdsIn) for h in model._forward_pre_hooks.values())


def remove_token_hooks(model: nn.Module) -> None:
    for hooks in (model._forward_pre_hooks, model._forward_hooks):
        for key, hook in list(hooks.items()):
            if isinstance(hook, (TokenIdsIn, TokenIdsOut)):
                del hooks[key]
