"""The paper's multi-rank queue: every rank holds the same full queue.

Each rank computes the loss of its local batch against the queue, then the
class weights and labels of every rank are all-gathered, padded to the agreed
capacity (dcq_ops.parallel.strategy), and the valid rows are enqueued on every
rank in rank order (dcq_ops.parallel.padded), so the queues stay identical.
This equals one process running the concatenated batch: the same queue after
every step, the same per-row losses and per-row gradients (see
QueueStrategy.reduce for the "mean" over uneven batches). A steady-state step
issues three all-gathers (header, labels, class weights) and no host read.
"""

from __future__ import annotations

from dcq_ops.parallel.collectives import gather_padded
from dcq_ops.parallel.padded import enqueue_padded
from dcq_ops.parallel.strategy import Batch, HeaderExchangeQueue


class GatheredQueue(HeaderExchangeQueue):
    mode = "gathered"

    def loss_rows(self, batch: Batch, kernels):
        if batch.placeholder:  # no rows of its own: the loss needs no communication here
            return batch.embeddings.new_zeros((0,), dtype=batch.embeddings.dtype)
        return kernels(batch.embeddings, batch.class_weights, batch.labels, self.queue.weights, self.queue.labels)

    def enqueue(self, batch: Batch) -> None:
        queue, capacity = self.queue, batch.capacity
        class_weights = gather_padded(batch.class_weights, capacity, self.group, batch.world)
        labels = gather_padded(batch.labels, capacity, self.group, batch.world, fill=-1)
        enqueue_padded(queue.weights, queue.labels, queue.ptr, start=0, queue_size=queue.queue_size,
                       class_weights=class_weights, class_labels=labels, counts=batch.counts, capacity=capacity,
                       bad_reasons=batch.bad_reasons)
