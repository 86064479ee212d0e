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
import torch.nn.functional as F

from dcq_ops.functional import dcq_cross_entropy
from dcq_ops.margin import MarginConfig, margin_derivative, margin_value


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


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
    """The loss of each row against a queue (or a slice of one), for one margin,
    backend and GEMM dtype: what a queue strategy computes.

    ``half_gemm``: as PartialFC_V2(fp16=True), the embeddings are normalised in
    fp32 and the GEMMs run in fp16 (fp32 accumulation)."""

    def __init__(self, margin: MarginConfig, backend: str = "auto", half_gemm: bool = False):
        self.margin = margin
        self.backend = backend
        self.half_gemm = half_gemm

    def _no_autocast(self, device_type: str):
        # Under autocast the loss still accumulates in fp32 (the reference backend's
        # matmul would otherwise run in half precision).
        if torch.is_autocast_enabled(device_type):
            return torch.autocast(device_type, enabled=False)
        return contextlib.nullcontext()

    def __call__(self, embeddings, class_weights, labels, queue_weights, queue_labels) -> torch.Tensor:
        """Loss per row [N] fp32, differentiable with respect to ``embeddings``."""
        with self._no_autocast(embeddings.device.type):
            if self.half_gemm and embeddings.dtype != torch.float16:
                # Normalised first (fp32, differentiable), so the cast cannot overflow.
                embeddings = F.normalize(embeddings.float(), dim=1).half()
            return dcq_cross_entropy(embeddings, class_weights, labels, queue_weights, queue_labels,
                                     **self.margin.kwargs(), reduction="none", backend=self.backend)

    def partials(self, embeddings, labels, queue_weights, queue_labels, *, with_accumulator: bool) -> Partials:
        """Partials of every row over the queue slice (rows need not be normalised)."""
        margin = self.margin
        acc = accumulation_dtype(embeddings, queue_weights)
        q = F.normalize(embeddings.to(acc), dim=1)
        rows = q.shape[0]
        row_max = torch.full((rows,), float("-inf"), dtype=acc, device=q.device)
        row_sum = torch.zeros(rows, dtype=acc, device=q.device)
        accumulator = torch.zeros_like(q) if with_accumulator else None
        chunk = max(256, (8 << 20) // (8 * max(rows, 1)))
        labels = labels.view(-1, 1)
        for start in range(0, queue_weights.shape[0], chunk):
            w = queue_weights[start:start + chunk].to(acc)
            wl = queue_labels[start:start + chunk].view(1, -1)
            cos = q @ w.t()
            excluded = (wl < 0) | (wl == labels)
            logits = margin.scale * cos
            filtered = None
            if margin.interclass_filtering_threshold > 0:
                filtered = (cos > margin.interclass_filtering_threshold) & ~excluded
                logits = logits.masked_fill(filtered, 0.0)
            logits = logits.masked_fill(excluded, float("-inf"))
            new_max = torch.maximum(row_max, logits.amax(dim=1))
            safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
            rescale = torch.exp(row_max - safe_max)
            p = torch.exp(logits - safe_max.unsqueeze(1))
            row_sum = row_sum * rescale + p.sum(dim=1)
            if with_accumulator:
                if filtered is not None:
                    p = p.masked_fill(filtered, 0.0)
                accumulator = accumulator * rescale.unsqueeze(1) + p @ w
            row_max = new_max
        return Partials(row_max, row_sum, accumulator)

    def finalize(self, embeddings, class_weights, part: Partials, *, compute_grad: bool):
        """(loss rows, gradient rows or None) from the merged partials of every row."""
        margin = self.margin
        acc = accumulation_dtype(embeddings, class_weights, part.row_sum)
        x = embeddings.detach().to(acc)
        x_norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        q = x / x_norm
        w = F.normalize(class_weights.to(acc), dim=1)
        positive_cos = (q * w).sum(dim=1)
        row_max, row_sum = part.row_max.to(acc), part.row_sum.to(acc)
        has = row_sum > 0
        z_pos = margin.scale * margin_value(positive_cos, margin.m1, margin.m2, margin.m3)
        lse_neg = row_max + torch.log(torch.where(has, row_sum, torch.ones_like(row_sum)))
        d = torch.where(has, lse_neg - z_pos, torch.zeros_like(z_pos))
        if margin.straight_through:
            dz_dc = torch.full_like(positive_cos, margin.scale)
        else:
            dz_dc = margin.scale * margin_derivative(positive_cos, margin.m1, margin.m2)
        loss = torch.where(has, -F.logsigmoid(-d), torch.zeros_like(d))
        if not compute_grad:
            return loss, None
        coef_positive = torch.where(has, -torch.sigmoid(d) * dz_dc, torch.zeros_like(d))
        lse_all = torch.maximum(z_pos, lse_neg) + torch.log1p(torch.exp(-d.abs()))
        coef_negative = torch.where(has, margin.scale * torch.exp(row_max - lse_all), torch.zeros_like(d))
        grad_q = coef_positive.unsqueeze(1) * w + coef_negative.unsqueeze(1) * part.accumulator.to(acc)
        grad = (grad_q - q * (q * grad_q).sum(dim=1, keepdim=True)) / x_norm
        return loss, grad
