"""Which backend of the loss runs where: one table, ``BACKENDS``, and the lookups
every other module uses (nothing else decides where a backend runs).

Each row says on which device types and with which dtypes a backend computes, what
else it needs (the compiled extension, Triton, the interpreter for CPU tensors), and
its entry points: functions, or ``"module:function"`` for the Triton backend, whose
module (and Triton) is imported on first use only:

- ``loss_rows(embeddings, class_weights, labels, queue_weights, queue_labels, margin)``
  -> the loss of every row [N], differentiable with respect to ``embeddings``;
- ``partials(embeddings, labels, queue_weights, queue_labels, margin, compute_grad)``
  -> ``(row_max, row_sum, accumulator)`` of the rows over a queue slice
  (the loss algebra, docs/loss.md);
- ``finalize(embeddings, class_weights, row_max, row_sum, accumulator, margin,
  compute_grad)`` -> ``(loss rows, gradient rows)``;
- ``loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels, margin)``
  -> ``(loss rows [N], gradient rows [N, D] or [0, D])``: what ``loss_rows`` computes,
  with the gradient of each row's loss that the fused backends produce in the same pass
  (the first-contact check reads it; dcq_ops.first_contact);
- ``enqueue(weights, labels, ptr, class_weights, class_labels, bad_reasons)``: the FIFO write.

``backend="auto"`` takes the first backend of ``AUTO_ORDER[device type]`` that can
run the call; falling back to ``reference`` warns once per device type.

The first call of a fused backend for a shape class is checked (dcq_ops.first_contact); a
backend that fails it is *demoted* for that shape class, which dcq_ops.demotions records
and ``backends()`` reports; the compiled enqueue's first call on a device type falls back
to plain PyTorch if it raises (``enqueue_function``).
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from dcq_ops import downgrades, reference
from dcq_ops._extension import EXTENSION_ERROR, extension_loaded, has_cuda_kernels
from dcq_ops.demotions import (Demotion, any_demotions, clear_demotions, demotion_keys,  # noqa: F401 (re-exported)
                               demotion_of, demotions, record_demotion)
from dcq_ops.ops import chunked
from dcq_ops.ops import queue as queue_ops

BACKEND_NAMES = ("auto", "triton", "chunked", "reference")
TRITON_KERNELS_MODULE = "dcq_ops.triton.kernels"  # where the @triton.jit kernels are

_F32, _F16, _BF16, _F64 = torch.float32, torch.float16, torch.bfloat16, torch.float64


def triton_interpreting() -> bool:
    """Whether the Triton kernels run (or will run) in Triton's CPU interpreter.

    Triton fixes the choice when the kernels are decorated, i.e. when their module is
    first imported: once it is, its ``INTERPRETED`` is the truth; before, the
    environment variable says what the import will do. Interpreted kernels also need
    the variable at each launch (Triton reads it there too): kernels imported under it
    do not run on the CPU after it was unset."""
    interpret_now = os.environ.get("TRITON_INTERPRET", "0") == "1"
    kernels = sys.modules.get(TRITON_KERNELS_MODULE)
    if kernels is not None:
        return kernels.INTERPRETED and interpret_now
    return interpret_now


def _triton_missing(device: torch.device) -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc}); install it with `pip install triton`"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and triton_interpreting():
        return None
    return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"


def _triton_dtype_problem(device: torch.device, input_dtypes, queue_dtype) -> str | None:
    if _F64 in input_dtypes or queue_dtype == _F64:
        return ("backend='triton' computes in float32 with float32/float16/bfloat16 GEMM operands; "
                "float64 inputs run in float64 on the 'chunked' or 'reference' backend")
    if device.type == "cpu" and queue_dtype == _BF16:
        # Seen: losses of ~1e11 from the interpreter's bf16 tl.dot. On a GPU bf16 is the default.
        return ("the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) does not compute bfloat16 tl.dot "
                "correctly, so backend='triton' refuses a bfloat16 queue on the CPU; use a float32 or float16 "
                "queue there, or backend='chunked' (bfloat16 runs on a GPU)")
    return None


def _chunked_missing(device: torch.device) -> str | None:
    if not extension_loaded():
        return EXTENSION_ERROR
    if device.type == "cuda" and not has_cuda_kernels():
        return ("dcq_ops._C was built without its CUDA kernels (torch without CUDA or nvcc not found at build "
                "time); reinstall with CUDA_HOME set: `pip install --no-build-isolation .`")
    return None


def _always(device: torch.device) -> str | None:
    return None


def _any_dtype(device, input_dtypes, queue_dtype) -> str | None:
    return None


@dataclass(frozen=True)
class Backend:
    """One row of the table: where a backend runs and what it runs.

    Attributes
    ----------
    name : str
    summary : str
        What it is, in a line.
    device_types : tuple of str
        The device types its kernels exist for.
    dtypes : tuple of torch.dtype
        The input dtypes it computes with (queue dtypes: the same, less float64 on triton).
    missing : callable
        ``missing(device)``: None, or why it cannot run on that device (an unbuilt
        extension, no Triton, ...).
    dtype_problem : callable
        ``dtype_problem(device, input_dtypes, queue_dtype)``: None, or why it refuses them.
    loss_rows, partials, finalize, enqueue, loss_and_grad : callable, str or None
        Entry points (see the module docstring); "module:function" is imported on first
        use; None where it has none.
    """

    name: str
    summary: str
    device_types: tuple
    dtypes: tuple
    missing: Callable
    dtype_problem: Callable
    loss_rows: Callable | str
    partials: Callable | str | None
    finalize: Callable | str | None
    enqueue: Callable | str | None
    loss_and_grad: Callable | str | None = None

    def why_unavailable(self, device: torch.device) -> str | None:
        if device.type not in self.device_types:
            return f"no {self.name} kernels for device type {device.type!r}"
        return self.missing(device)

    def entry(self, which: str) -> Callable:
        """The entry point ``which`` ("loss_rows", "partials", "finalize", "enqueue", "loss_and_grad")
        as a function."""
        target = getattr(self, which)
        if target is None:
            raise ValueError(f"backend {self.name!r} has no {which} (the loss algebra runs on 'triton' or 'chunked')")
        if callable(target):
            return target
        # Kept once imported: torch.compile traces a dict lookup, not an import.
        if target not in _IMPORTED:
            module, function = target.split(":")
            _IMPORTED[target] = getattr(importlib.import_module(module), function)
        return _IMPORTED[target]


_IMPORTED: dict = {}


def _chunked_loss_and_grad(embeddings, class_weights, labels, queue_weights, queue_labels, margin):
    """chunked's (loss rows, gradient rows): its op, through the module's attribute (so that
    what replaces ``chunked.dcq_cross_entropy`` replaces both this and ``chunked.loss_rows``)."""
    compute_grad = embeddings.requires_grad and torch.is_grad_enabled()
    return chunked.dcq_cross_entropy(
        embeddings, class_weights, labels, queue_weights, queue_labels, margin.scale, margin.m1, margin.m2,
        margin.m3, margin.interclass_filtering_threshold, margin.straight_through_margin, compute_grad)


BACKENDS = {
    "triton": Backend(
        "triton", "fused Triton kernels: logits in registers, both GEMMs on the tensor cores",
        ("cuda", "cpu"), (_F32, _F16, _BF16), _triton_missing, _triton_dtype_problem,
        loss_rows="dcq_ops.triton.ops:loss_rows", partials="dcq_ops.triton.ops:partials",
        finalize="dcq_ops.triton.ops:finalize", enqueue=None,  # no kernel of its own: see enqueue_function
        loss_and_grad="dcq_ops.triton.ops:loss_and_grad"),
    "chunked": Backend(
        "chunked", "the queue in chunks: two GEMMs per chunk through ATen (BLAS / cuBLAS) and a fused epilogue",
        ("cpu", "cuda"), (_F32, _F16, _BF16, _F64), _chunked_missing, _any_dtype,
        loss_rows=chunked.loss_rows, partials=chunked.partials, finalize=chunked.finalize,
        enqueue=queue_ops.queue_enqueue_, loss_and_grad=_chunked_loss_and_grad),
    "reference": Backend(
        "reference", "plain PyTorch: the N x K logits in blocks of at most reference.BLOCK_LOGITS (the tests' oracle)",
        ("cpu", "cuda", "meta", "mps", "xpu"), (_F32, _F16, _BF16, _F64), _always, _any_dtype,
        loss_rows=reference.loss_rows, partials=None, finalize=None, enqueue=queue_ops.enqueue_fallback),
}

# The fused backends: their first call for a shape class is checked (dcq_ops.first_contact).
FUSED_BACKENDS = ("triton", "chunked")

# What "auto" tries, in order, per device type (triton on CPU tensors only when asked for).
AUTO_ORDER = {"cuda": ("triton", "chunked", "reference")}
AUTO_ORDER_DEFAULT = ("chunked", "reference")


def _check_name(backend: str) -> None:
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def why_unavailable(backend: str, device: torch.device | str) -> str | None:
    """None if ``backend`` can run on ``device``, else the reason it cannot.

    Parameters
    ----------
    backend : str
        "triton", "chunked" or "reference".
    device : torch.device or str

    Returns
    -------
    str or None
    """
    _check_name(backend)
    if backend == "auto":
        raise ValueError("why_unavailable takes a backend, not 'auto' (see select_backend)")
    return BACKENDS[backend].why_unavailable(torch.device(device))


def _dtype_problem(backend: str, device: torch.device, input_dtypes, queue_dtype) -> str | None:
    if queue_dtype is None and not input_dtypes:
        return None
    return BACKENDS[backend].dtype_problem(device, tuple(input_dtypes), queue_dtype)


_WARNED_FALLBACK: set = set()


def _warn_reference_fallback(device: torch.device) -> None:
    """"auto" found no fused kernel for ``device``: say once per device type what that
    costs and how to get the kernels, instead of running the plain PyTorch logits in silence."""
    if device.type in _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK.add(device.type)
    reasons = "; ".join(f"{name}: {BACKENDS[name].why_unavailable(device) or 'refuses these dtypes'}"
                        for name in AUTO_ORDER.get(device.type, AUTO_ORDER_DEFAULT) if name != "reference")
    warnings.warn(
        f"dcq_ops: backend='auto' runs the plain PyTorch 'reference' backend on {device.type}, because no fused "
        f"backend can run there ({reasons}). The reference computes the N x K logits in plain PyTorch (in blocks "
        "above reference.BLOCK_LOGITS, so memory stays bounded), several times slower. Build the extension against your torch "
        "(`pip install --no-build-isolation .`), or pass backend='reference' to silence this warning.",
        RuntimeWarning, stacklevel=3)


def select_backend(device: torch.device | str, backend: str = "auto", *, input_dtypes=(), queue_dtype=None,
                   fused_only: bool = False, warn: bool = True) -> str:
    """The backend that ``backend`` resolves to on ``device`` for these dtypes.

    Parameters
    ----------
    device : torch.device or str
    backend : str
        "auto", "triton", "chunked" or "reference".
    input_dtypes : tuple of torch.dtype
        The dtypes of the embeddings and class weights, if known.
    queue_dtype : torch.dtype, optional
        The queue's dtype (the GEMM operands'), if known.
    fused_only : bool
        Only backends with partials and finalize (the loss algebra: a sharded queue).
    warn : bool
        Warn (once per device type) when "auto" falls back to "reference".

    Returns
    -------
    str
        "triton", "chunked" or "reference".

    Raises
    ------
    RuntimeError
        The backend asked for cannot run on ``device`` (the reason is in the message).
    TypeError
        The backend asked for refuses these dtypes.
    """
    _check_name(backend)
    device = torch.device(device)
    if backend == "auto":
        for candidate in AUTO_ORDER.get(device.type, AUTO_ORDER_DEFAULT):
            if fused_only and BACKENDS[candidate].partials is None:
                continue
            if (BACKENDS[candidate].why_unavailable(device) is None
                    and _dtype_problem(candidate, device, input_dtypes, queue_dtype) is None):
                if candidate == "reference" and warn:
                    _warn_reference_fallback(device)
                return candidate
        backend = "chunked"  # nothing runs: the error below says why the first choice cannot
    reason = BACKENDS[backend].why_unavailable(device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
    problem = _dtype_problem(backend, device, input_dtypes, queue_dtype)
    if problem is not None:
        raise TypeError(problem)
    if fused_only and BACKENDS[backend].partials is None:
        raise ValueError(f"backend {backend!r} has no partials/finalize; the sharded queue runs 'triton' or "
                         "'chunked'")
    return backend


def entry_point(backend: str, which: str) -> Callable:
    """The function of ``backend``'s entry point ``which`` (see the module docstring)."""
    return BACKENDS[backend].entry(which)


