"""What a layer declares about expert parallelism: ``MoE.shard`` is None, or an object that
runs the layer's routed experts across ranks (``moefy.distributed.shard.Shard``).

    MoE.routed(x, w, i) ─ shard is None or one rank ─→ MoE.run_experts (this process's kernels)
                        └ sharded ─→ shard.routed(moe, x, w, i) → exchange → owners'
                                     run_experts → back

The layers floor only states the protocol; the distributed floor implements it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from moefy.layers.moe import MoE


class ExpertShard(Protocol):
    """This rank's block [start, stop) of a layer's routed experts, and how to run them."""

    group: object
    data_group: object
    rank: int
    world: int
    bounds: tuple[int, ...]

    def routed(self, moe: MoE, x: torch.Tensor, weights: torch.Tensor,
               indices: torch.Tensor) -> torch.Tensor: ...

    def reduce_load(self, load: torch.Tensor) -> None: ...


def sharded_layers(model: nn.Module) -> list[nn.Module]:
    """The layers of ``model`` whose experts are sharded over ranks."""
    return [m for m in model.modules() if getattr(m, "shard", None) is not None]


def refuse_sharded(model: nn.Module, what: str, error: type[Exception],
                   advice: str | None = None) -> None:
    """Raise ``error`` when ``model`` holds expert-parallel layers: each rank has only its
    own experts, and treating them as the model would be silently wrong."""
    sharded = [name or "the layer" for name, m in model.named_modules()
               if getattr(m, "shard", None) is not None]
    if sharded:
        raise error(
            f"{what}: {', '.join(sharded[:4])} {'is' if len(sharded) == 1 else 'are'} sharded "
            "by moefy.distributed.expert_parallel (this rank holds only its own experts); "
            + (advice or f"{what} the model before sharding it, or moefy.save it (every rank "
                         "together: it gathers the experts) and load it in one process"))
