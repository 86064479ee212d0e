"""The DCQ loss in plain PyTorch, exactly as docs/loss.md defines it: the oracle.

This is the truth every fast backend is tested against, and itself is tested
against float64 finite differences. ``dcq_cross_entropy`` materialises the N×K
logits on purpose: it is the tests' oracle and the baseline the benchmarks beat.
``loss_rows_blocked`` computes the same rows block by block (rows × queue slots),
in memory that does not grow with N×K: what ``backend="reference"`` runs on a large
batch (the fallback when no compiled kernel loads) and what the first-contact check
compares against. Both share the per-slot logits (``negative_logits``) and the
margin function (dcq_ops.margin), and nothing else of the other backends.

Everything is computed in float32 (float64 stays float64), whatever the input
dtype, so that fp16/bf16 inputs are compared with the exact answer for the
rounded inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq_ops.margin import margin_logit
from dcq_ops.validation import check_positive_int

# loss_rows runs the plain computation up to this many logits (N*K), the blocked one
# above it; and the blocked one's default block is about this many logits (4 MiB a
# [rows, slots] tensor in float32: large enough that the per-block overhead is noise),
# so that both cost the same order of memory.
BLOCK_LOGITS = 1 << 20
# Rows per block by default (the slots per block follow from BLOCK_LOGITS and D).
BLOCK_ROWS = 1024


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    if any(t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def row_unit(x: torch.Tensor) -> torch.Tensor:
    """The largest magnitude of each row [N, 1] (1 for an all-zero row or a NaN
    one), the unit the norms are measured in; a constant for autograd (the
    normalised row does not depend on it)."""
    largest = x.detach().abs().amax(dim=1, keepdim=True)
    return torch.where(largest > 0, largest, torch.ones_like(largest))


def normalize_scaled(scaled: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||, 1e-12)`` from ``scaled = x / unit``: the norm is taken in
    units of ``unit``, where it lies in [1, sqrt(D)] for any finite x, so it
    cannot overflow (|x| >= 1e19 in fp32) nor underflow, and F.normalize's
    1e-12 is measured in the same units."""
    norm = torch.linalg.vector_norm(scaled, dim=1, keepdim=True)
    # A division, not 1e-12 * (1 / unit): the reciprocal of a subnormal unit overflows.
    floor = torch.full_like(unit, 1e-12) / unit
    return scaled / torch.maximum(norm, floor)


def normalize_rows(x: torch.Tensor) -> torch.Tensor:
    """x / max(||x||, 1e-12) row by row, as F.normalize, for any finite x: in
    units of the row's largest magnitude (``normalize_scaled``), so that a row
    of values near 1e38 (a norm beyond float32's maximum) normalises as
    x / 1e38 does. The gradient divides by the unit last (``x / unit``'s
    backward), so an entry that is subnormal in float32 is rounded once. An
    all-zero row stays zero; a NaN or inf makes the row NaN."""
    unit = row_unit(x)
    return normalize_scaled(x / unit, unit)


def negative_logits(q: torch.Tensor, queue_weights: torch.Tensor, labels: torch.Tensor,
                    queue_labels: torch.Tensor, scale: float, interclass_filtering_threshold: float):
    """The logits ``s · c_ij`` of rows q against queue slots (docs/loss.md): -inf
    where excluded, 0 (no gradient) where filtered, NaN for a slot that is not
    finite. Returns (logits [N, K], excluded [N, K]). ``queue_weights`` are
    converted to q's dtype here; the caller passes a copy or a block of the queue."""
    queue_w = queue_weights.detach().to(q.dtype)
    # Non-finite input is never hidden (docs/loss.md, "Numerics"): a queue slot
    # that is not finite has cosine NaN with every row, so a row that keeps it has
    # loss NaN and gradient NaN. Its weights are zeroed in the product so that a
    # row that excludes it sees nothing of it, not even 0 * NaN in the backward.
    finite_slot = torch.isfinite(queue_w).all(dim=1)
    queue_w = torch.where(finite_slot.view(-1, 1), queue_w, torch.zeros_like(queue_w))
    cos = (q @ queue_w.t()).masked_fill_(~finite_slot, float("nan"))  # in place: autograd keeps no product
    excluded = (queue_labels.view(1, -1) == labels.view(-1, 1)) | (queue_labels.view(1, -1) < 0)
    if interclass_filtering_threshold > 0:
        filtered = (cos > interclass_filtering_threshold) & ~excluded
        cos = torch.where(filtered, 0.0, cos)  # logit 0, no gradient
    # In place on the product, which autograd does not save: one [N, K] tensor fewer.
    return (scale * cos).masked_fill_(excluded, float("-inf")), excluded


