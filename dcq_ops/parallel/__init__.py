"""How DCQLoss shares its queue between ranks of torch.distributed: three
strategies behind one interface (dcq_ops.parallel.strategy), and MoCo's
shuffle-BN for the weight generator. See docs/distributed.md.

- ``LocalQueue`` ("none"): one process, its own queue;
- ``GatheredQueue`` ("gathered", the paper's): every rank holds the same queue;
- ``ShardedQueue`` ("sharded"): one global queue split across the ranks.

A multi-rank step reads nothing on the host in steady state (strategy.py says how);
``collectives.traffic()`` counts the bytes its collectives send.
"""

from dcq_ops.parallel.collectives import DistributedInputError, world_size_and_rank
from dcq_ops.parallel.gathered import GatheredQueue
from dcq_ops.parallel.local import LocalQueue
from dcq_ops.parallel.sharded import ShardedClassQueue, ShardedQueue, gather_queue, make_sharded_queue, shard_range
from dcq_ops.parallel.queue_state import (assemble_queue_state, block_state, gather_queue_state, is_block_state,
                                          queue_layout)
from dcq_ops.parallel.shuffle_bn import shuffle_permutation, shuffle_seed, shuffled_forward
from dcq_ops.parallel.strategy import MODES, Batch, QueueStrategy, check_mode, reserve_batch_capacity, resolve_mode

STRATEGIES = {"none": LocalQueue, "gathered": GatheredQueue, "sharded": ShardedQueue}

__all__ = [
    "MODES", "STRATEGIES", "Batch", "DistributedInputError", "GatheredQueue", "LocalQueue", "QueueStrategy",
    "ShardedClassQueue", "ShardedQueue", "assemble_queue_state", "block_state", "check_mode", "gather_queue",
    "gather_queue_state", "is_block_state", "make_sharded_queue", "queue_layout", "reserve_batch_capacity",
    "resolve_mode", "shard_range",
    "shuffle_permutation", "shuffle_seed", "shuffled_forward", "world_size_and_rank",
]
