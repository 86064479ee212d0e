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


def cpu_gemm_provider() -> str | None:
    """Who computes the fp32 GEMMs of the chunked backend's CPU queue pass.

    Chosen once per process, on the first call or the first fp32 CPU queue pass:
    ``DCQ_OPS_CPU_GEMM`` ("aten", "avx512"; "auto" or unset: measured), else the
    faster of the providers this CPU has on a probe tile (the package's own AVX-512
    kernels are taken unless ATen's BLAS is more than 5% faster). ATen's BLAS is
    MKL in torch's x86 builds, which runs its AVX2 kernels on AMD processors and where
    ``MKL_ENABLE_INSTRUCTIONS`` limits it; the own kernels then win. float64 always
    goes through ATen.

    Returns
    -------
    str or None
        "aten" or "avx512", or None without the extension.

    Raises
    ------
    ValueError
        ``DCQ_OPS_CPU_GEMM`` names an unknown provider, or one this CPU lacks.
    """
    if EXTENSION_ERROR is not None:
        return None
    from dcq_ops import _C
    return _C.cpu_gemm_provider()


def cpu_gemm_providers() -> list[str]:
    """The CPU GEMM providers this machine can run (see cpu_gemm_provider()).

    Returns
    -------
    list of str
        "aten", and "avx512" where the CPU (and ATEN_CPU_CAPABILITY) allow AVX-512;
        [] without the extension.
    """
    if EXTENSION_ERROR is not None:
        return []
    from dcq_ops import _C
    return _C.cpu_gemm_providers()


def cpu_gemm_probe() -> dict[str, float]:
    """What the choice of cpu_gemm_provider() measured.

    Returns
    -------
    dict of str to float
        Each provider's single-thread GFLOP/s on probe tiles (both GEMMs of a tile of 256
        rows, D = 512, and the provider's own chunk width; best of five); {} when the
        choice was named rather than measured, when this CPU has one provider only, or
        before the choice is made.
    """
    if EXTENSION_ERROR is not None:
        return {}
    from dcq_ops import _C
    return _C.cpu_gemm_probe()


def set_cpu_gemm_provider(name: str) -> None:
    """Replaces this process's CPU GEMM provider (benchmarks compare providers side by
    side; tests run each). Prefer ``DCQ_OPS_CPU_GEMM`` for a whole run.

    Parameters
    ----------
    name : str
        "aten" or "avx512" (one of cpu_gemm_providers()).

    Raises
    ------
    ValueError
        an unknown provider, or one this CPU lacks (see cpu_gemm_providers()).
    """
    require_extension("set_cpu_gemm_provider")
    from dcq_ops import _C
    _C.set_cpu_gemm_provider(name)
