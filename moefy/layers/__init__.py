"""nn.Modules: the MoE layer, its always-on part, and the PEER layer."""

from moefy.layers.moe import MoE, SharedExperts
from moefy.layers.peer import PEER, PEERRoute

__all__ = ["MoE", "PEER", "PEERRoute", "SharedExperts"]