def _row_losses(positive_logit: torch.Tensor, lse_negative: torch.Tensor, has_negative: torch.Tensor):
    """loss_i = softplus(lse_neg - z_i), or 0 * z_i for a row with every slot excluded."""
    # softplus(d) as -logsigmoid(-d): stable both ways, and without F.softplus's
    # linear cut-off at d > 20 (an error of ~2e-9 that float64 tests would see).
    rows = -F.logsigmoid(positive_logit - lse_negative)
    # 0 * z_i is 0 with gradient 0, or NaN with a NaN gradient when the row's own
    # embedding or class weight is not finite (z_i is then NaN): never a finite number.
    return torch.where(has_negative, rows, 0 * positive_logit)


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return rows
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.mean()
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
    """The loss of docs/loss.md, materialising the N×K logits. Gradient flows to ``embeddings`` only."""
    acc = accumulation_dtype(embeddings, class_weights, queue_weights)
    q = normalize_rows(embeddings.to(acc))
    w = normalize_rows(class_weights.detach().to(acc))
    # A copy: DCQLoss overwrites the queue in place right after the loss, before
    # backward() runs, and the matmul saves its operand for the backward.
    queue_w = queue_weights.detach().to(acc, copy=True)

    positive_cos = (q * w).sum(dim=1)  # NaN when x_i or k_i is not finite
    positive_logit = margin_logit(positive_cos, scale, m1, m2, m3, straight_through_margin)
    logits, excluded = negative_logits(q, queue_w, labels, queue_labels, scale, interclass_filtering_threshold)

    # A row whose every queue entry is excluded has loss 0 and gradient 0: feed
    # logsumexp a harmless row and mask its result, so no NaN reaches the gradient.
    has_negative = (~excluded).any(dim=1)
    safe_logits = torch.where(has_negative.view(-1, 1), logits, torch.zeros_like(logits))
    lse_negative = torch.logsumexp(safe_logits, dim=1)
    return _reduce(_row_losses(positive_logit, lse_negative, has_negative), reduction)


# ----------------------------------------------------------------------------
# The same rows in blocks: memory that does not grow with N×K.


def _negatives_lse(q, queue_weights, labels, queue_labels, margin, block_slots):
    """(log-sum-exp of each row's kept negative logits [N], -inf where none is kept;
    whether the row keeps any slot [N]), over the queue one block of slots at a time."""
    lse = q.new_full((q.shape[0],), float("-inf"))
    has_negative = torch.zeros(q.shape[0], dtype=torch.bool, device=q.device)
    for start in range(0, queue_weights.shape[0], block_slots):
        block = slice(start, start + block_slots)
        logits, excluded = negative_logits(q, queue_weights[block], labels, queue_labels[block], margin.scale,
                                           margin.interclass_filtering_threshold)
        lse = torch.logaddexp(lse, torch.logsumexp(logits, dim=1))  # NaN stays NaN, -inf + -inf stays -inf
        has_negative |= (~excluded).any(dim=1)
    return lse, has_negative


