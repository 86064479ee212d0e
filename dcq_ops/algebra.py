"""The loss algebra shared by every backend and every queue strategy (docs/loss.md):

- ``partials(rows, slice of the queue) -> Partials(row_max, row_sum, accumulator)``;
- ``merge`` of the partials of disjoint slices (a max, then rescaled sums);
- ``finalize(partials) -> (loss rows, gradient rows)``;
- ``reduce_rows``: the loss rows reduced as ``reduction`` says.

One process is partials over the whole queue, then finalize (the fused ops do
both in one call); the sharded queue is partials per shard, merged across ranks
with collectives, then finalize. The backends' partials and finalize are bound to
a margin by dcq_ops.loss_kernels.LossKernels, which is what a queue strategy calls.
This module is tensor arithmetic only: it imports no other part of the package.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from dcq_ops.validation import check_reduction


@dataclass
class Partials:
    """The online log-sum-exp state of each row over a slice of the queue.

    ``row_max`` [N]: the largest kept negative logit (natural-log units; -inf where
    the slice kept nothing); ``row_sum`` [N]: sum_j exp(z_ij - row_max) over the
    kept entries (a filtered entry counts with z = 0); ``accumulator`` [N, D] or
    None: sum_j exp(z_ij - row_max) W_j over the entries that carry a gradient."""

    row_max: torch.Tensor
    row_sum: torch.Tensor
    accumulator: torch.Tensor | None

    def rescaled_to(self, new_max: torch.Tensor) -> "Partials":
        """The same state measured from ``new_max`` (>= row_max) instead of row_max."""
        reference_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        factor = torch.exp(self.row_max - reference_max)  # 0 where the slice kept nothing
        accumulator = None if self.accumulator is None else self.accumulator * factor.unsqueeze(1)
        return Partials(new_max, self.row_sum * factor, accumulator)


def merge(parts) -> Partials:
    """The partials of the union of disjoint slices."""
    parts = list(parts)
    new_max = parts[0].row_max
    for p in parts[1:]:
        new_max = torch.maximum(new_max, p.row_max)
    rescaled = [p.rescaled_to(new_max) for p in parts]
    accumulator = None
    if all(p.accumulator is not None for p in rescaled):
        accumulator = sum(p.accumulator for p in rescaled)
    return Partials(new_max, sum(p.row_sum for p in rescaled), accumulator)


def reduce_rows(rows: torch.Tensor, reduction: str, *, mean_factor: float | None = None) -> torch.Tensor:
    """The loss rows reduced: their mean ("mean"), sum ("sum") or themselves ("none").

    ``mean_factor``: "mean" is the sum times this factor instead of the mean of the
    rows (a multi-rank batch of uneven sizes, dcq_ops.parallel.strategy)."""
    check_reduction(reduction)
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    return rows.mean() if mean_factor is None else rows.sum() * mean_factor
