"""The loss algebra shared by every backend and every queue strategy (docs/loss.md):

- ``partials(rows, slice of the queue) -> Partials(row_max, row_sum, accumulator)``;
- ``merge`` of the partials of disjoint slices (a max, then rescaled sums);
- ``finalize(partials) -> (loss rows, gradient rows)``.

One process is partials over the whole queue, then finalize (the fused ops do
both in one call); the sharded queue is partials per shard, merged across ranks
with collectives, then finalize. ``RowLoss`` binds a margin, a backend and a
GEMM dtype, and is what a queue strategy calls.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from dcq_ops.backends import select_backend, why_unavailable
from dcq_ops.functional import check_triton_dtype, dcq_cross_entropy
from dcq_ops.margin import MarginConfig
from dcq_ops.ops.chunked import DEFAULT_CHUNK_SIZE


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


class RowLoss:
    """The loss of each row against a queue (or a slice of one), for one margin and
    backend: what a queue strategy computes. The GEMMs take their operands in the
    queue's dtype (docs/loss.md, "Numerics")."""

    def __init__(self, margin: MarginConfig, backend: str = "auto"):
        self.margin = margin
        self.backend = backend

    def _no_autocast(self, device_type: str):
        # Under autocast the loss still accumulates in fp32 (the reference backend's
        # matmul would otherwise run in half precision).
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
        return contextlib.nullcontext()

    def __call__(self, embeddings, class_weights, labels, queue_weights, queue_labels) -> torch.Tensor:
        """Loss per row [N] fp32, differentiable with respect to ``embeddings``."""
        with self._no_autocast(embeddings.device.type):
            return dcq_cross_entropy(embeddings, class_weights, labels, queue_weights, queue_labels,
                                     **self.margin.kwargs(), reduction="none", backend=self.backend)

    def fused_backend(self, device) -> str:
        """The fused backend whose partials and finalize run on ``device``: the
        sharded queue always runs the kernels ("reference" has no partials)."""
        if self.backend in ("triton", "chunked"):
            return select_backend(device, self.backend)
        for candidate in (("triton", "chunked") if torch.device(device).type == "cuda" else ("chunked",)):
            if why_unavailable(candidate, device) is None:
                return candidate
        return select_backend(device, "chunked")  # raises with the reason

    def partials(self, embeddings, labels, queue_weights, queue_labels, *, with_accumulator: bool) -> Partials:
        """Partials of every row over a queue slice (rows need not be normalised)."""
        margin = self.margin
        args = (embeddings.detach(), labels, queue_weights.detach(), queue_labels, margin.scale,
                margin.interclass_filtering_threshold, with_accumulator)
        if self._use_triton(embeddings):
            check_triton_dtype(queue_weights, embeddings.device)
            from dcq_ops.triton.margin_ce import partials
            row_max, row_sum, accumulator = partials(*args)
        else:
            row_max, row_sum, accumulator = torch.ops.dcq_ops.margin_ce_partials(*args, DEFAULT_CHUNK_SIZE)
        return Partials(row_max, row_sum, accumulator if with_accumulator else None)

    def finalize(self, embeddings, class_weights, part: Partials, *, compute_grad: bool):
        """(loss rows, gradient rows or None) from the merged partials of every row."""
        margin = self.margin
        accumulator = part.accumulator
        if accumulator is None:
            accumulator = part.row_sum.new_empty((0, embeddings.shape[1]))
        args = (embeddings.detach(), class_weights.detach(), part.row_max, part.row_sum, accumulator, margin.scale,
                margin.m1, margin.m2, margin.m3, margin.straight_through, compute_grad)
        if self._use_triton(embeddings):
            from dcq_ops.triton.margin_ce import finalize
            loss, grad = finalize(*args)
        else:
            loss, grad = torch.ops.dcq_ops.margin_ce_finalize(*args)
        return loss, (grad if compute_grad else None)

    def _use_triton(self, embeddings) -> bool:
        if self.fused_backend(embeddings.device) != "triton":
            return False
        if embeddings.dtype == torch.float64:
            raise TypeError("the sharded queue on the triton backend computes in float32; float64 runs on "
                            "backend='chunked'")
        return True
