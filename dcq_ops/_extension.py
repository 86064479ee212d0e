"""Loading of the compiled extension dcq_ops._C, and what to tell a user when it is missing.

The package works without it (Triton and reference backends, a pure-PyTorch
queue), so a failed load is recorded, not raised; `dcq_ops.backends()` reports it.
"""

from __future__ import annotations

import torch

EXTENSION_ERROR: str | None = None

try:
    from dcq_ops import _C  # noqa: F401  (registers torch.ops.dcq_ops.*)
except ImportError as exc:  # not built, or built against another torch
    EXTENSION_ERROR = (
        f"the compiled extension dcq_ops._C could not be loaded ({exc}). "
        f"It must be built against the torch that runs it (torch {torch.__version__} here): "
        "install torch first, then reinstall with `pip install --no-build-isolation .` "
        "(with CUDA_HOME set for the CUDA kernels). Until then the 'chunked' backend is "
        "unavailable and the queue uses its pure-PyTorch fallback."
    )


def extension_loaded() -> bool:
    """Whether the compiled extension dcq_ops._C loaded (if not, ``EXTENSION_ERROR`` says why).

    Returns
    -------
    bool
    """
    return EXTENSION_ERROR is None


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA kernels.

    Returns
    -------
    bool
    """
    if EXTENSION_ERROR is not None:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("dcq_ops::queue_enqueue_", "CUDA")


def require_extension(what: str) -> None:
    if EXTENSION_ERROR is not None:
        raise RuntimeError(f"{what} needs {EXTENSION_ERROR}")


def cpu_capability() -> str | None:
    """The instruction set of the chunked backend's CPU epilogue in use.

    Returns
    -------
    str or None
        "avx512", "avx2" or "default" (ATEN_CPU_CAPABILITY lowers it), or None without
        the extension.
    """
    if EXTENSION_ERROR is not None:
        return None
    from dcq_ops import _C
    return _C.cpu_capability()
