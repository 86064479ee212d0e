"""The queue of one process: DCQLoss's strategy without torch.distributed."""

from __future__ import annotations

from dcq_ops.parallel.strategy import Batch, QueueStrategy


class LocalQueue(QueueStrategy):
    """Every process on its own: its batch against its own queue, no communication."""

    mode = "none"

    def exchange(self, embeddings, prepare, *, training: bool, reasons=None, eager: bool = False) -> Batch:
        labels, class_weights = prepare()
        batch = Batch(embeddings, labels, class_weights, sizes=[embeddings.shape[0]], training=training)
        if reasons is not None:
            batch.bad_reasons = batch.rank_reasons = reasons(embeddings, labels, class_weights)
        return batch

    def loss_rows(self, batch: Batch, kernels):
        return kernels(batch.embeddings, batch.class_weights, batch.labels, self.queue.weights, self.queue.labels)

    def enqueue(self, batch: Batch) -> None:
        self.queue.enqueue(batch.class_weights, batch.labels, batch.bad_reasons)
