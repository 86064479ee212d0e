"""The Triton backend's ops (kernels in dcq_ops.triton.kernels, launched by
dcq_ops.triton.launch), registered as the C++ side registers the chunked ones:

- ``dcq_ops::triton_dcq_cross_entropy``: the loss of docs/loss.md fused, (loss
  rows, gradient rows), with its autograd (the gradient is produced in the
  forward, so the backward only scales it and never reads the queue);
- ``dcq_ops::triton_dcq_cross_entropy_partials`` and
  ``dcq_ops::triton_dcq_cross_entropy_finalize``: the loss algebra's partials and
  finalize, apart for the sharded queue (dcq_ops.parallel), which merges the
  partials of every rank with collectives in between;

each with a fake kernel, so that torch.compile traces them and opcheck passes;
and the backend table's adapters (``loss_rows``, ``loss_and_grad``, ``partials``,
``finalize``: dcq_ops.backends), which take a MarginConfig.

Both GEMMs take their operands in the queue's dtype (bf16 by default on a GPU:
the tensor cores), accumulate in fp32, and everything after them is fp32. The
O(N D) prologue (normalisation, positive cosine, margin of the positive and its
derivative) is plain PyTorch on dcq_ops.margin's functions, which every backend
shares.
"""

from __future__ import annotations

import torch

from dcq_ops.margin import margin_derivative, margin_value
from dcq_ops.ops.fused_autograd import fused_fake, register_fused_autograd
from dcq_ops.triton import launch
from dcq_ops.triton.launch import FinalizeInputs


def _normalised(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x / max(||x||, 1e-12) in fp32 [N, D], 1 / max(||x||, 1e-12) in float64 [N],
    negated where ||x|| < 1e-12), as the chunked backend's normalise: ||x|| in units
    of the row's largest magnitude, so that the sum of squares neither overflows
    (|x| >= 1e19) nor underflows; an all-zero row stays zero, and a NaN or inf
    makes the row NaN (inf / inf). The inverse norm is float64 because for rows
    near 1e38 it is below float32's normal range (the finalize kernel's
    ``inv_norm_ptr`` says how it is used)."""
    x = x.float()
    largest = x.abs().amax(dim=1, keepdim=True)
    unit = torch.where(largest > 0, largest, torch.ones_like(largest))  # all-zero row, or NaN
    scaled = x / unit
    norm = scaled.norm(dim=1, keepdim=True)
    floor = torch.full_like(unit, 1e-12) / unit  # not 1e-12 * (1 / unit), which overflows for a subnormal unit
    scaled_norm = torch.maximum(norm, floor)
    inv_norm = 1.0 / (unit.double() * scaled_norm.double())  # the product is exact in float64
    inv_norm = torch.where(norm < floor, -inv_norm, inv_norm)  # below 1e-12: x / 1e-12, no projection
    return (scaled / scaled_norm).contiguous(), inv_norm.reshape(-1)


def prologue(embeddings, class_weights, scale, m1, m2, m3, straight_through_margin) -> FinalizeInputs:
    """What finalize needs of each row besides its partials: the normalised
    embeddings and class weights, the positive's logit and its slope (with
    dcq_ops.margin's functions; the slope of s * c with straight_through_margin),
    and the inverse norm of the embeddings (float64, negated below 1e-12: _normalised)."""
    q, inv_norm = _normalised(embeddings)
    w, _ = _normalised(class_weights)
    positive_cos = (q * w).sum(dim=1)
    pos_logit = (scale * margin_value(positive_cos, m1, m2, m3)).contiguous()
    if straight_through_margin:
        pos_slope = torch.full_like(positive_cos, scale)
    else:
        pos_slope = (scale * margin_derivative(positive_cos, m1, m2)).contiguous()
    return FinalizeInputs(pos_logit, pos_slope, q, w, inv_norm.contiguous())


def _queue_pass(q, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold, compute_grad,
                **overrides) -> launch.Workspace:
    """The queue-pass kernels on the normalised rows q, in the GEMMs' dtype."""
    q_gemm = q.to(launch.gemm_dtype_of(queue_weights.dtype))
    return launch.queue_pass(q_gemm, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold,
                             compute_grad, **overrides)


def forward(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
            interclass_filtering_threshold, straight_through_margin, compute_grad, *, split_size=None,
            config=None):
    """The fused op's body: (loss per row fp32 [N], gradient fp32 [N, D] or [0, D]),
    partials per split then merge and finalize, in two kernels (three with the
    repair of a non-finite queue). ``split_size`` (queue entries per split) and
    ``config`` (dict with BLOCK_M, BLOCK_K, num_warps, num_stages) override the
    automatic choice; tests use them."""
    launch.check_device(embeddings.device)
    inputs = prologue(embeddings, class_weights, scale, m1, m2, m3, straight_through_margin)
    workspace = _queue_pass(inputs.q, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold,
                            compute_grad, split_size=split_size, config=config)
    return launch.finalize(workspace, inputs, scale)


# ----------------------------------------------------------------------------
# The ops


