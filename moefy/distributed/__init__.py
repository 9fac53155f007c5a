"""Expert parallelism on ``torch.distributed`` (a use of a converted model): sharding, the
token exchange, gradient sync, agreement between ranks, and sharded checkpoints.

May import: ``moefy.io`` and every floor below it (never ``moefy.cli``).

``expert_parallel`` shards a model's experts over the ranks of a process group;
``reduce_gradients`` sums the replicated parts' gradients after each backward;
``load_sharded`` reads a ``moefy.save`` folder back, each rank only its own experts.
"""

from moefy.distributed.checkpoint import load_sharded
from moefy.distributed.grads import reduce_gradients
from moefy.distributed.shard import expert_parallel

__all__ = ["expert_parallel", "load_sharded", "reduce_gradients"]
