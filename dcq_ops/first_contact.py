"""The first-contact check: the first call of a fused backend ("triton", "chunked") for a
shape class is checked, and any failure of it demotes the backend for that class instead of
reaching the user (docs/numerics.md, "The first-contact check").

- **When**: at the first call of a shape class only, eagerly: the moment the kernels are
  compiled and autotuned anyway. The check reads its numbers on the host (it synchronises
  once); every later call of the class is one dictionary lookup, with no synchronisation.
  ``warmup()`` (or ``DCQLoss.prepare(batch_shapes)``) makes that first call before
  training, e.g. before capturing CUDA graphs or compiling. Calls traced by
  ``torch.compile`` and calls under CUDA-graph capture cannot be checked (they cannot read
  a number on the host): the first such call warns once, and a demoted class stays
  demoted in a compiled graph.
- **Shape class** (``shape_class``): the backend, the device, the dtypes of the
  embeddings, class weights and queue, D, whether a gradient is computed, whether
  inter-class filtering is on, the float32 matmul precision, and the launch plan of the
  call (``dcq_ops.launch_plans``: the split of the queue, the row and queue tail blocks,
  the tile and the autotuner's buckets): another batch size with another split or tail is
  another class.
- **What fails**: any exception of the fused call (a compile error, a launch error, an
  asynchronous CUDA error: the first call synchronises once, so it surfaces there; not
  ``torch.OutOfMemoryError``, which is the run's memory and is re-raised, nor
  ``KeyboardInterrupt``; bad input was refused before, by validation) and results outside
  the error bound (``dcq_ops.row_check``).
- **Against what**: on ``row_check.CHECK_ROWS`` rows spread over the batch and every row
  of the launch's last row block (a row's loss depends on its own row and the queue only),
  loss and gradient: "triton" first against "chunked" where it runs; "chunked", and
  "triton" where the two disagree, against the loss computed in float64 from the same
  inputs, the queue read in blocks (``row_check.exact_loss_and_grad``): the float64
  loss decides, never an fp32 result.
- **The bound** (``rounding_bound.difference_bound``): per row, first order, from the
  rounding of each backend's GEMM operands and its fp32 (or float64) arithmetic.
- **On a failure**: one ``RuntimeWarning`` naming the error or the numbers; this call and
  every later call of the class run the fallback ("triton" -> "chunked" -> the reference,
  skipping what cannot run; each checked at its own first contact); ``dcq_ops.backends()``
  and ``python -m dcq_ops.check`` report the demotion and its reason.
- **Skip**: ``DCQ_OPS_SKIP_FIRST_CONTACT=1`` (read at the first call of each shape class).
  A comparison that fails by itself (out of memory, or an error of the check's own code)
  is reported as "skipped" with a warning, and the call returns the fused result.
- **Sharded queue** (``dcq_ops.first_contact_sharded.sharded_partials``): the partials of
  the rank's own rows over its shard, finalised on their own, are checked the same way
  against the float64 loss over the shard, at the first call of each class.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import asdict, dataclass

import torch

from dcq_ops import launch_plans
from dcq_ops.backends import FUSED_BACKENDS, clear_enqueue_state, entry_point, why_unavailable
from dcq_ops.demotions import Demotion, clear_demotions, record_demotion
from dcq_ops.margin import MarginConfig
from dcq_ops.rounding_bound import gemm_rounding
from dcq_ops.row_check import (CHECK_ROWS, EXACT, Comparison, check_rows, compare, no_autocast,  # noqa: F401
                               slice_loss_and_grad)

SKIP_ENV = "DCQ_OPS_SKIP_FIRST_CONTACT"

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
        "passed", "demoted", "skipped", or "failed" (failed with no other backend to run:
        the sharded queue's partials when only one fused backend runs).
    comparator : str or None
        What it was compared with at the end: "chunked", or "float64" (the loss computed in
        float64 from the same inputs); None when skipped or when the call itself failed.
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
        Why skipped or demoted: the mismatch with its numbers, or the exception of the
        fused call ("RuntimeError: CUDA error: ...", its type and first line).
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
_TRACED_DEMOTIONS: dict = {}  # _signature (no N, K) -> fallback, for calls traced by torch.compile
_SAID: set = set()  # what cannot be checked, said once: "compiled", "capture"


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
    _TRACED_DEMOTIONS.clear()
    _SAID.clear()
    clear_demotions()
    clear_enqueue_state()
    from dcq_ops.triton import hopper_probe  # (no Triton import) the Gluon sm_90 kernels' verdicts
    hopper_probe.forget()


def skip_requested() -> bool:
    """Whether ``DCQ_OPS_SKIP_FIRST_CONTACT`` asks to skip the check ("1", "true", "yes")."""
    return os.environ.get(SKIP_ENV, "0").strip().lower() in ("1", "true", "yes")


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
        ``(backend, device, dtypes..., D, gradient, filtering, float32 matmul precision,
        launch plan)``; the plan's first element is the rows of its last row block.
    """
    rows, dim = embeddings.shape
    plan = launch_plans.launch_plan(backend, rows, queue_weights.shape[0], dim, embeddings.dtype,
                                    queue_weights.dtype, bool(compute_grad), embeddings.device)
    return (backend, str(embeddings.device), embeddings.dtype, class_weights.dtype, queue_weights.dtype, dim,
            bool(compute_grad), margin.interclass_filtering_threshold > 0, torch.get_float32_matmul_precision(),
            plan)


