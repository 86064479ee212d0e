"""Plain PyTorch implementation of the DCQ loss (DESIGN.md §2).

This is the truth every fast backend is tested against, and itself is tested
against float64 finite differences. It materialises the N×K logits on purpose:
it is also the baseline the benchmarks beat.

Everything is computed in float32 (float64 stays float64), whatever the input
dtype, so that fp16/bf16 inputs are compared with the exact answer for the
rounded inputs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

# Below this sin(theta) the margin's derivative is evaluated at theta = EPS
# (or pi - EPS): the derivative of cos(m1*theta + m2) with respect to cos(theta)
# is m1*sin(m1*theta + m2)/sin(theta), which is 0/0 at c = +-1. Clamping theta
# keeps it finite and gives the exact limit (1 for CosFace, m1^2 for
# SphereFace with m2 = 0). Every backend uses the same constant.
MARGIN_THETA_EPS = 1e-4


def margin_value(cosine: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """cos(m1*acos(c) + m2) - m3 for c clamped to [-1, 1] (without the scale)."""
    theta = torch.acos(cosine.clamp(-1.0, 1.0))
    return torch.cos(m1 * theta + m2) - m3


def margin_derivative(cosine: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """d/dc of cos(m1*acos(c) + m2), stable at c = +-1 (see MARGIN_THETA_EPS)."""
    theta = torch.acos(cosine.clamp(-1.0, 1.0)).clamp(MARGIN_THETA_EPS, math.pi - MARGIN_THETA_EPS)
    return m1 * torch.sin(m1 * theta + m2) / torch.sin(theta)


class _MarginLogit(torch.autograd.Function):
    """z = s*(cos(m1*acos(c) + m2) - m3) with the stable derivative above.

    With ``straight_through`` the gradient is that of z = s*c, as arcface_torch
    does when it applies the ArcFace margin under ``no_grad``.
    """

    @staticmethod
    def forward(ctx, cosine, scale, m1, m2, m3, straight_through):
        ctx.save_for_backward(cosine)
        ctx.params = (scale, m1, m2, straight_through)
        return scale * margin_value(cosine, m1, m2, m3)

    @staticmethod
    def backward(ctx, grad_out):
        (cosine,) = ctx.saved_tensors
        scale, m1, m2, straight_through = ctx.params
        if straight_through:
            dz_dc = torch.full_like(cosine, scale)
        else:
            dz_dc = scale * margin_derivative(cosine, m1, m2)
        return grad_out * dz_dc, None, None, None, None, None


def margin_logit(cosine: torch.Tensor, scale: float, m1: float, m2: float, m3: float,
                 straight_through: bool = False) -> torch.Tensor:
    """The positive logit z = s*(cos(m1*acos(c) + m2) - m3), with the stable derivative."""
    return _MarginLogit.apply(cosine, scale, m1, m2, m3, straight_through)


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def reduce_loss(loss_rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss_rows.mean()
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "none":
        return loss_rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


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
    """DESIGN.md §2, materialising the N×K logits. Gradient flows to ``embeddings`` only."""
    acc = _accumulation_dtype(embeddings, class_weights, queue_weights)
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
    return reduce_loss(loss_rows, reduction)