_ENQUEUE_CHECKED: set = set()  # device types whose compiled enqueue ran once
_ENQUEUE_FAILED: dict = {}  # device type -> why its compiled enqueue failed (the pure-PyTorch one runs)


def _first_enqueue(weights, labels, ptr, class_weights, class_labels, bad_reasons=None) -> None:
    """The compiled enqueue's first run on a device type: an exception of the kernel itself (a
    launch error, an extension built for another GPU) warns once and hands this write and every
    later one to the pure-PyTorch enqueue, instead of stopping the training. Bad input is
    refused before (ClassQueue validates it): ValueError and TypeError are raised as they are."""
    compiled, fallback = BACKENDS["chunked"].entry("enqueue"), BACKENDS["reference"].entry("enqueue")
    if torch.compiler.is_compiling():
        return compiled(weights, labels, ptr, class_weights, class_labels, bad_reasons)
    kind = weights.device.type
    try:
        compiled(weights, labels, ptr, class_weights, class_labels, bad_reasons)
    except (ValueError, TypeError, torch.OutOfMemoryError):
        raise
    except Exception as exc:  # noqa: BLE001 - the kernel failed: the write is done in plain PyTorch
        text = str(exc).strip()
        _ENQUEUE_FAILED[kind] = f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"
        warnings.warn(f"dcq_ops: the compiled queue enqueue failed on its first call on {kind} "
                      f"({_ENQUEUE_FAILED[kind]}); this write and every later one use the pure-PyTorch enqueue "
                      "(dcq_ops.backends() reports it). Please report it with the output of "
                      "`python -m dcq_ops.check`.", RuntimeWarning, stacklevel=3)
        return fallback(weights, labels, ptr, class_weights, class_labels, bad_reasons)
    _ENQUEUE_CHECKED.add(kind)
    return None


