"""dcq_cross_entropy, the functional form of the loss (docs/loss.md): argument checks
(dcq_ops.validation, and the margin's own in MarginConfig), the backend from the
table of dcq_ops.backends (its first call of a shape class checked:
dcq_ops.first_contact), and the reduction."""

from __future__ import annotations

import torch

from dcq_ops import first_contact
from dcq_ops.algebra import reduce_rows
from dcq_ops.backends import select_backend
from dcq_ops.margin import MarginConfig
from dcq_ops.validation import check_loss_arguments, check_reduction


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
    backend: str = "auto",
) -> torch.Tensor:
    """The DCQ margin cross-entropy (docs/loss.md).

    The loss of each embedding against its own (normalised) class weight as the
    positive, with the queue's entries of other classes as negatives; empty slots
    (label < 0) and same-class entries are left out. The gradient flows to
    ``embeddings`` only.

    Parameters
    ----------
    embeddings : torch.Tensor
        x [N, D], float32, float16, bfloat16 or float64.
    class_weights : torch.Tensor
        k [N, D]: the weight generator's embeddings of a second view of each sample
        (normalised here; no gradient).
    labels : torch.Tensor
        y [N], integer, >= 0.
    queue_weights : torch.Tensor
        W [K, D], unit rows; their dtype is the GEMM operands' dtype.
    queue_labels : torch.Tensor
        Y [K], integer; -1 marks an empty slot.
    scale, m1, m2, m3 : float
        The positive logit is ``scale * (cos(m1 * acos(c) + m2) - m3)``; negatives
        ``scale * c``. Default: the paper's CosFace (s=50, m=0.3).
    interclass_filtering_threshold : float
        In [0, 1); a kept negative with cosine above it counts as 0, with no gradient
        (0 = off).
    straight_through_margin : bool
        Give the positive the gradient of ``scale * c`` (arcface_torch's ArcFace).
    reduction : str
        "mean", "sum" or "none".
    backend : str
        "auto", "triton", "chunked" or "reference" (``dcq_ops.backends()`` says which
        run here).

    Returns
    -------
    torch.Tensor
        The loss (a scalar, or [N] with ``reduction="none"``), fp32 (float64 for
        float64 inputs on "chunked" and "reference").

    Notes
    -----
    The fused backends take both GEMMs' operands in the queue's dtype and accumulate
    in fp32; with a float64 input, "chunked" and "reference" compute in float64 and
    "triton" refuses it ("auto" then runs "chunked"). A non-finite value in a row's
    inputs makes that row's loss and gradient NaN on every backend. The first call of
    a fused backend for a shape class is checked against an independent backend
    (dcq_ops.first_contact; ``DCQ_OPS_SKIP_FIRST_CONTACT=1`` skips it).
    """
    check_loss_arguments(embeddings, class_weights, labels, queue_weights, queue_labels)
    margin = MarginConfig(scale, m1, m2, m3, interclass_filtering_threshold, straight_through_margin)
    check_reduction(reduction)
    resolved = select_backend(embeddings.device, backend, input_dtypes=(embeddings.dtype, class_weights.dtype),
                              queue_dtype=queue_weights.dtype)
    # The first call of a fused backend for a shape class is checked (dcq_ops.first_contact).
    rows = first_contact.loss_rows(resolved, embeddings, class_weights.detach(), labels.long(),
                                   queue_weights.detach(), queue_labels.long(), margin)
    return reduce_rows(rows, reduction)
