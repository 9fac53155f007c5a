"""The sparse-dispatch runtime: sort by expert → grouped GEMM → weighted combine.

``moefy.runtime.expert_ffn`` is the routed-experts operator (``torch.ops.moefy.expert_ffn``);
``reference_ffn`` is the naive per-token oracle it is tested against; ``Session`` runs an
exported model in ONNX Runtime; ``expert_parallel`` shards a model's experts over the ranks of
a ``torch.distributed`` process group.
"""

from moefy.runtime.experts import ExpertWeights
from moefy.runtime.ops import expert_ffn
from moefy.runtime.parallel import expert_parallel
from moefy.runtime.reference import reference_ffn
from moefy.runtime.session import Session

__all__ = ["ExpertWeights", "Session", "expert_ffn", "expert_parallel", "reference_ffn"]
