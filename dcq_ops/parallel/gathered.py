"""The paper's multi-rank queue: every rank holds the same full queue.

Each rank computes the loss of its local batch against the queue, then the
class weights and labels of every rank are all-gathered (rank 0's rows first)
and enqueued on every rank, so the queues stay identical. This equals one
process running the concatenated batch: the same queue after every step, the
same per-row losses and per-row gradients (see QueueStrategy.reduce for the
"mean" over uneven batches).
"""

from __future__ import annotations

from dcq_ops.parallel.collectives import gather_rows
from dcq_ops.parallel.strategy import Batch, HeaderExchangeQueue


class GatheredQueue(HeaderExchangeQueue):
    mode = "gathered"

    def loss_rows(self, batch: Batch, kernels):
        return kernels(batch.embeddings, batch.class_weights, batch.labels, self.queue.weights, self.queue.labels)

    def enqueue(self, batch: Batch) -> None:
        class_weights = gather_rows(batch.class_weights, batch.sizes, self.group)
        labels = gather_rows(batch.labels, batch.sizes, self.group, fill=-1)
        self.queue.enqueue(class_weights, labels)