def enqueue_function(device: torch.device | str) -> Callable:
    """The FIFO write for a queue on ``device``, whatever backend computes the loss: the compiled
    kernel (chunked's) where it runs, else plain PyTorch (reference's). The compiled kernel's
    first call on a device type falls back to plain PyTorch if it raises (``_first_enqueue``)."""
    device = torch.device(device)
    if BACKENDS["chunked"].why_unavailable(device) is not None or device.type in _ENQUEUE_FAILED:
        return BACKENDS["reference"].entry("enqueue")
    if device.type in _ENQUEUE_CHECKED:
        return BACKENDS["chunked"].entry("enqueue")
    return _first_enqueue


def clear_enqueue_state() -> None:
    """Forget the compiled enqueue's first call and its failure (dcq_ops.first_contact.reset
    calls this)."""
    _ENQUEUE_CHECKED.clear()
    _ENQUEUE_FAILED.clear()


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """For each backend, "available" or the reason it is not, on ``device``; a fused backend
    that failed its first-contact check for some shape class says so, with the numbers.

    Parameters
    ----------
    device : torch.device or str, optional
        Default: CUDA if present, else the CPU.

    Returns
    -------
    dict
        ``{"triton": ..., "chunked": ..., "reference": ..., "auto": "-> <backend>"}``; e.g.
        ``"available; demoted by the first-contact check for 1 shape class: <class> ->
        'chunked' (<reason>)"``, the reason being the mismatch with its numbers or the
        exception of the first call ("RuntimeError: CUDA error: ..."); "unavailable: ..."
        with what failed and the fix (an extension that did not load: the reinstall
        command).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    report = {}
    for name, row in BACKENDS.items():
        reason = row.why_unavailable(device)
        report[name] = "available" if reason is None else f"unavailable: {reason}"
        demoted = [d for d in demotions(device) if d.backend == name]
        if demoted:
            classes = "; ".join(f"{d.shape_class} -> {d.fallback!r} ({d.reason})" for d in demoted)
            report[name] += (f"; demoted by the first-contact check for {len(demoted)} shape "
                             f"class{'es' if len(demoted) > 1 else ''}: {classes}")
        if name == "chunked" and device.type in _ENQUEUE_FAILED:
            report[name] += (f"; its queue enqueue failed on its first call ({_ENQUEUE_FAILED[device.type]}): "
                             "the pure-PyTorch enqueue runs")
        said = downgrades.summary(device, backend=name)
        if said:
            report[name] += f"; downgraded: {said}"
    report["auto"] = f"-> {select_backend(device, warn=False)}"  # a report, not a call: no warning
    return report
