"""The FIFO write of a batch gathered padded from every rank, with the valid row
counts on the device only.

The multi-rank strategies all-gather every rank's rows padded to a capacity C
the ranks agreed once (dcq_ops.parallel.strategy), so the host never learns the
other ranks' batch sizes. The queue must still receive exactly the valid rows,
in rank order, as one process enqueueing the concatenated batch would. The
number of slots written is B = sum of the counts, a device value, so the write
has a static size: a window of M = min(W * C, block size) slots starting where
this block's next write begins; slot s of it receives the t-th valid row (t its
distance from the global pointer) when t < B, and keeps its old value
otherwise. One ``index_copy_`` over distinct slots: no host read, no
data-dependent shape.
"""

from __future__ import annotations

import torch

from dcq_ops.backends import enqueue_function


def valid_row_index(t: torch.Tensor, counts: torch.Tensor, capacity: int) -> torch.Tensor:
    """For positions ``t`` in the concatenated batch (rank 0's rows first), the index of
    that row in the padded gather ([W * capacity] rows, rank r's at r * capacity);
    positions past the end map to some row in range (callers mask them)."""
    ends = torch.cumsum(counts, 0)
    rank = torch.searchsorted(ends, t, right=True).clamp(max=counts.shape[0] - 1)
    first = ends[rank] - counts[rank]
    return (rank * capacity + (t - first)).clamp(0, counts.shape[0] * capacity - 1)


@torch.no_grad()
def enqueue_padded(weights: torch.Tensor, labels: torch.Tensor, ptr: torch.Tensor, *, start: int, queue_size: int,
                   class_weights: torch.Tensor, class_labels: torch.Tensor, counts: torch.Tensor, capacity: int,
                   bad_reasons: torch.Tensor | None) -> None:
    """Write the valid rows of a padded gathered batch into the block ``[start, start +
    weights.shape[0])`` of a global FIFO of ``queue_size`` slots, and advance the global
    pointer ``ptr`` by the number of valid rows (nothing at all if ``bad_reasons`` is
    nonzero).

    Parameters
    ----------
    weights, labels : torch.Tensor
        The block's [S, D] weights and [S] labels (the whole queue: ``start=0``).
    ptr : torch.Tensor
        int64 [1], the global write pointer (the same on every rank).
    class_weights, class_labels : torch.Tensor
        [W * capacity, D] and [W * capacity]: every rank's rows, padded to ``capacity``.
    counts : torch.Tensor
        int64 [W] on the device: the valid rows of every rank.
    bad_reasons : torch.Tensor, optional
        int64 [1]: write only if 0.
    """
    slots = weights.shape[0]
    device = weights.device
    total = counts.sum()
    if bad_reasons is not None:
        total = total * (bad_reasons.view(()) == 0)
    window = min(class_weights.shape[0], slots)
    head = ptr.view(())
    local_head = head - start
    # Where this block's next write begins: at the pointer if it lies in the block, else at
    # the block's first slot (the window enters the block there). The slots written form one
    # run modulo the block size from there (see the module docstring).
    first = torch.where((local_head >= 0) & (local_head < slots), local_head, torch.zeros_like(local_head))
    local = (first + torch.arange(window, device=device)) % slots
    t = (local + start - head) % queue_size   # the position in the concatenated batch of each slot
    write = t < total
    source = valid_row_index(t.clamp(max=class_weights.shape[0] - 1), counts, capacity)
    # Normalised by the queue's own enqueue op (the same rounding as one process), into a scratch block.
    fresh = weights.new_empty((window, weights.shape[1]))
    fresh_labels = labels.new_empty((window,))
    enqueue_function(device)(fresh, fresh_labels, torch.zeros(1, dtype=torch.long, device=device),
                             class_weights.index_select(0, source), class_labels.index_select(0, source).long(), None)
    weights.index_copy_(0, local, torch.where(write.unsqueeze(1), fresh, weights.index_select(0, local)))
    labels.index_copy_(0, local, torch.where(write, fresh_labels, labels.index_select(0, local)))
    ptr.add_(total).remainder_(queue_size)
