"""nn.Modules: the MoE layer, its always-on part, the PEER layer and the single-neuron
layers (NeuronFFN, SparseLinear); routers (pure
functions), each layer's ConversionRecord, the shard a layer declares under expert
parallelism, and hash routing's token-id hooks.

May import: ``moefy.runtime`` (which chooses the kernels) and the ground floor only.
"""

from moefy.layers.moe import MoE, SharedExperts
from moefy.layers.neuron import NeuronFFN, SparseLinear
from moefy.layers.peer import PEER, PEERRoute

__all__ = ["MoE", "NeuronFFN", "PEER", "PEERRoute", "SharedExperts", "SparseLinear"]
