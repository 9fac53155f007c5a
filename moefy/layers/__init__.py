"""nn.Modules: the MoE layer, its always-on part and activations."""

from moefy.layers.moe import MoE, SharedExperts

__all__ = ["MoE", "SharedExperts"]
