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
    q = F.normalize(embeddings.to(acc), dim=1)
    w = F.normalize(class_weights.detach().to(acc), dim=1)
    # A copy: DCQLoss overwrites the queue in place right after the loss, before
    # backward() runs, and the matmul below saves its operand for the backward.
    queue_w = queue_weights.detach().to(acc, copy=True)

    positive_cos = (q * w).sum(dim=1)
    positive_logit = margin_logit(positive_cos, scale, m1, m2, m3, straight_through_margin)

    cos = q @ queue_w.t()  # [N, K]: the logits the fused backends never materialise
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
    loss_rows = torch.where(has_negative, loss_rows, torch.zeros_like(loss_rows))
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "mean":
        return loss_rows.mean()
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
