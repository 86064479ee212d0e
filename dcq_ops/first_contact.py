"""The first-contact check: the first call of a fused backend ("triton", "chunked") for a
shape class is compared with an independent backend, within an error bound derived from
where the backends round (docs/numerics.md, "The first-contact check").

- **When**: at the first call of a shape class only, eagerly: the moment the kernels are
  compiled and autotuned anyway. The check reads its numbers on the host (it synchronises
  once); every later call of the class is one dictionary lookup, with no synchronisation.
  ``warmup()`` (or ``DCQLoss.prepare(batch_shapes)``) makes that first call before
  training, e.g. before capturing CUDA graphs. Not checked: calls traced by
  ``torch.compile`` and calls under CUDA-graph capture (they cannot read a number on the
  host; their shape class is checked at its first eager call), and the sharded queue's
  partials and finalize (dcq_ops.parallel).
- **Shape class** (``shape_class``): the backend, the device, the dtypes of the
  embeddings, class weights and queue, the rows N and the queue size K rounded up to a
  power of two (N at least 16, as the Triton autotuner's row bucket), D, whether a
  gradient is computed, whether inter-class filtering is on, and the float32 matmul
  precision: what selects a compiled kernel and, nearly, its autotuned configuration.
- **Against what**: "triton" against "chunked" where it runs (else the reference);
  "chunked" against the reference; on ``CHECK_ROWS`` rows spread over the batch (a row's
  loss depends on its own row and the queue only), loss and gradient. When "triton"
  disagrees with "chunked", the reference decides.
- **The bound** (``difference_bound``): per row, first order, from the rounding of each
  backend's GEMM operands (the model of tests/bounds.py) and fp32 (or float64) arithmetic;
  see the function.
- **On a mismatch**: one ``RuntimeWarning`` with the numbers; this call and every later
  call of the class run the fallback ("chunked" for "triton" where it runs, else the
  reference; itself checked at its own first contact); ``dcq_ops.backends()`` reports the
  demotion.
- **Skip**: ``DCQ_OPS_SKIP_FIRST_CONTACT=1`` (read at the first call of each shape class).
- **CPU**: the check runs there too ("chunked" is the CPU's production path): the
  reference on at most 16 rows, once per shape class.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from dataclasses import asdict, dataclass

import torch

from dcq_ops import reference
from dcq_ops.backends import (FUSED_BACKENDS, Demotion, any_demotions, clear_demotions, demotion_keys, demotion_of,
                              entry_point, record_demotion, why_unavailable)
from dcq_ops.margin import MarginConfig
from dcq_ops.rounding_bound import GemmRounding, arithmetic_dtype, difference_bound, gemm_rounding

SKIP_ENV = "DCQ_OPS_SKIP_FIRST_CONTACT"

# Rows of the batch compared (spread over it, first and last included).
CHECK_ROWS = 16

# ----------------------------------------------------------------------------
# State


@dataclass(frozen=True)
class Outcome:
    """What the first-contact check found for one shape class.

    Attributes
    ----------
    backend : str
        The fused backend checked.
    device, shape_class : str
        Where, and the shape class in words.
    status : str
        "passed", "demoted" or "skipped".
    comparator : str or None
        The backend it was compared with (None when skipped).
    fallback : str or None
        What runs instead when demoted.
    rows_compared, rows_near_threshold : int
        Rows whose loss was compared (those the other backend's loss is finite for); of
        them, those with a kept cosine within the rounding of the filtering threshold (their
        bound includes the jump of filtering: ``difference_bound``).
    loss_error, loss_bound, grad_error, grad_bound : float or None
        The row with the largest error / bound ratio: its error and its bound (gradient:
        L2 norm of the row; None without a gradient).
    reason : str
        Why skipped, or the mismatch in words.
    """

    backend: str
    device: str
    shape_class: str
    status: str
    comparator: str | None = None
    fallback: str | None = None
    rows_compared: int = 0
    rows_near_threshold: int = 0
    loss_error: float | None = None
    loss_bound: float | None = None
    grad_error: float | None = None
    grad_bound: float | None = None
    reason: str = ""

    def as_dict(self) -> dict:
        """The outcome as a JSON-ready dict."""
        return asdict(self)


_OUTCOMES: dict = {}  # shape-class key -> Outcome


def outcomes() -> list[Outcome]:
    """Every shape class checked (or skipped) so far, in order.

    Returns
    -------
    list of Outcome
    """
    return list(_OUTCOMES.values())


def outcome_of(key: tuple) -> Outcome | None:
    """The outcome of one shape class (``shape_class``), or None if it was not checked yet."""
    return _OUTCOMES.get(key)


def reset() -> None:
    """Forget every outcome and demotion: the next call of each shape class is checked again
    (for tests, and for a process that changed its GPU or its Triton)."""
    _OUTCOMES.clear()
    clear_demotions()


def skip_requested() -> bool:
    """Whether ``DCQ_OPS_SKIP_FIRST_CONTACT`` asks to skip the check ("1", "true", "yes")."""
    return os.environ.get(SKIP_ENV, "0").strip().lower() in ("1", "true", "yes")


def _bucket(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, n - 1).bit_length())


def shape_class(backend: str, embeddings, class_weights, queue_weights, margin: MarginConfig,
                compute_grad: bool) -> tuple:
    """The key of a call's shape class (see the module docstring).

    Parameters
    ----------
    backend : str
        "triton" or "chunked".
    embeddings, class_weights, queue_weights : torch.Tensor
        The call's [N, D], [N, D] and [K, D] tensors.
    margin : MarginConfig
    compute_grad : bool
        Whether the call computes the gradient.

    Returns
    -------
    tuple
    """
    rows, dim = embeddings.shape
    return (backend, str(embeddings.device), embeddings.dtype, class_weights.dtype, queue_weights.dtype,
            _bucket(rows, 16), _bucket(queue_weights.shape[0]), dim, bool(compute_grad),
            margin.interclass_filtering_threshold > 0, torch.get_float32_matmul_precision())


def describe(key: tuple) -> str:
    """A shape-class key in words."""
    _, device, x_dtype, k_dtype, q_dtype, rows, slots, dim, grad, filtered, precision = key
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    return (f"embeddings {name(x_dtype)}, class weights {name(k_dtype)}, queue {name(q_dtype)}, N<={rows}, "
            f"K<={slots}, D={dim}, {'with' if grad else 'without'} gradient"
            f"{', filtering' if filtered else ''}{'' if precision == 'highest' else f', fp32 matmul {precision}'}")


# ----------------------------------------------------------------------------
# The check


def no_autocast(device_type: str):
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def check_rows(rows: int, device) -> torch.Tensor:
    """The rows the check compares: at most ``CHECK_ROWS``, spread over the batch, first
    and last included.

    Parameters
    ----------
    rows : int
        N.
    device : torch.device or str

    Returns
    -------
    torch.Tensor
        int64 indices.
    """
    count = min(rows, CHECK_ROWS)
    return torch.linspace(0, rows - 1, count, dtype=torch.float64).round().long().unique().to(device)


def comparator_of(backend: str, device: torch.device) -> str:
    """What ``backend``'s first call is compared with: "chunked" for "triton" where it runs,
    else the reference."""
    if backend == "triton" and why_unavailable("chunked", device) is None:
        return "chunked"
    return "reference"


def fallback_of(backend: str, device: torch.device) -> str:
    """What runs when ``backend`` fails its check: "chunked" for "triton" where it runs, else
    the reference."""
    return comparator_of(backend, device)


def slice_loss_and_grad(backend: str, embeddings, class_weights, labels, queue_weights, queue_labels,
                        margin: MarginConfig, compute_grad: bool):
    """(loss rows, gradient rows or None) of ``backend`` on a few rows, detached; the
    reference's gradient by autograd (of each row's own loss), in its arithmetic dtype.

    Parameters
    ----------
    backend : str
        "triton", "chunked" or "reference".
    embeddings, class_weights, labels, queue_weights, queue_labels : torch.Tensor
    margin : MarginConfig
    compute_grad : bool

    Returns
    -------
    (torch.Tensor, torch.Tensor or None)
    """
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
        As in Outcome.
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
        The two backends' (``gemm_rounding``).

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


def _not_now(embeddings, queue_weights) -> tuple[str, bool] | None:
    """None if the check can run now; else (why not, whether to remember it for the class)."""
    if skip_requested():
        return f"skipped: {SKIP_ENV}=1", True
    if embeddings.device.type not in ("cpu", "cuda"):
        return f"no check on device type {embeddings.device.type!r}", False
    if embeddings.shape[0] == 0 or queue_weights.shape[0] == 0:
        return "nothing to compare (no rows or an empty queue)", False
    if embeddings.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return "CUDA-graph capture (call dcq_ops.warmup or DCQLoss.prepare before capturing)", False
    return None


def _verdict(backend, rows, grad, embeddings, class_weights, labels, queue_weights, queue_labels, margin,
             compute_grad):
    """(Comparison, the backend it was against) of a fused call's rows and gradient rows."""
    device = embeddings.device
    index = check_rows(embeddings.shape[0], device)
    picked = (embeddings[index].detach(), class_weights[index].detach(), labels[index], queue_weights, queue_labels)
    fast_loss = rows.detach()[index]
    fast_grad = grad.detach()[index] if compute_grad else None
    dtypes = (embeddings.dtype, queue_weights.dtype, class_weights.dtype)
    verdict = comparator = None
    for other in dict.fromkeys((comparator_of(backend, device), "reference")):  # the reference decides
        ref_loss, ref_grad = slice_loss_and_grad(other, *picked, margin, compute_grad)
        roundings = (gemm_rounding(backend, *dtypes), gemm_rounding(other, *dtypes))
        verdict = compare(fast_loss, fast_grad, ref_loss, ref_grad, picked, margin, roundings)
        comparator = other
        if verdict.ok:
            break
    return verdict, comparator