_KEY_FIELDS = ("backend", "device", "embeddings dtype", "class weights dtype", "queue dtype", "D", "gradient",
               "filtering", "float32 matmul precision", "launch plan")


def describe(key: tuple, rows: int | None = None, slots: int | None = None) -> str:
    """A shape-class key in words (with the N and K of the call that met it, if given)."""
    _, device, x_dtype, k_dtype, q_dtype, dim, grad, filtered, precision, plan = key[-len(_KEY_FIELDS):]
    name = lambda d: str(d).replace("torch.", "")  # noqa: E731
    size = "" if rows is None else f"N={rows}, K={slots}, "
    return (f"embeddings {name(x_dtype)}, class weights {name(k_dtype)}, queue {name(q_dtype)}, {size}D={dim}, "
            f"{'with' if grad else 'without'} gradient{', filtering' if filtered else ''}"
            f"{'' if precision == 'highest' else f', fp32 matmul {precision}'}, launch plan {plan}")


def _signature(backend, embeddings, class_weights, queue_weights, margin, compute_grad) -> tuple:
    """What a call traced by torch.compile can read of its class as constants: the key without
    N, K and the launch plan (a graph may serve many N), i.e. ``key[:8]``."""
    return (backend, str(embeddings.device), embeddings.dtype, class_weights.dtype, queue_weights.dtype,
            embeddings.shape[1], bool(compute_grad), margin.interclass_filtering_threshold > 0)


# ----------------------------------------------------------------------------
# Fallbacks and demotions


def comparator_of(backend: str, device: torch.device) -> str:
    """What ``backend``'s first call is compared with first: "chunked" for "triton" where it
    runs, else the float64 loss ("float64")."""
    if backend == "triton" and why_unavailable("chunked", device) is None:
        return "chunked"
    return "float64"


def fallback_of(backend: str, device: torch.device) -> str:
    """What runs when ``backend`` fails its first contact: the next of "triton", "chunked",
    "reference" that can run on ``device``."""
    order = ("triton", "chunked", "reference")
    for candidate in order[order.index(backend) + 1:]:
        if why_unavailable(candidate, device) is None:
            return candidate
    return "reference"