def _block_of_rows(embeddings, class_weights, labels, queue_weights, queue_labels, margin, dtype, block_slots,
                   want_grad):
    """(loss rows [n], gradient with respect to x / unit [n, D] or None, unit [n, 1]) of a block
    of rows, in ``dtype``. The gradient is that of the plain computation, taken block by block:
    with lse_i the negatives' log-sum-exp (a constant once known), d loss_i = d softplus(lse_i - z_i)
    by autograd, plus sigmoid(lse_i - z_i) · Σ_j d exp(z_ij - lse_i) one block of slots at a time
    (their sum is d lse_i); then back through the normalisation, in units of the row's largest
    magnitude (the caller divides by it once, last)."""
    x = embeddings.detach().to(dtype)
    unit = row_unit(x)
    scaled = (x / unit).requires_grad_(want_grad)
    with torch.set_grad_enabled(want_grad):
        q = normalize_scaled(scaled, unit)
    q_leaf = q.detach().requires_grad_(want_grad)
    w = normalize_rows(class_weights.detach().to(dtype))
    with torch.no_grad():
        lse, has_negative = _negatives_lse(q_leaf, queue_weights, labels, queue_labels, margin, block_slots)
    lse = torch.where(has_negative, lse, torch.zeros_like(lse))  # rows with no negative: a harmless constant
    with torch.set_grad_enabled(want_grad):
        positive_logit = margin_logit((q_leaf * w).sum(dim=1), margin.scale, margin.m1, margin.m2, margin.m3,
                                      margin.straight_through_margin)
        rows = _row_losses(positive_logit, lse, has_negative)
        total = rows.sum()
    if not want_grad:
        return rows.detach(), None, unit
    (grad_q,) = torch.autograd.grad(total, q_leaf)
    # d loss_i / d lse_i: the negatives' total probability (0 where no slot is kept).
    weight = torch.where(has_negative, torch.sigmoid(lse - positive_logit.detach()), torch.zeros_like(lse))
    for start in range(0, queue_weights.shape[0], block_slots):
        block = slice(start, start + block_slots)
        with torch.enable_grad():
            logits, _ = negative_logits(q_leaf, queue_weights[block], labels, queue_labels[block], margin.scale,
                                        margin.interclass_filtering_threshold)
            term = (weight.view(-1, 1) * torch.exp(logits - lse.view(-1, 1))).sum()
        grad_q = grad_q + torch.autograd.grad(term, q_leaf)[0]
    (grad_scaled,) = torch.autograd.grad(q, scaled, grad_q)
    return rows.detach(), grad_scaled, unit


class _FirstDerivativeOnly(torch.autograd.Function):
    """The embeddings' gradient when the backward is recorded (create_graph=True): the
    value passes through, and differentiating it again raises a clear error (the saved
    gradient is a constant to autograd, which would otherwise say "element 0 of tensors
    does not require grad")."""

    @staticmethod
    def forward(ctx, grad_embeddings, embeddings):
        return grad_embeddings.clone()  # ``embeddings`` only ties the result to the graph

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(
            "dcq_ops.reference.loss_rows_blocked (backend='reference' above reference.BLOCK_LOGITS logits) "
            "computes the first derivative only: its gradient is produced in the forward pass. For "
            "higher-order derivatives use dcq_ops.reference.dcq_cross_entropy, which materialises the N x K "
            "logits")


def _rows_in_blocks(embeddings, class_weights, labels, queue_weights, queue_labels, margin, dtype, block_rows,
                    block_slots, want_grad):
    """(loss rows [N], gradient with respect to x / unit [N, D] or None, unit [N, 1]), one
    block of rows at a time (_block_of_rows)."""
    n, dim = embeddings.shape
    loss = embeddings.new_empty((n,), dtype=dtype)
    unit = embeddings.new_empty((n, 1), dtype=dtype)
    grad_scaled = embeddings.new_empty((n, dim), dtype=dtype) if want_grad else None
    for start in range(0, n, block_rows):
        rows = slice(start, start + block_rows)
        loss[rows], grad_block, unit[rows] = _block_of_rows(
            embeddings[rows], class_weights[rows], labels[rows], queue_weights, queue_labels, margin, dtype,
            block_slots, want_grad)
        if want_grad:
            grad_scaled[rows] = grad_block
    return loss, grad_scaled, unit


