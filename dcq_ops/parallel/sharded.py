"""One global FIFO queue split across ranks: for queues too large for one GPU.

Rank r holds global slots ``[start_r, stop_r)`` (``shard_range``: contiguous
blocks in rank order, sizes differing by at most one), so the shards
concatenated in rank order are the unsharded queue. Every rank keeps the same
global write pointer; an enqueue of the gathered batch of B keys writes global
slots ``(ptr + t) % K``, each rank only those in its block - exactly what the
unsharded queue does.

The loss is the loss algebra of docs/loss.md spread over the ranks: the
embeddings (and labels) of all ranks are all-gathered ([N_total, D], small);
each rank computes the partials (row max, row sum, gradient accumulator) of
every row over its own shard with the fused kernels; the maxima are combined
by an all-reduce(MAX), the rescaled sums and accumulators by a
reduce-scatter(SUM) that delivers each rank its own rows only; then each rank
finalises its rows. No N x K tensor is ever communicated, and the gradient is
computed in the forward, so the backward communicates nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from dcq_ops.ops.fused_autograd import rows_with_gradient
from dcq_ops.backends import enqueue_function
from dcq_ops.parallel.collectives import (gather_padded, gather_rows, initialized, reduce_scatter_single, trim,
                                          world_size_and_rank)
from dcq_ops.parallel.strategy import Batch, HeaderExchangeQueue
from dcq_ops.queue import ClassQueue, check_queue_state


def shard_range(queue_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """The global slots ``[start, stop)`` that ``rank`` holds of a queue of ``queue_size``
    slots split over ``world_size`` ranks: contiguous blocks in rank order, the first
    ``queue_size % world_size`` blocks one slot larger."""
    for name, value in (("queue_size", queue_size), ("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if queue_size < world_size:
        raise ValueError(f"a sharded queue needs at least one slot per rank: queue_size must be >= world_size "
                         f"= {world_size}, got {queue_size}")
    base, extra = divmod(queue_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedClassQueue(ClassQueue):
    """This rank's block of a global FIFO queue of ``queue_size`` slots.

    ``weights``/``labels`` hold global slots ``[start, stop)`` (``shard_range``);
    ``ptr`` is the *global* write pointer, the same on every rank. ``enqueue`` takes
    the global (all-gathered, identical on every rank) batch and writes the class
    weights whose slots fall in this block. ``state_dict`` holds this rank's block:
    save and load it per rank (or use ``gather_queue`` / ``load_global_``).

    Parameters
    ----------
    queue_size : int
        K, the number of slots of the global queue.
    dim : int
        D, the width of a class weight.
    world_size, rank : int
        The ranks the queue is split over, and this one.
    dtype, device, persistent
        As ClassQueue.
    """

    def __init__(self, queue_size: int, dim: int, *, world_size: int, rank: int,
                 dtype: torch.dtype = torch.float32, device=None, persistent: bool = True):
        self.start, self.stop = shard_range(queue_size, world_size, rank)
        self.global_queue_size = queue_size
        super().__init__(queue_size, dim, dtype=dtype, device=device, persistent=persistent)
        self.world_size = world_size
        self.rank = rank

    _size_words = "the global queue size"  # an enqueue takes the global (gathered) batch

    def _local_slots(self, queue_size: int) -> int:
        return self.stop - self.start

    @property
    def queue_size(self) -> int:
        """K, the number of slots of the global queue (the pointer counts modulo K)."""
        return self.global_queue_size

    @property
    def shard_size(self) -> int:
        """The number of slots this rank holds (``stop - start``)."""
        return self.weights.shape[0]

    def extra_repr(self) -> str:
        return (f"queue_size={self.queue_size}, block=[{self.start}, {self.stop}) of rank {self.rank}/"
                f"{self.world_size}, dim={self.dim}, dtype={self.weights.dtype}")

    @torch.no_grad()
    def enqueue(self, class_weights: torch.Tensor, labels: torch.Tensor, bad_reasons: torch.Tensor | None = None, *,
                ptr: int | None = None) -> None:
        """Enqueue the global batch (the same on every rank; no communication here).

        Parameters
        ----------
        class_weights, labels, bad_reasons
            As ClassQueue.enqueue, for the global batch.
        ptr : int, optional
            The global pointer if the caller knows it on the host already; otherwise it
            is read from the device (one host sync).
        """
        self.check_enqueue(class_weights, labels)
        size, batch = self.queue_size, class_weights.shape[0]
        head = int(self.ptr.item()) if ptr is None else ptr
        keys, labels = class_weights.detach(), labels.long()
        # The global slots written are [head, head + batch) modulo size: at most two
        # runs, [head, min(head + batch, size)) and, on wrap-around, [0, head + batch - size).
        runs = [(head, min(head + batch, size), 0)]
        if head + batch > size:
            runs.append((0, head + batch - size, size - head))
        enqueue = enqueue_function(self.weights.device)
        for first, last, key_offset in runs:
            lo, hi = max(first, self.start), min(last, self.stop)
            if lo >= hi:
                continue
            scratch_ptr = torch.zeros(1, dtype=torch.long, device=self.weights.device)
            src = key_offset + lo - first
            # The same enqueue op as the unsharded queue, on the block's rows [lo, hi).
            enqueue(self.weights.narrow(0, lo - self.start, hi - lo), self.labels.narrow(0, lo - self.start, hi - lo),
                    scratch_ptr, keys[src:src + hi - lo], labels[src:src + hi - lo], bad_reasons)
        advance = batch if bad_reasons is None else batch * (bad_reasons.view(1) == 0)
        self.ptr.add_(advance).remainder_(size)

    @torch.no_grad()
    def load_global_(self, weights: torch.Tensor, labels: torch.Tensor, ptr) -> None:
        """Set this block from a full (unsharded) queue state.

        Parameters
        ----------
        weights : torch.Tensor
            [K, D], the global queue's weights.
        labels : torch.Tensor
            [K].
        ptr : int or torch.Tensor
            The global write pointer.
        """
        if tuple(weights.shape) != (self.queue_size, self.dim):
            raise ValueError(f"weights must be [{self.queue_size}, {self.dim}] (the global queue), "
                             f"got {tuple(weights.shape)}")
        if tuple(labels.shape) != (self.queue_size,):
            raise ValueError(f"labels must be [{self.queue_size}], got {tuple(labels.shape)}")
        check_queue_state(weights, labels, torch.as_tensor(ptr).reshape(-1), ptr_limit=self.queue_size,
                          what="load_global_")
        self.weights.copy_(weights[self.start:self.stop])
        self.labels.copy_(labels[self.start:self.stop])
        self.ptr.copy_(torch.as_tensor(ptr, dtype=torch.long).reshape(1))


def make_sharded_queue(group, size: int, dim: int, *, dtype, device, persistent: bool) -> ShardedClassQueue:
    """This rank's block of a sharded queue of ``size`` global slots."""
    if not initialized():
        raise ValueError("distributed='sharded' needs an initialised torch.distributed process group when DCQLoss "
                         "is created (the block of the queue a rank holds depends on its rank and the world "
                         "size), got none; call torch.distributed.init_process_group first")
    world, rank = world_size_and_rank(group)
    return ShardedClassQueue(size, dim, world_size=world, rank=rank, dtype=dtype, device=device,
                             persistent=persistent)