def first_line(exc: BaseException) -> str:
    """An exception in a line: its type and the first line of its message."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"


def record_pass(key, backend, device, words, comparator, numbers) -> None:
    """Record that the class ``key`` passed."""
    _OUTCOMES[key] = Outcome(backend, str(device), words, "passed", comparator, **numbers)


def record_skip(key, backend, device, reason, *, warn: bool = False, words: str | None = None) -> None:
    """Record that the check of the class ``key`` was skipped (and say so, with ``warn``)."""
    where = str(device)
    words = words if words is not None else describe(key[-len(_KEY_FIELDS):])
    _OUTCOMES[key] = Outcome(backend, where, words, "skipped", reason=reason)
    if warn:
        warnings.warn(f"dcq_ops: the first-contact check of backend {backend!r} on {where} for {words} was "
                      f"{reason}; the call runs unchecked. Run dcq_ops.warmup (or DCQLoss.prepare) before the "
                      "model takes the memory.", RuntimeWarning, stacklevel=5)


def record_demotion_of(key, backend, device, words, reason, comparator, numbers, fallback, *, call_failed: bool,
                       signature=None) -> None:
    """Record and say (one ``RuntimeWarning``) that ``backend`` failed its first contact for the
    class ``key``: demoted to ``fallback``, or, with no fallback, "failed" (it keeps running)."""
    where = str(device)
    what = (f"its first call raised {reason}" if call_failed else
            f"{reason}, on {numbers['rows_compared']} rows compared with {comparator!r}")
    then = (f"This call and every later call of this shape class run {fallback!r} instead (dcq_ops.backends() "
            "reports it)." if fallback else
            "No other backend can run it here: it keeps running, unchecked.")
    message = (f"dcq_ops: the first-contact check of backend {backend!r} failed on {where} for {words}: {what}. "
               f"{then} Please report it with the output of `python -m dcq_ops.check`; {SKIP_ENV}=1 skips the "
               "check.")
    status = "demoted" if fallback else "failed"
    _OUTCOMES[key] = Outcome(backend, where, words, status, comparator, fallback, reason=reason, **numbers)
    if fallback:
        record_demotion(key, Demotion(backend, fallback, where, words, reason, message))
        if signature is not None:
            _TRACED_DEMOTIONS[signature] = fallback
    warnings.warn(message, RuntimeWarning, stacklevel=5)


def say_once(what: str, message: str) -> None:
    """Warn once per process (until ``reset``) about something the check cannot cover."""
    if what not in _SAID:
        _SAID.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


# ----------------------------------------------------------------------------
# The check


def _not_now(embeddings, queue_weights) -> tuple[str, bool] | None:
    """None if the check can run now; else (why not, whether to remember it for the class)."""
    if skip_requested():
        return f"skipped: {SKIP_ENV}=1", True
    if embeddings.device.type not in ("cpu", "cuda"):
        return f"no check on device type {embeddings.device.type!r}", False
    if embeddings.shape[0] == 0 or queue_weights.shape[0] == 0:
        return "nothing to compare (no rows or an empty queue)", False
    if embeddings.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        say_once("capture", "dcq_ops: a call of the loss under CUDA-graph capture met a shape class that the "
                 "first-contact check has not checked, and cannot check during a capture (it reads numbers on the "
                 "host): it runs unchecked. Call DCQLoss.prepare(batch_shapes) or dcq_ops.warmup(...) for every "
                 "batch size before capturing.")
        return "CUDA-graph capture (call dcq_ops.warmup or DCQLoss.prepare before capturing)", False
    return None


def _verdict(backend, last_row_block, rows, grad, embeddings, class_weights, labels, queue_weights, queue_labels,
             margin, compute_grad) -> tuple[Comparison, str]:
    """(Comparison, what it was against at the end) of a fused call's rows and gradient rows:
    "chunked" for "triton" first where it runs; the float64 loss decides."""
    device = embeddings.device
    index = check_rows(embeddings.shape[0], device, last_row_block)
    picked = (embeddings[index].detach(), class_weights[index].detach(), labels[index], queue_weights, queue_labels)
    fast_loss = rows.detach()[index]
    fast_grad = grad.detach()[index] if compute_grad else None
    dtypes = (embeddings.dtype, queue_weights.dtype, class_weights.dtype)
    own = gemm_rounding(backend, *dtypes)
    if comparator_of(backend, device) == "chunked":
        try:
            other_loss, other_grad = slice_loss_and_grad("chunked", *picked, margin, compute_grad)
        except torch.OutOfMemoryError:
            raise
        except Exception:  # noqa: BLE001 - the comparator failed: the float64 loss decides alone
            other_loss = None
        if other_loss is not None:
            verdict = compare(fast_loss, fast_grad, other_loss, other_grad, picked, margin,
                              (own, gemm_rounding("chunked", *dtypes)))
            if verdict.ok:
                return verdict, "chunked"
    exact_loss, exact_grad = slice_loss_and_grad("float64", *picked, margin, compute_grad)
    return compare(fast_loss, fast_grad, exact_loss, exact_grad, picked, margin, (own, EXACT)), "float64"


def _run_check(backend, key, signature, embeddings, class_weights, labels, queue_weights, queue_labels, margin,
               compute_grad):
    """The first call of a shape class: the fused call itself, checked on a few rows; any
    failure demotes the backend for the class and the fallback answers this call."""
    arguments = (embeddings, class_weights, labels, queue_weights, queue_labels, margin)
    device = embeddings.device
    words = describe(key, embeddings.shape[0], queue_weights.shape[0])
    try:
        rows, grad = entry_point(backend, "loss_and_grad")(*arguments)
        if device.type == "cuda":  # an asynchronous launch error surfaces here, as the fused call's
            torch.cuda.synchronize(device)
    except torch.OutOfMemoryError:
        raise  # the run's memory, not the backend's fault: the fallbacks need more, not less
    except Exception as exc:  # noqa: BLE001 - a compile or launch error: demoted, not the user's problem
        fallback = fallback_of(backend, device)
        record_demotion_of(key, backend, device, words, first_line(exc), None, {}, fallback, call_failed=True,
                           signature=signature)
        return loss_rows(fallback, *arguments)
    try:
        with no_autocast(device.type):
            verdict, comparator = _verdict(backend, key[-1][0], rows, grad, *arguments, compute_grad)
    except torch.OutOfMemoryError as exc:
        record_skip(key, backend, device, f"skipped: out of memory for the comparison ({first_line(exc)})",
                    warn=True, words=words)
        return rows
    except Exception as exc:  # noqa: BLE001 - the check's own failure must not stop the training
        record_skip(key, backend, device, f"skipped: the comparison itself failed ({first_line(exc)})", warn=True,
                    words=words)
        return rows
    numbers = dict(rows_compared=verdict.rows_compared, rows_near_threshold=verdict.rows_near_threshold,
                   loss_error=verdict.loss_error, loss_bound=verdict.loss_bound, grad_error=verdict.grad_error,
                   grad_bound=verdict.grad_bound)
    if verdict.ok:
        record_pass(key, backend, device, words, comparator, numbers)
        return rows
    fallback = fallback_of(backend, device)
    record_demotion_of(key, backend, device, words, verdict.reason, comparator, numbers, fallback, call_failed=False,
                       signature=signature)
    return loss_rows(fallback, *arguments)


def _traced_fallback(signature: tuple) -> str:
    """For a call traced by torch.compile: the fallback if any class of this signature
    (``_signature``: backend, device, dtypes, D, gradient, filtering; any N and K) was
    demoted ("" if none), and once per process a warning that traced calls are not checked
    (none if a class of the signature was checked, e.g. by warmup). Run by Dynamo while
    tracing, its result a constant of the graph."""
    fallback = _TRACED_DEMOTIONS.get(signature, "")
    checked = any(key[:8] == signature for key in _OUTCOMES)
    if not fallback and not checked:
        say_once("compiled", f"dcq_ops: backend {signature[0]!r} is called inside a torch.compile graph for a shape "
                 "class that the first-contact check has not checked, and cannot check there (it reads numbers on "
                 "the host): it runs unchecked. Call DCQLoss.prepare(batch_shapes) or dcq_ops.warmup(...) before "
                 "compiling, or make one eager call first.")
    return fallback


# What torch.compiler.assume_constant_result(_traced_fallback) sets, without importing
# torch._dynamo with dcq_ops (that imports Triton, before a test can choose its interpreter).
_traced_fallback._dynamo_marked_constant = True


def loss_rows(backend: str, embeddings, class_weights, labels, queue_weights, queue_labels,
              margin: MarginConfig) -> torch.Tensor:
    """``backend``'s loss rows [N] (differentiable with respect to ``embeddings``), checked at
    the first call of its shape class; a demoted class runs its fallback (dcq_cross_entropy
    calls this with the resolved backend, after validating the arguments).

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
        fallback = _traced_fallback(_signature(backend, embeddings, class_weights, queue_weights, margin,
                                               compute_grad))
        return loss_rows(fallback, *arguments) if fallback else entry_point(backend, "loss_rows")(*arguments)
    key = shape_class(backend, embeddings, class_weights, queue_weights, margin, compute_grad)
    outcome = _OUTCOMES.get(key)
    if outcome is None:
        not_now = _not_now(embeddings, queue_weights)
        if not_now is None:
            signature = _signature(backend, embeddings, class_weights, queue_weights, margin, compute_grad)
            return _run_check(backend, key, signature, *arguments, compute_grad)
        reason, remember = not_now
        if remember:
            record_skip(key, backend, embeddings.device, reason)
    elif outcome.status == "demoted":
        return loss_rows(outcome.fallback, *arguments)
    return entry_point(backend, "loss_rows")(*arguments)
