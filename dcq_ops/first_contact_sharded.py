"""The first-contact check of the sharded queue (dcq_ops.parallel.sharded): the partials of
every gathered row over this rank's shard, and the finalize, checked at the first call of
each shape class as dcq_ops.first_contact checks a whole fused call.

The loss of a row needs every rank's shard, which no rank holds; but the partials of this
rank's own rows over its shard, finalised on their own, are the loss and gradient of those
rows against the shard alone. That is compared with the loss computed in float64 against
the shard (``row_check.exact_loss_and_grad``, the shard read in blocks), within the same
bound, on the rows of ``row_check.check_rows`` among this rank's rows. Any exception of the
partials, or a mismatch, demotes the backend for the class on this rank, with one warning:
the partials and the finalize of this call and of every later call run the next fused
backend ("triton" -> "chunked"); the ranks may run different backends, whose partials
merge alike (docs/loss.md). Without another fused backend the rank keeps its own and the
warning says that its numbers are unchecked: raising on one rank would leave the other
ranks waiting in the collectives.
"""

from __future__ import annotations

import torch

from dcq_ops import first_contact
from dcq_ops.algebra import Partials
from dcq_ops.backends import why_unavailable
from dcq_ops.rounding_bound import gemm_rounding
from dcq_ops.row_check import EXACT, check_rows, compare, exact_loss_and_grad, no_autocast

SHARDED = "sharded"  # first element of a sharded class's key


def _fused_fallback(backend: str, device: torch.device) -> str | None:
    """The next fused backend after ``backend`` that runs on ``device`` (partials and finalize
    exist on "triton" and "chunked" only), or None."""
    if backend == "triton" and why_unavailable("chunked", device) is None:
        return "chunked"
    return None


def _with_backend(kernels, backend: str):
    """``kernels`` (a LossKernels) running ``backend``."""
    return type(kernels)(kernels.margin, backend)


def sharded_partials(kernels, gathered, gathered_labels, queue_weights, queue_labels, batch, first_row: int):
    """The partials of every gathered row over this rank's shard, and the LossKernels that
    finalises them: ``kernels``, or its fallback for a demoted class; the first call of each
    class is checked (see the module docstring).

    Parameters
    ----------
    kernels : LossKernels
        The loss's kernels (their fused backend computes partials and finalize).
    gathered, gathered_labels : torch.Tensor
        Every rank's rows, padded: [C * world, D] and [C * world].
    queue_weights, queue_labels : torch.Tensor
        This rank's shard.
    batch : Batch
        This rank's batch (its rows, class weights and labels; ``compute_grad``).
    first_row : int
        Where this rank's rows start in ``gathered``.

    Returns
    -------
    (Partials, LossKernels)
    """
    compute_grad = batch.compute_grad
    backend = kernels.fused_backend(gathered, queue_weights)
    if torch.compiler.is_compiling():  # traced: not checked (first_contact says so once)
        return kernels.partials(gathered, gathered_labels, queue_weights, queue_labels,
                                compute_grad=compute_grad), kernels
    key = (SHARDED,) + first_contact.shape_class(backend, gathered, batch.class_weights, queue_weights,
                                                  kernels.margin, compute_grad)
    outcome = first_contact.outcome_of(key)
    if outcome is not None and outcome.status == "demoted" and outcome.fallback is not None:
        kernels = _with_backend(kernels, outcome.fallback)
        return kernels.partials(gathered, gathered_labels, queue_weights, queue_labels,
                                compute_grad=compute_grad), kernels
    if outcome is not None or batch.placeholder or batch.rows == 0:
        return kernels.partials(gathered, gathered_labels, queue_weights, queue_labels,
                                compute_grad=compute_grad), kernels
    not_now = first_contact._not_now(gathered, queue_weights)
    if not_now is not None:
        reason, remember = not_now
        if remember:
            first_contact.record_skip(key, backend, gathered.device, reason)
        return kernels.partials(gathered, gathered_labels, queue_weights, queue_labels,
                                compute_grad=compute_grad), kernels
    device = gathered.device
    words = "sharded partials and finalize, " + first_contact.describe(key[1:], gathered.shape[0],
                                                                         queue_weights.shape[0])
    try:
        part = kernels.partials(gathered, gathered_labels, queue_weights, queue_labels, compute_grad=compute_grad)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - a compile or launch error: demoted on this rank
        fallback = _fused_fallback(backend, device)
        first_contact.record_demotion_of(key, backend, device, words, first_contact.first_line(exc), None, {},
                                         fallback, call_failed=True)
        if fallback is None:
            raise
        kernels = _with_backend(kernels, fallback)
        return kernels.partials(gathered, gathered_labels, queue_weights, queue_labels,
                                compute_grad=compute_grad), kernels
    try:
        with no_autocast(device.type):
            verdict = _verdict(kernels, backend, part, batch, queue_weights, queue_labels, first_row, key[-1][0])
    except torch.OutOfMemoryError as exc:
        first_contact.record_skip(key, backend, device, f"skipped: out of memory for the comparison "
                                  f"({first_contact.first_line(exc)})", warn=True)
        return part, kernels
    except Exception as exc:  # noqa: BLE001 - the check's own failure must not stop the training
        first_contact.record_skip(key, backend, device, f"skipped: the comparison itself failed "
                                  f"({first_contact.first_line(exc)})", warn=True)
        return part, kernels
    numbers = dict(rows_compared=verdict.rows_compared, rows_near_threshold=verdict.rows_near_threshold,
                   loss_error=verdict.loss_error, loss_bound=verdict.loss_bound, grad_error=verdict.grad_error,
                   grad_bound=verdict.grad_bound)
    if verdict.ok:
        first_contact.record_pass(key, backend, device, words, "float64", numbers)
        return part, kernels
    fallback = _fused_fallback(backend, device)
    first_contact.record_demotion_of(key, backend, device, words, verdict.reason, "float64", numbers, fallback,
                                     call_failed=False)
    if fallback is None:
        return part, kernels
    kernels = _with_backend(kernels, fallback)
    return kernels.partials(gathered, gathered_labels, queue_weights, queue_labels,
                            compute_grad=compute_grad), kernels


def _verdict(kernels, backend, part: Partials, batch, queue_weights, queue_labels, first_row: int,
             last_row_block: int):
    """This rank's rows: their partials over the shard, finalised alone, against the float64
    loss over the shard."""
    rows = batch.rows
    device = batch.embeddings.device
    index = check_rows(rows, device, min(rows, last_row_block))
    in_gathered = index + first_row
    own = Partials(part.row_max[in_gathered], part.row_sum[in_gathered],
                   None if part.accumulator is None else part.accumulator[in_gathered])
    embeddings, class_weights = batch.embeddings[index].detach(), batch.class_weights[index].detach()
    labels = batch.labels[index]
    compute_grad = part.accumulator is not None
    loss, grad = kernels.finalize(embeddings, class_weights, own, compute_grad=compute_grad)
    exact_loss, exact_grad = exact_loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels,
                                                 kernels.margin, compute_grad)
    picked = (embeddings, class_weights, labels, queue_weights, queue_labels)
    roundings = (gemm_rounding(backend, embeddings.dtype, queue_weights.dtype, class_weights.dtype), EXACT)
    return compare(loss, grad, exact_loss, exact_grad, picked, kernels.margin, roundings)
