"""The sparse-dispatch runtime: sort by expert → grouped GEMM → weighted combine.

``moefy.runtime.expert_ffn`` is the routed-experts operator (``torch.ops.moefy.expert_ffn``);
``reference_ffn`` is the naive per-token oracle it is tested against; ``Session`` runs an
exported model in ONNX Runtime. The runtime chooses kernels (CPU, CUDA, oneDNN, the C++ decode
and PEER kernels) for the layers above it.

May import: the ground floor only (``moefy.config``, ``moefy.errors``, ``moefy.activations``).
Expert parallelism, which works on whole models, lives in ``moefy.distributed``.
"""

from moefy.runtime.experts import ExpertWeights
from moefy.runtime.ops import expert_ffn
from moefy.runtime.reference import reference_ffn
from moefy.runtime.session import Session

__all__ = ["ExpertWeights", "Session", "expert_ffn", "reference_ffn"]
