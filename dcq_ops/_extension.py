"""Loading of the compiled extension dcq_ops._C, and what to tell a user when it is missing.

The package works without it (Triton and reference backends, a pure-PyTorch
queue), so a failed load is recorded, not raised; `dcq_ops.backends()` reports it.
"""

from __future__ import annotations

import torch

EXTENSION_ERROR: str | None = None

# How to rebuild the extension against the torch that runs it.
REINSTALL_COMMAND = "pip install --no-build-isolation --force-reinstall --no-deps ."

# An op the extension registers (TORCH_LIBRARY in csrc/dcq_ops.cpp): present once it loaded.
_PROBE_OP = "dcq_ops::dcq_cross_entropy"


def load_error(exc: BaseException) -> str:
    """What to tell a user whose ``dcq_ops._C`` failed to load with ``exc``: the error (its type
    and first line), what it most likely means, and the fix.

    Parameters
    ----------
    exc : BaseException
        What the import raised: an ImportError (not built; "undefined symbol": built against
        another torch), an OSError (a library that does not load), or anything raised while
        the library registers its ops.

    Returns
    -------
    str
    """
    text = str(exc).strip()
    first = f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"
    mismatch = ("undefined symbol" in text or "symbol not found" in text or "version" in text.lower()
                or not isinstance(exc, ImportError))
    why = (f"it was most likely built against another torch than the one running it (torch {torch.__version__} "
           "here, CUDA " f"{torch.version.cuda or 'none'})" if mismatch else "it is not built")
    return (f"the compiled extension dcq_ops._C could not be loaded ({first}): {why}. It must be built against the "
            "torch that runs it: install that torch first, then reinstall from the source tree with "
            f"`{REINSTALL_COMMAND}` (with CUDA_HOME set for the CUDA kernels). Until then the 'chunked' backend is "
            "unavailable and the queue uses its pure-PyTorch fallback.")


try:
    from dcq_ops import _C  # noqa: F401  (registers torch.ops.dcq_ops.*)

    if not torch._C._dispatch_has_kernel_for_dispatch_key(_PROBE_OP, "CPU"):
        raise ImportError(f"dcq_ops._C loaded but did not register {_PROBE_OP} (undefined symbol or version "
                          "mismatch while registering)")
except Exception as exc:  # noqa: BLE001 - not built, built against another torch, or failed registering ops
    EXTENSION_ERROR = load_error(exc)


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