class _BlockedLossRows(torch.autograd.Function):
    """Loss rows computed block by block, with their gradient produced in the forward (as
    the fused backends do): the backward scales it and never reads the queue, which
    DCQLoss overwrites in place before backward() runs. First derivative only."""

    @staticmethod
    def forward(ctx, embeddings, class_weights, labels, queue_weights, queue_labels, margin, dtype, block_rows,
                block_slots):
        loss, grad_scaled, unit = _rows_in_blocks(embeddings, class_weights, labels, queue_weights, queue_labels,
                                                  margin, dtype, block_rows, block_slots, want_grad=True)
        ctx.save_for_backward(grad_scaled, unit, embeddings)
        ctx.embeddings_dtype = embeddings.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_scaled, unit, embeddings = ctx.saved_tensors
        # The upstream factor in the row's units, then the division by the unit last: a
        # gradient entry that is subnormal in float32 is rounded once.
        grad = ((grad_loss.to(grad_scaled.dtype).view(-1, 1) * grad_scaled) / unit).to(ctx.embeddings_dtype)
        if torch.is_grad_enabled():  # create_graph=True: the backward is recorded
            grad = _FirstDerivativeOnly.apply(grad, embeddings)
        return grad, None, None, None, None, None, None, None, None


def loss_rows_blocked(embeddings, class_weights, labels, queue_weights, queue_labels, margin, *, dtype=None,
                      block_rows=None, block_slots=None) -> torch.Tensor:
    """The loss of every row [N] (docs/loss.md), computed in blocks of rows and queue slots, so
    that its memory stays within a few [block_rows, block_slots] tensors plus O(N D), however
    large N K is. Differentiable with respect to ``embeddings`` (first derivative only; the
    gradient is computed in the same pass when they require one). The queue is converted to
    ``dtype`` one block at a time, never as a whole.

    Parameters
    ----------
    embeddings, class_weights : torch.Tensor
        [N, D], any floating dtype.
    labels : torch.Tensor
        int64 [N].
    queue_weights : torch.Tensor
        [K, D], any floating dtype.
    queue_labels : torch.Tensor
        int64 [K], -1 for an empty slot.
    margin : dcq_ops.MarginConfig
    dtype : torch.dtype, optional
        The arithmetic's dtype (default: float64 if an input is float64, else float32, as
        ``dcq_cross_entropy``); torch.float64 gives the exact answer to compare with.
    block_rows : int, optional
        Rows per block (default min(N, 1024)).
    block_slots : int, optional
        Queue slots per block (default BLOCK_LOGITS / max(block_rows, D), at least 1: neither
        the block's logits nor its copy of the queue exceed BLOCK_LOGITS elements).

    Returns
    -------
    torch.Tensor
        [N], in ``dtype``.
    """
    dtype = accumulation_dtype(embeddings, class_weights, queue_weights) if dtype is None else dtype
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    rows = embeddings.shape[0]
    block_rows = check_positive_int("block_rows", block_rows, allow_none=True) or max(1, min(rows, BLOCK_ROWS))
    block_slots = (check_positive_int("block_slots", block_slots, allow_none=True)
                   or max(1, BLOCK_LOGITS // max(block_rows, embeddings.shape[1])))
    if not (embeddings.requires_grad and torch.is_grad_enabled()):  # the loss only: no gradient pass
        with torch.no_grad():
            return _rows_in_blocks(embeddings, class_weights, labels, queue_weights, queue_labels, margin, dtype,
                                   block_rows, block_slots, want_grad=False)[0]
    return _BlockedLossRows.apply(embeddings, class_weights, labels, queue_weights, queue_labels, margin, dtype,
                                  block_rows, block_slots)


def loss_rows(embeddings, class_weights, labels, queue_weights, queue_labels, margin) -> torch.Tensor:
    """The loss of every row [N] (``reduction="none"``), for the margin of a MarginConfig:
    the reference's entry point in the backend table (dcq_ops.backends), which ``backend="auto"``
    falls back to when no compiled kernel runs. Up to BLOCK_LOGITS logits (N K) it is the plain
    ``dcq_cross_entropy`` (second derivatives included); above, ``loss_rows_blocked``, whose memory
    does not grow with N K (first derivative only)."""
    if embeddings.shape[0] * queue_weights.shape[0] <= BLOCK_LOGITS:
        return dcq_cross_entropy(embeddings, class_weights, labels, queue_weights, queue_labels, **margin.kwargs(),
                                 reduction="none")
    return loss_rows_blocked(embeddings, class_weights, labels, queue_weights, queue_labels, margin)
