"""How DCQLoss shares its queue between ranks of torch.distributed: three
strategies behind one interface (dcq_ops.parallel.strategy), and MoCo's
shuffle-BN for the weight generator. See docs/distributed.md.

- ``LocalQueue`` ("none"): one process, its own queue;
- ``GatheredQueue`` ("gathered", the paper's): every rank holds the same queue;
- ``ShardedQueue`` ("sharded"): one global queue split across the ranks.
"""

from dcq_ops.parallel.collectives import DistributedInputError, world_size_and_rank
from dcq_ops.parallel.gathered import GatheredQueue
from dcq_ops.parallel.local import LocalQueue
from dcq_ops.parallel.sharded import ShardedClassQueue, ShardedQueue, gather_queue, make_sharded_queue, shard_range
from dcq_ops.parallel.shuffle_bn import shuffled_forward
from dcq_ops.parallel.strategy import MODES, Batch, QueueStrategy, check_mode, resolve_mode

STRATEGIES = {"none": LocalQueue, "gathered": GatheredQueue, "sharded": ShardedQueue}

__all__ = [
    "MODES", "STRATEGIES", "Batch", "DistributedInputError", "GatheredQueue", "LocalQueue", "QueueStrategy",
    "ShardedClassQueue", "ShardedQueue", "check_mode", "gather_queue", "make_sharded_queue", "resolve_mode",
    "shard_range", "shuffled_forward", "world_size_and_rank",
]