def _run_check(backend, key, embeddings, class_weights, labels, queue_weights, queue_labels, margin,
               compute_grad):
    """The first call of a shape class: the fused call itself, checked on a few rows."""
    rows, grad = entry_point(backend, "loss_and_grad")(embeddings, class_weights, labels, queue_weights,
                                                       queue_labels, margin)
    where, words = str(embeddings.device), describe(key)
    try:
        with no_autocast(embeddings.device.type):
            verdict, comparator = _verdict(backend, rows, grad, embeddings, class_weights, labels, queue_weights,
                                           queue_labels, margin, compute_grad)
    except torch.OutOfMemoryError as exc:  # the comparison's memory (the reference copies the queue to fp32)
        reason = f"skipped: out of memory for the comparison ({str(exc).splitlines()[0]})"
        _OUTCOMES[key] = Outcome(backend, where, words, "skipped", reason=reason)
        warnings.warn(f"dcq_ops: the first-contact check of backend {backend!r} on {where} for {words} was "
                      f"{reason}; the call runs unchecked. Run dcq_ops.warmup (or DCQLoss.prepare) before the "
                      "model takes the memory.", RuntimeWarning, stacklevel=4)
        return rows
    numbers = dict(rows_compared=verdict.rows_compared, rows_near_threshold=verdict.rows_near_threshold,
                   loss_error=verdict.loss_error, loss_bound=verdict.loss_bound, grad_error=verdict.grad_error,
                   grad_bound=verdict.grad_bound)
    if verdict.ok:
        _OUTCOMES[key] = Outcome(backend, where, words, "passed", comparator, **numbers)
        return rows
    fallback = fallback_of(backend, embeddings.device)
    message = (f"dcq_ops: the first-contact check of backend {backend!r} failed on {where} for {words}: "
               f"{verdict.reason}, on {verdict.rows_compared} rows compared with {comparator!r}. This call and "
               f"every later call of this shape class run {fallback!r} instead (dcq_ops.backends() reports it). "
               f"Please report it with the output of `python -m dcq_ops.check`; {SKIP_ENV}=1 skips the check.")
    _OUTCOMES[key] = Outcome(backend, where, words, "demoted", comparator, fallback, reason=verdict.reason,
                             **numbers)
    record_demotion(key, Demotion(backend, fallback, where, words, verdict.reason, message))
    warnings.warn(message, RuntimeWarning, stacklevel=4)
    return loss_rows(fallback, embeddings, class_weights, labels, queue_weights, queue_labels, margin)