@torch.library.custom_op("dcq_ops::triton_dcq_cross_entropy", mutates_args=())
def triton_dcq_cross_entropy(
    embeddings: torch.Tensor,
    class_weights: torch.Tensor,
    labels: torch.Tensor,
    queue_weights: torch.Tensor,
    queue_labels: torch.Tensor,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    interclass_filtering_threshold: float,
    straight_through_margin: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss of docs/loss.md fused in Triton: (loss per row fp32 [N], gradient
    of each row's loss with respect to the embeddings fp32 [N, D], or [0, D] when
    compute_grad is false). Arguments are checked by dcq_cross_entropy."""
    return forward(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2, m3,
                   interclass_filtering_threshold, straight_through_margin, compute_grad)


@triton_dcq_cross_entropy.register_fake
def _triton_dcq_cross_entropy_fake(embeddings, class_weights, labels, queue_weights, queue_labels, scale, m1, m2,
                                   m3, interclass_filtering_threshold, straight_through_margin, compute_grad):
    return fused_fake(embeddings, compute_grad)


register_fused_autograd("dcq_ops::triton_dcq_cross_entropy", num_inputs=12)


@torch.library.custom_op("dcq_ops::triton_dcq_cross_entropy_partials", mutates_args=())
def triton_dcq_cross_entropy_partials(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    queue_weights: torch.Tensor,
    queue_labels: torch.Tensor,
    scale: float,
    interclass_filtering_threshold: float,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss algebra's partials of every row over this queue (or shard):
    (row_max [N] in natural-log units, -inf where nothing was kept; row_sum [N];
    accumulator [N, D], or [0, D] when compute_grad is false), fp32."""
    launch.check_device(embeddings.device)
    q, _ = _normalised(embeddings)
    return launch.merge(_queue_pass(q, labels, queue_weights, queue_labels, scale, interclass_filtering_threshold,
                                    compute_grad))


@triton_dcq_cross_entropy_partials.register_fake
def _triton_dcq_cross_entropy_partials_fake(embeddings, labels, queue_weights, queue_labels, scale,
                                            interclass_filtering_threshold, compute_grad):
    row_max, accumulator = fused_fake(embeddings, compute_grad)
    return row_max, torch.empty_like(row_max), accumulator


@torch.library.custom_op("dcq_ops::triton_dcq_cross_entropy_finalize", mutates_args=())
def triton_dcq_cross_entropy_finalize(
    embeddings: torch.Tensor,
    class_weights: torch.Tensor,
    row_max: torch.Tensor,
    row_sum: torch.Tensor,
    accumulator: torch.Tensor,
    scale: float,
    m1: float,
    m2: float,
    m3: float,
    straight_through_margin: bool,
    compute_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss algebra's finalize: (loss rows fp32 [N], gradient rows fp32 [N, D],
    or [0, D] when compute_grad is false) from the merged partials of every row
    (natural-log units; the accumulator is read with compute_grad only)."""
    launch.check_device(embeddings.device)
    inputs = prologue(embeddings, class_weights, scale, m1, m2, m3, straight_through_margin)
    return launch.finalize(launch.workspace_of_partials(row_max, row_sum, accumulator, compute_grad), inputs, scale)


@triton_dcq_cross_entropy_finalize.register_fake
def _triton_dcq_cross_entropy_finalize_fake(embeddings, class_weights, row_max, row_sum, accumulator, scale, m1, m2,
                                            m3, straight_through_margin, compute_grad):
    return fused_fake(embeddings, compute_grad)


# ----------------------------------------------------------------------------
# The backend table's entry points (dcq_ops.backends): the ops with a MarginConfig.


def loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels, margin):
    """(loss of every row [N], differentiable with respect to ``embeddings``; the gradient
    of each row's loss [N, D] fp32, or [0, D] when no gradient is wanted), one fused call:
    what dcq_ops.first_contact checks on the first call of a shape class."""
    compute_grad = embeddings.requires_grad and torch.is_grad_enabled()
    return triton_dcq_cross_entropy(
        embeddings, class_weights, labels, queue_weights, queue_labels, margin.scale, margin.m1, margin.m2,
        margin.m3, margin.interclass_filtering_threshold, margin.straight_through_margin, compute_grad)


def loss_rows(embeddings, class_weights, labels, queue_weights, queue_labels, margin) -> torch.Tensor:
    """The loss of every row [N], differentiable with respect to ``embeddings``."""
    rows, _ = loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels, margin)
    return rows


def partials(embeddings, labels, queue_weights, queue_labels, margin, compute_grad: bool):
    """(row_max, row_sum, accumulator) of every row over this queue slice."""
    return triton_dcq_cross_entropy_partials(embeddings, labels, queue_weights, queue_labels, margin.scale,
                                             margin.interclass_filtering_threshold, compute_grad)


def finalize(embeddings, class_weights, row_max, row_sum, accumulator, margin, compute_grad: bool):
    """(loss rows, gradient rows) from the merged partials of every row."""
    return triton_dcq_cross_entropy_finalize(embeddings, class_weights, row_max, row_sum, accumulator,
                                             margin.scale, margin.m1, margin.m2, margin.m3,
                                             margin.straight_through_margin, compute_grad)
