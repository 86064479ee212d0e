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
from dcq_ops.first_contact_sharded import sharded_partials
from dcq_ops.parallel.collectives import (all_reduce, gather_padded, initialized, reduce_scatter_single, trim,
                                          world_size_and_rank)
from dcq_ops.parallel.padded import enqueue_padded
from dcq_ops.parallel.strategy import Batch, HeaderExchangeQueue
from dcq_ops.queue import SHARD_KEY, ClassQueue, check_queue_state


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
    weights whose slots fall in this block.

    ``state_dict`` holds this rank's block (its *block form*: ``weights``, ``labels``,
    the global ``ptr`` and ``shard`` = [queue_size, start, stop, world_size, rank]).
    ``load_state_dict`` takes the block form of the same block, the *global form*
    (weights [queue_size, D], labels [queue_size], ptr: what an unsharded queue holds;
    it keeps its block of it, at any world size), or a block without ``shard`` (older
    per-rank checkpoints) of this block's size, as before. dcq_ops.parallel.queue_state
    turns the blocks into the global form (``gather_queue_state``, a collective, or
    ``assemble_queue_state`` of every rank's state dict).

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
            The global pointer if the caller knows it on the host already (the block's
            rows are then written by the enqueue op directly); otherwise the slots are
            found from the device pointer on the device (dcq_ops.parallel.padded), with
            no host sync.
        """
        self.check_enqueue(class_weights, labels)
        size, batch = self.queue_size, class_weights.shape[0]
        if ptr is None:
            counts = torch.full((1,), batch, dtype=torch.long, device=self.weights.device)
            enqueue_padded(self.weights, self.labels, self.ptr, start=self.start, queue_size=size,
                           class_weights=class_weights.detach(), class_labels=labels, counts=counts,
                           capacity=batch, bad_reasons=bad_reasons)
            return
        head = ptr
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

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if prefix + "weights" in destination:  # persistent: say which block it is
            destination[prefix + SHARD_KEY] = torch.tensor(
                [self.queue_size, self.start, self.stop, self.world_size, self.rank], dtype=torch.long)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # The global form is cut to this rank's block, a block is checked to be this
        # one; ClassQueue's loader then checks the values and copies them.
        what = f"loading {type(self).__name__} ({prefix or 'state_dict'}) of rank {self.rank}/{self.world_size}"
        state = {k: v for k, v in state_dict.items() if k != prefix + SHARD_KEY}
        weights, labels = state.get(prefix + "weights"), state.get(prefix + "labels")
        meta = state_dict.get(prefix + SHARD_KEY)
        if isinstance(weights, torch.Tensor) and isinstance(labels, torch.Tensor) and weights.dim() == 2:
            rows = weights.shape[0]
            if meta is not None:
                values = torch.as_tensor(meta).reshape(-1).tolist()
                if len(values) != 5:
                    raise ValueError(f"{what}: {prefix}{SHARD_KEY} must hold [queue_size, start, stop, world_size, "
                                     f"rank], got {values}")
                size, start, stop, world, rank = (int(v) for v in values)
                if size != self.queue_size:
                    raise ValueError(f"{what}: the state is a block of a queue of {size} slots, this queue has "
                                     f"{self.queue_size}")
                whole = (start, stop) == (0, size)
                if (start, stop) != (self.start, self.stop) and not whole:
                    raise ValueError(
                        f"{what}: the state holds rank {rank}'s block, global slots [{start}, {stop}) of a queue "
                        f"sharded over {world} ranks, and this rank holds [{self.start}, {self.stop}): load the "
                        "global form instead - DCQLoss.global_state_dict() (a collective) saves it, and "
                        "dcq_ops.parallel.assemble_queue_state([the state dict of every rank]) makes it from "
                        "per-rank files")
                cut = whole and (self.start, self.stop) != (0, size)
            else:
                # No block named: the global form (cut here), or an older per-rank block of this size.
                cut = rows == self.queue_size and rows != self.shard_size
                if rows not in (self.queue_size, self.shard_size):
                    raise ValueError(
                        f"{what}: weights must be [{self.queue_size}, {self.dim}] (the global queue) or "
                        f"[{self.shard_size}, {self.dim}] (this rank's block), got {tuple(weights.shape)}: an older "
                        "per-rank checkpoint of another world size? Assemble the global queue from every rank's "
                        "file with dcq_ops.parallel.assemble_queue_state")
            if cut:
                ptr = state.get(prefix + "ptr")
                if tuple(labels.shape) != (rows,) or not isinstance(ptr, torch.Tensor):
                    raise ValueError(f"{what}: labels must be [{rows}] and ptr a tensor, got labels "
                                     f"{tuple(labels.shape)}")
                if weights.is_floating_point() and weights.shape[1] == self.dim:
                    check_queue_state(weights, labels, ptr, ptr_limit=self.queue_size, what=what)
                state[prefix + "weights"] = weights[self.start:self.stop]
                state[prefix + "labels"] = labels[self.start:self.stop]
        super()._load_from_state_dict(state, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
    """The full queue (weights [K, D], labels [K], ptr [1]) on every rank's device (a
    collective: every rank holds the whole queue on its device for a moment; to save a
    checkpoint, ``DCQLoss.global_state_dict`` / ``queue_state.gather_queue_state`` gather
    it into host memory a block at a time)."""
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
        """The loss rows of the local batch against the union of every rank's shard.

        Every rank's rows are gathered padded to the agreed capacity C (padding rows: zero
        embeddings, label -1; their partials are computed and never used), so the shapes
        of every collective are known on the host of every rank without a host read."""
        group, rank, world, rows = self.group, batch.rank, batch.world, batch.capacity
        # 1. Every rank's rows, padded to the capacity.
        all_x = gather_padded(batch.embeddings.detach(), rows, group, world)
        all_labels = gather_padded(batch.labels, rows, group, world, fill=-1)
        batch.gathered_labels = all_labels  # the enqueue needs them too
        # 2. Partials of every row over this rank's shard; the first call of a class checks them
        #    and the finalize, and a demoted class runs its fallback's (dcq_ops.first_contact_sharded).
        part, kernels = sharded_partials(kernels, all_x, all_labels, self.queue.weights, self.queue.labels, batch,
                                         rank * rows)
        # 3. Merge across ranks: all-reduce the maxima, rescale, reduce-scatter the
        #    sums and accumulators so that each rank receives its own rows only.
        global_max = part.row_max.clone()
        all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        rescaled = part.rescaled_to(global_max)
        stacked = rescaled.row_sum.unsqueeze(1)
        if batch.compute_grad:
            stacked = torch.cat([stacked, rescaled.accumulator], dim=1)
        mine = stacked.new_empty((rows, stacked.shape[1]))
        reduce_scatter_single(mine, stacked.contiguous(), op=dist.ReduceOp.SUM, group=group)
        if batch.placeholder:  # no rows of its own to finalise
            return mine.new_zeros((0,))
        n = batch.rows
        own = type(part)(global_max[rank * rows:rank * rows + n], mine[:n, 0],
                         mine[:n, 1:] if batch.compute_grad else None)
        # 4. Finalise the local rows; the gradient comes with them.
        compute_grad = batch.embeddings.requires_grad and torch.is_grad_enabled()
        loss, grad = kernels.finalize(batch.embeddings, batch.class_weights, own, compute_grad=compute_grad)
        return rows_with_gradient(batch.embeddings, loss, grad) if compute_grad else loss

    def enqueue(self, batch: Batch) -> None:
        """Every rank's class weights (padded; the labels came with the loss), and the valid
        rows written into this rank's block, from the device pointer (no host read)."""
        queue, capacity = self.queue, batch.capacity
        class_weights = gather_padded(batch.class_weights, capacity, self.group, batch.world)
        labels = batch.gathered_labels
        if labels is None:
            labels = gather_padded(batch.labels, capacity, self.group, batch.world, fill=-1)
        enqueue_padded(queue.weights, queue.labels, queue.ptr, start=queue.start, queue_size=queue.queue_size,
                       class_weights=class_weights, class_labels=labels, counts=batch.counts, capacity=capacity,
                       bad_reasons=batch.bad_reasons)