def _traced_demotion(backend, embeddings, class_weights, queue_weights, margin, compute_grad):
    """The demotion of a call traced by torch.compile, if any: the shape class without the
    float32 matmul precision (reading it would break the graph), so only where some
    demotion exists at all."""
    if not any_demotions():
        return None
    rows, dim = embeddings.shape
    prefix = (backend, str(embeddings.device), embeddings.dtype, class_weights.dtype, queue_weights.dtype,
              _bucket(rows, 16), _bucket(queue_weights.shape[0]), dim, bool(compute_grad),
              margin.interclass_filtering_threshold > 0)
    for demotion_key in demotion_keys():
        if demotion_key[:-1] == prefix:
            return demotion_of(demotion_key)
    return None


def loss_rows(backend: str, embeddings, class_weights, labels, queue_weights, queue_labels,
              margin: MarginConfig) -> torch.Tensor:
    """``backend``'s loss rows [N] (differentiable with respect to ``embeddings``), checked at
    the first call of its shape class; a demoted class runs its fallback (dcq_cross_entropy
    calls this with the resolved backend).

    Parameters
    ----------
    backend : str
        "triton", "chunked" or "reference" (the reference is never checked).
    embeddings, class_weights, labels, queue_weights, queue_labels : torch.Tensor
        As ``dcq_cross_entropy`` passes them (checked, labels int64, weights detached).
    margin : MarginConfig

    Returns
    -------
    torch.Tensor
    """
    arguments = (embeddings, class_weights, labels, queue_weights, queue_labels, margin)
    if backend not in FUSED_BACKENDS:
        return entry_point(backend, "loss_rows")(*arguments)
    compute_grad = embeddings.requires_grad and torch.is_grad_enabled()
    if torch.compiler.is_compiling():  # traced: no check, but a demoted class stays demoted
        demoted = _traced_demotion(backend, embeddings, class_weights, queue_weights, margin, compute_grad)
        return loss_rows(demoted.fallback, *arguments) if demoted else entry_point(backend, "loss_rows")(*arguments)
    key = shape_class(backend, embeddings, class_weights, queue_weights, margin, compute_grad)
    outcome = _OUTCOMES.get(key)
    if outcome is None:
        not_now = _not_now(embeddings, queue_weights)
        if not_now is None:
            return _run_check(backend, key, *arguments, compute_grad)
        reason, remember = not_now
        if remember:
            _OUTCOMES[key] = Outcome(backend, str(embeddings.device), describe(key), "skipped", reason=reason)
    elif outcome.status == "demoted":
        return loss_rows(outcome.fallback, *arguments)
    return entry_point(backend, "loss_rows")(*arguments)