@torch.no_grad()
def gather_queue(queue: ShardedClassQueue, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full queue (weights [K, D], labels [K], ptr [1]) on every rank (a collective)."""
    world, _ = world_size_and_rank(group)
    if world != queue.world_size:
        raise ValueError(f"group has {world} ranks, but the queue was sharded over {queue.world_size}")
    sizes = [b - a for a, b in (shard_range(queue.queue_size, world, r) for r in range(world))]
    weights = trim(gather_padded(queue.weights, max(sizes), group, world), sizes)
    labels = trim(gather_padded(queue.labels, max(sizes), group, world, fill=-1), sizes)
    return weights, labels, queue.ptr.clone()


class ShardedQueue(HeaderExchangeQueue):
    mode = "sharded"

    def loss_rows(self, batch: Batch, kernels) -> torch.Tensor:
        """The loss rows of the local batch against the union of every rank's shard."""
        group, sizes, rank = self.group, batch.sizes, batch.rank
        rows = max(sizes)
        # 1. Every rank's rows (padded to the largest batch; padding rows are 0 and harmless).
        all_x = gather_padded(batch.embeddings.detach(), rows, group, len(sizes))
        all_labels = gather_padded(batch.labels, rows, group, len(sizes), fill=-1)
        # 2. Partials of every row over this rank's shard.
        part = kernels.partials(all_x, all_labels, self.queue.weights, self.queue.labels,
                                compute_grad=batch.compute_grad)
        # 3. Merge across ranks: all-reduce the maxima, rescale, reduce-scatter the
        #    sums and accumulators so that each rank receives its own rows only.
        global_max = part.row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescaled = part.rescaled_to(global_max)
        stacked = rescaled.row_sum.unsqueeze(1)
        if batch.compute_grad:
            stacked = torch.cat([stacked, rescaled.accumulator], dim=1)
        mine = stacked.new_empty((rows, stacked.shape[1]))
        reduce_scatter_single(mine, stacked.contiguous(), op=dist.ReduceOp.SUM, group=group)
        n = sizes[rank]
        own = type(part)(global_max[rank * rows:rank * rows + n], mine[:n, 0],
                         mine[:n, 1:] if batch.compute_grad else None)
        # 4. Finalise the local rows; the gradient comes with them.
        compute_grad = batch.embeddings.requires_grad and torch.is_grad_enabled()
        loss, grad = kernels.finalize(batch.embeddings, batch.class_weights, own, compute_grad=compute_grad)
        return rows_with_gradient(batch.embeddings, loss, grad) if compute_grad else loss

    def enqueue(self, batch: Batch) -> None:
        class_weights = gather_rows(batch.class_weights, batch.sizes, self.group)
        labels = gather_rows(batch.labels, batch.sizes, self.group, fill=-1)
        self.queue.enqueue(class_weights, labels, ptr=batch.ptr)
