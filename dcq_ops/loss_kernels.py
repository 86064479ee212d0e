"""LossKernels: the loss of each row against a queue (or a slice of one), its partials
and its finalize, bound to one margin and one backend choice: what a queue strategy
(dcq_ops.parallel) calls. Where each backend runs is dcq_ops.backends' table."""

from __future__ import annotations

import contextlib

import torch

from dcq_ops.algebra import Partials
from dcq_ops.backends import entry_point, select_backend
from dcq_ops.functional import dcq_cross_entropy
from dcq_ops.margin import MarginConfig


class LossKernels:
    """The three entry points of the loss for one margin and backend.

    Parameters
    ----------
    margin : MarginConfig
    backend : str
        "auto", "triton", "chunked" or "reference"; partials and finalize run on a
        fused backend ("auto" picks it per device).
    """

    def __init__(self, margin: MarginConfig, backend: str = "auto"):
        self.margin = margin
        self.backend = backend

    @staticmethod
    def _no_autocast(device_type: str):
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

    def fused_backend(self, embeddings, queue_weights=None) -> str:
        """The backend whose partials and finalize run for these tensors: the sharded queue
        always runs a fused one ("reference" has no partials, so it means "auto" here)."""
        backend = "auto" if self.backend == "reference" else self.backend
        return select_backend(embeddings.device, backend, input_dtypes=(embeddings.dtype,),
                              queue_dtype=None if queue_weights is None else queue_weights.dtype, fused_only=True)

    def partials(self, embeddings, labels, queue_weights, queue_labels, *, compute_grad: bool) -> Partials:
        """Partials of every row over a queue slice (rows need not be normalised); the
        accumulator only with ``compute_grad``."""
        backend = self.fused_backend(embeddings, queue_weights)
        row_max, row_sum, accumulator = entry_point(backend, "partials")(
            embeddings.detach(), labels, queue_weights.detach(), queue_labels, self.margin, compute_grad)
        return Partials(row_max, row_sum, accumulator if compute_grad else None)

    def finalize(self, embeddings, class_weights, part: Partials, *, compute_grad: bool):
        """(loss rows, gradient rows or None) from the merged partials of every row."""
        accumulator = part.accumulator
        if accumulator is None:
            accumulator = part.row_sum.new_empty((0, embeddings.shape[1]))
        backend = self.fused_backend(embeddings)
        loss, grad = entry_point(backend, "finalize")(embeddings.detach(), class_weights.detach(), part.row_max,
                                                      part.row_sum, accumulator, self.margin, compute_grad)
        return loss, (grad if compute_grad else None)
