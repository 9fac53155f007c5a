"""The sparse-dispatch runtime: sort by expert → grouped GEMM → weighted combine.

``moefy.runtime.expert_ffn`` is the routed-experts operator (``torch.ops.moefy.expert_ffn``);
``reference_ffn`` is the naive per-token oracle it is tested against.
"""

from moefy.runtime.experts import ExpertWeights
from moefy.runtime.ops import expert_ffn
from moefy.runtime.reference import reference_ffn

__all__ = ["ExpertWeights", "expert_ffn", "reference_ffn"]
