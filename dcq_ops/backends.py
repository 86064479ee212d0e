"""Which backend of dcq_cross_entropy runs where, and why the others cannot.

"auto" picks triton on CUDA when Triton imports, else chunked (the compiled
extension), else reference. CPU tensors use chunked; triton runs on CPU tensors
only when asked for explicitly under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import os

import torch

from dcq_ops._extension import EXTENSION_ERROR, extension_loaded, has_cuda_kernels

BACKEND_NAMES = ("auto", "triton", "chunked", "reference")


def _triton_import_error() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return f"Triton is not importable ({exc}); install it with `pip install triton`"
    return None


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device | str) -> str | None:
    """None if `backend` can run on `device`, else the reason it cannot."""
    device = torch.device(device)
    if backend == "reference":
        return None
    if backend == "chunked":
        if not extension_loaded():
            return EXTENSION_ERROR
        if device.type == "cuda" and not has_cuda_kernels():
            return (
                "dcq_ops._C was built without its CUDA kernels (torch without CUDA or nvcc not found "
                "at build time); reinstall with CUDA_HOME set: `pip install --no-build-isolation .`"
            )
        if device.type not in ("cpu", "cuda"):
            return f"no chunked kernels for device type {device.type!r}"
        return None
    if backend == "triton":
        error = _triton_import_error()
        if error:
            return error
        if device.type == "cuda":
            return None
        if device.type == "cpu" and _interpreting():
            return None
        return f"Triton runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got device {device}"
    raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")


def select_backend(device: torch.device | str, backend: str = "auto") -> str:
    """The backend that `backend` resolves to on `device`; raises if it cannot run there."""
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {backend!r}")
    device = torch.device(device)
    if backend == "auto":
        order = ("triton", "chunked", "reference") if device.type == "cuda" else ("chunked", "reference")
        for candidate in order:
            if why_unavailable(candidate, device) is None:
                return candidate
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise RuntimeError(f"backend {backend!r} cannot run on {device}: {reason}")
    return backend


def backends(device: torch.device | str | None = None) -> dict[str, str]:
    """For each backend, 'available' or the reason it is not, on `device`
    (default: CUDA if present, else CPU)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    report = {}
    for name in BACKEND_NAMES[1:]:
        reason = why_unavailable(name, device)
        report[name] = "available" if reason is None else f"unavailable: {reason}"
    report["auto"] = f"-> {select_backend(device)}"
    return report
