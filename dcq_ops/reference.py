"""The DCQ loss in plain PyTorch, exactly as docs/loss.md defines it: the oracle.

This is the truth every fast backend is tested against, and itself is tested
against float64 finite differences. It materialises the N×K logits on purpose:
it is also the baseline the benchmarks beat. Nothing in the library calls it
except `backend="reference"`; it shares only the margin function
(dcq_ops.margin) with the other backends.

Everything is computed in float32 (float64 stays float64), whatever the input
dtype, so that fp16/bf16 inputs are compared with the exact answer for the
rounded inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq_ops.margin import margin_logit


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) row by row, as F.normalize, with ||x|| computed as
    a * ||x / a|| for a = max |x| (a constant here: the norm does not depend on
    it), so that the sum of squares cannot overflow (|x| >= 1e19 in fp32) nor
    underflow. An all-zero row stays zero; a NaN or inf makes the row NaN."""
    largest = x.detach().abs().amax(dim=1, keepdim=True)
    largest = torch.where(largest > 0, largest, torch.ones_like(largest))  # all-zero row, or NaN
    norm = largest * torch.linalg.vector_norm(x / largest, dim=1, keepdim=True)
    return x / norm.clamp_min(1e-12)


def dcq_cross_entropy(
    embeddings: torch.Tensor,
    class_weights: torch.Tensor,
    labels: torch.Tensor,
    queue_weights: torch.Tensor,
    queue_labels: torch.Tensor,
    *,
    scale: float = 50.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.3,
    interclass_filtering_threshold: float = 0.0,
    straight_through_margin: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss of docs/loss.md, materialising the N×K logits. Gradient flows to ``embeddings`` only."""
    acc = accumulation_dtype(embeddings, class_weights, queue_weights)
    q = normalize_rows(embeddings.to(acc))
    w = normalize_rows(class_weights.detach().to(acc))
    # A copy: DCQLoss overwrites the queue in place right after the loss, before
    # backward() runs, and the matmul below saves its operand for the backward.
    queue_w = queue_weights.detach().to(acc, copy=True)

    positive_cos = (q * w).sum(dim=1)  # NaN when x_i or k_i is not finite
    positive_logit = margin_logit(positive_cos, scale, m1, m2, m3, straight_through_margin)

    # Non-finite input is never hidden (docs/loss.md, "Numerics"): a queue slot
    # that is not finite has cosine NaN with every row, so a row that keeps it has
    # loss NaN and gradient NaN. Its weights are zeroed in the product so that a
    # row that excludes it sees nothing of it, not even 0 * NaN in the backward.
    finite_slot = torch.isfinite(queue_w).all(dim=1)
    queue_w = torch.where(finite_slot.view(-1, 1), queue_w, torch.zeros_like(queue_w))
    cos = (q @ queue_w.t()).masked_fill(~finite_slot, float("nan"))  # [N, K]: never materialised elsewhere
    excluded = (queue_labels.view(1, -1) == labels.view(-1, 1)) | (queue_labels.view(1, -1) < 0)
    if interclass_filtering_threshold > 0:
        filtered = (cos > interclass_filtering_threshold) & ~excluded
        cos = torch.where(filtered, torch.zeros_like(cos), cos)  # logit 0, no gradient
    negative_logits = (scale * cos).masked_fill(excluded, float("-inf"))

    # A row whose every queue entry is excluded has loss 0 and gradient 0: feed
    # logsumexp a harmless row and mask its result, so no NaN reaches the gradient.
    has_negative = (~excluded).any(dim=1)
    safe_logits = torch.where(has_negative.view(-1, 1), negative_logits, torch.zeros_like(negative_logits))
    lse_negative = torch.logsumexp(safe_logits, dim=1)
    # softplus(d) as -logsigmoid(-d): stable both ways, and without F.softplus's
    # linear cut-off at d > 20 (an error of ~2e-9 that float64 tests would see).
    loss_rows = -F.logsigmoid(positive_logit - lse_negative)
    # 0 * z_i is 0 with gradient 0, or NaN with a NaN gradient when the row's own
    # embedding or class weight is not finite (z_i is then NaN): never a finite number.
    loss_rows = torch.where(has_negative, loss_rows, 0 * positive_logit)
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def loss_rows(embeddings, class_weights, labels, queue_weights, queue_labels, margin) -> torch.Tensor:
    """The loss of every row [N] (``reduction="none"``), for the margin of a MarginConfig:
    the reference's entry point in the backend table (dcq_ops.backends)."""
    return dcq_cross_entropy(embeddings, class_weights, labels, queue_weights, queue_labels, **margin.kwargs(),
                             reduction="none")
