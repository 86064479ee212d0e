"""What the first-contact check compares (dcq_ops.first_contact): a few rows of a fused
call's loss and gradient against another backend's, or against the loss computed in float64
from the same inputs, within ``rounding_bound.difference_bound``.

The float64 loss (``exact_loss_and_grad``: ``reference.loss_rows_blocked`` in float64) reads
the queue in blocks of ``EXACT_BLOCK_BYTES``, so the comparison never holds a copy of the
whole queue: its memory is that of a block and of the rows compared, a small part of what
the fused call itself needs.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch

from dcq_ops import reference
from dcq_ops.backends import entry_point
from dcq_ops.margin import MarginConfig
from dcq_ops.rounding_bound import GemmRounding, arithmetic_dtype, difference_bound

# Rows of the batch compared, spread over it (first and last included), besides every row
# of the launch's last row block.
CHECK_ROWS = 16

# Bytes of a float64 block of the queue in the float64 loss, per device type: on the CPU
# 1 MiB (256 slots at D = 512), where the fused call itself needs a few MiB and freed blocks
# stay in the process's memory (8 MiB blocks measured 45-65 MiB of peak RSS, 1 MiB 5 MiB);
# on a GPU 16 MiB (4096 slots), a fraction of the fused call's workspaces, in few launches.
EXACT_BLOCK_BYTES = {"cpu": 1 << 20, "cuda": 16 << 20}

# How the float64 loss rounds: not at all, at the scale of an fp32 or 16-bit backend.
EXACT = GemmRounding(None, 0.0, False)


def no_autocast(device_type: str):
    """A context without autocast on ``device_type`` (the check computes in its own dtypes)."""
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_rows(rows: int, device, last_row_block: int = 1) -> torch.Tensor:
    """The rows the check compares: at most ``CHECK_ROWS`` spread over the batch (first and
    last included), and every row of the launch's last row block.

    Parameters
    ----------
    rows : int
        N.
    device : torch.device or str
    last_row_block : int
        Rows of the launch's last row block (``dcq_ops.launch_plans``): the last
        ``last_row_block`` rows are all compared.

    Returns
    -------
    torch.Tensor
        int64 indices, sorted, without repeats.
    """
    count = min(rows, CHECK_ROWS)
    spread = torch.linspace(0, rows - 1, count, dtype=torch.float64).round().long()
    tail = torch.arange(max(0, rows - max(1, last_row_block)), rows)
    return torch.cat([spread, tail]).unique().to(device)


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """On the CPU, torch's intra-op threads set to one for the block (then restored): the
    float64 loss runs hundreds of small per-block operations ([rows, 256] logits), which more
    threads slow down (measured on a busy 2-core machine: 11 s with 2 threads, 0.5 s with 1,
    at K = 2 x 10^4, D = 512)."""
    if device.type != "cpu" or torch.get_num_threads() == 1:
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def exact_loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels, margin: MarginConfig,
                        compute_grad: bool, *, block_slots: int | None = None):
    """The loss rows of docs/loss.md, and the gradient of each row's loss with respect to
    its embedding, computed in float64 from the same inputs, the queue read in blocks
    (``reference.loss_rows_blocked`` with ``dtype=torch.float64``, its gradient produced in
    the same pass).

    Parameters
    ----------
    embeddings, class_weights, labels : torch.Tensor
        The rows: [n, D], [n, D], [n].
    queue_weights, queue_labels : torch.Tensor
        The queue: [K, D] (any float dtype, converted block by block), [K].
    margin : MarginConfig
    compute_grad : bool
    block_slots : int, optional
        Queue entries per block (default: ``EXACT_BLOCK_BYTES`` of float64 for the device).

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
        float64 loss rows [n] and gradient rows [n, D] (None without ``compute_grad``),
        detached. Non-finite exactly where the reference's are (docs/loss.md).
    """
    rows, dim = embeddings.shape
    block_bytes = EXACT_BLOCK_BYTES.get(embeddings.device.type, EXACT_BLOCK_BYTES["cpu"])
    block_slots = block_slots or max(64, block_bytes // (8 * max(dim, 1)))
    with no_autocast(embeddings.device.type), torch.enable_grad(), _one_cpu_thread(embeddings.device):
        # float64 rows, so that the gradient comes back in float64 too (never rounded to fp32).
        x = embeddings.detach().to(torch.float64).requires_grad_(compute_grad)
        loss = reference.loss_rows_blocked(x, class_weights.detach(), labels, queue_weights.detach(), queue_labels,
                                           margin, dtype=torch.float64, block_rows=max(1, rows),
                                           block_slots=block_slots)
        grad = torch.autograd.grad(loss.sum(), x)[0] if compute_grad else None
    return loss.detach(), (None if grad is None else grad.detach())


def slice_loss_and_grad(backend: str, embeddings, class_weights, labels, queue_weights, queue_labels,
                        margin: MarginConfig, compute_grad: bool):
    """(loss rows, gradient rows or None) of ``backend`` on a few rows, detached: a fused
    backend's own entry point; "reference": the plain reference backend (fp32, or float64
    for float64 inputs), its gradient by autograd; "float64": ``exact_loss_and_grad``.

    Parameters
    ----------
    backend : str
        "triton", "chunked", "reference" or "float64".
    embeddings, class_weights, labels, queue_weights, queue_labels : torch.Tensor
    margin : MarginConfig
    compute_grad : bool

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
    """
    if backend == "float64":
        return exact_loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels, margin,
                                   compute_grad)
    with no_autocast(embeddings.device.type), torch.set_grad_enabled(compute_grad):
        if backend == "reference":
            x = embeddings.detach().to(arithmetic_dtype(embeddings, class_weights, queue_weights))
            x.requires_grad_(compute_grad)
            loss = reference.loss_rows(x, class_weights.detach(), labels, queue_weights.detach(), queue_labels, margin)
            grad = torch.autograd.grad(loss.sum(), x)[0] if compute_grad else None
        else:
            x = embeddings.detach().clone().requires_grad_(compute_grad)
            loss, grad = entry_point(backend, "loss_and_grad")(x, class_weights.detach(), labels,
                                                              queue_weights.detach(), queue_labels, margin)
            grad = grad if compute_grad else None
    return loss.detach(), (None if grad is None else grad.detach())


@dataclass(frozen=True)
class Comparison:
    """``compare``'s verdict: whether two backends agree on some rows, and the numbers.

    Attributes
    ----------
    ok : bool
    rows_compared, rows_near_threshold : int
        Rows whose loss was compared (those the other backend's loss is finite for); of
        them, those with a kept cosine within the rounding of the filtering threshold.
    loss_error, loss_bound, grad_error, grad_bound : float or None
        At the row of the largest error / bound ratio.
    reason : str
        The disagreement in words ("" when ok).
    """

    ok: bool
    rows_compared: int
    rows_near_threshold: int
    loss_error: float | None
    loss_bound: float | None
    grad_error: float | None
    grad_bound: float | None
    reason: str


def _worst(error: torch.Tensor, bound: torch.Tensor):
    if error.numel() == 0:
        return 0.0, 0.0, True
    ratio = error / bound
    at = int(torch.nan_to_num(ratio, nan=math.inf).argmax())
    worst_error, worst_bound = error[at].item(), bound[at].item()
    ok = bool(((error <= bound) & torch.isfinite(error)).all())
    return worst_error, worst_bound, ok


@torch.no_grad()
def compare(fast_loss, fast_grad, ref_loss, ref_grad, inputs, margin: MarginConfig,
            roundings: tuple[GemmRounding, GemmRounding]) -> Comparison:
    """Whether a backend's loss (and gradient) rows agree with another's within
    ``difference_bound``, and non-finite exactly where the other's loss is (docs/loss.md).

    Parameters
    ----------
    fast_loss, ref_loss : torch.Tensor
        [n] loss rows of the two backends.
    fast_grad, ref_grad : torch.Tensor or None
        [n, D] their gradient rows (None: the loss only).
    inputs : tuple of torch.Tensor
        (embeddings, class_weights, labels) of the n rows, then the queue (weights, labels).
    margin : MarginConfig
    roundings : tuple of GemmRounding
        The two backends' (``gemm_rounding``; ``EXACT`` for the float64 loss).

    Returns
    -------
    Comparison
    """
    embeddings, class_weights, labels, queue_weights, queue_labels = inputs
    finite = torch.isfinite(ref_loss)
    loss_bound, grad_bound, near_threshold = difference_bound(
        embeddings, class_weights, labels, queue_weights, queue_labels, margin, roundings,
        torch.where(finite, ref_loss, torch.zeros_like(ref_loss)),
        None if ref_grad is None else torch.nan_to_num(ref_grad))
    mismatched_nan = int((torch.isfinite(fast_loss) != finite).sum())
    compared = finite
    loss_error = (fast_loss.double() - ref_loss.double()).abs()[compared]
    loss_worst, loss_limit, loss_ok = _worst(loss_error, loss_bound[compared])
    grad_worst = grad_limit = None
    grad_ok = True
    if fast_grad is not None and ref_grad is not None:
        rows = compared & torch.isfinite(ref_grad).all(dim=1)
        grad_error = (fast_grad.double() - ref_grad.double()).norm(dim=1)[rows]
        grad_worst, grad_limit, grad_ok = _worst(grad_error, grad_bound[rows])
    reasons = []
    if mismatched_nan:
        reasons.append(f"{mismatched_nan} row(s) non-finite on one backend only")
    if not loss_ok:
        reasons.append(f"loss error {loss_worst:.3e} > bound {loss_limit:.3e}")
    if not grad_ok:
        reasons.append(f"gradient error {grad_worst:.3e} > bound {grad_limit:.3e} (L2 norm of a row)")
    return Comparison(not reasons, int(compared.sum()), int(near_threshold.sum()), loss_worst, loss_limit,
                      grad_worst, grad_limit, "; ".join(reasons))
