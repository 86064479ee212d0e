"""The downgrades of this process: where a feature of torch (or of the GPU's report)
that the package relies on is missing, and the package does something slower or
assumed instead. Each one is said once, as a ``RuntimeWarning``, and recorded;
``downgrades()`` lists them (``dcq_ops.backends()`` and the ``dcq_ops.check`` report
show them), so that no slower path is ever taken in silence.

The features, and what happens without them (docs/numerics.md, "torch 2.11"):

- ``torch.cuda.get_device_properties(i).shared_memory_per_block_optin``: the Triton
  tiles are chosen to fit the shared memory a block may opt into
  (dcq_ops.triton.configs). Without it, an architecture of ``configs.ARCHITECTURES``
  gets the value CUDA specifies for its compute capability; any other gets sm_86's
  99 KiB, the smallest of them (smaller tiles: sm_90 would get 32 x 32 instead of
  64 x 64, 1.5x the tensor-core work).
- ``aten::mm.dtype_out`` (16-bit operands, fp32 output): the chunked backend's CUDA
  GEMMs (csrc/cuda/queue_pass.cu, ``mm_into``). Without it they upcast both operands
  to fp32 and multiply in fp32 (TF32 at most): the same cosines, several times slower
  and with fp32 copies of every chunk.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import asdict, dataclass

import torch

from dcq_ops.triton.configs import ARCHITECTURES

OPTIN_FEATURE = "torch.cuda.get_device_properties().shared_memory_per_block_optin"
MM_DTYPE_OUT_FEATURE = "aten::mm.dtype_out"

# The value assumed for a GPU whose capability is not in configs.ARCHITECTURES: the
# smallest opt-in shared memory of the architectures the build targets (sm_86, sm_89).
CONSERVATIVE_OPTIN = min(a.shared_memory_per_block_optin for a in ARCHITECTURES.values())


@dataclass(frozen=True)
class Downgrade:
    """One downgrade: the missing ``feature``, ``what`` the package does instead, its
    ``consequence``, the ``fix``, the ``device`` it concerns ("cuda:0", a device type
    such as "cuda", or None for the whole process) and the ``backend`` it slows down."""

    feature: str
    what: str
    consequence: str
    fix: str
    device: str | None = None
    backend: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def message(self) -> str:
        where = f" on {self.device}" if self.device else ""
        return (f"dcq_ops: {self.feature} is not available{where}: {self.what}. "
                f"Consequence: {self.consequence}. Fix: {self.fix}.")


_RECORD: dict = {}  # (feature, device) -> Downgrade, in the order they were noted


def note(feature: str, what: str, consequence: str, fix: str, *, device=None, backend: str | None = None) -> Downgrade:
    """Record a downgrade and say it, once per (feature, device): a ``RuntimeWarning``
    on the first note, nothing on the later ones.

    Parameters
    ----------
    feature : str
        What is missing, e.g. ``"aten::mm.dtype_out"``.
    what : str
        What the package does instead.
    consequence : str
        What that costs (time, memory, precision).
    fix : str
        How to get the full path back.
    device : torch.device or str, optional
        The device (or device type) concerned; None for the whole process.
    backend : str, optional
        The backend that takes the slower path ("triton", "chunked").

    Returns
    -------
    Downgrade
        The record (the first one, when this downgrade was noted before).
    """
    device = None if device is None else str(device)
    key = (feature, device)
    if key not in _RECORD:
        _RECORD[key] = Downgrade(feature, what, consequence, fix, device, backend)
        warnings.warn(_RECORD[key].message(), RuntimeWarning, stacklevel=3)
    return _RECORD[key]


def _concerns(record: Downgrade, device: torch.device) -> bool:
    if record.device is None:
        return True
    recorded = torch.device(record.device)
    return recorded.type == device.type and (recorded.index is None or device.index is None
                                             or recorded.index == device.index)


def downgrades(device=None) -> list[dict]:
    """The downgrades of this process, as dicts with the keys feature, what,
    consequence, fix, device and backend. With a CUDA ``device``, its features are probed
    first (so that a downgrade shows before the first call that takes it).

    Parameters
    ----------
    device : torch.device or str, optional
        Only the downgrades concerning this device (or its type), and the
        process-wide ones; default: every one recorded.

    Returns
    -------
    list of dict
        In the order they were first noted; empty when nothing was downgraded.
    """
    if device is None:
        return [d.as_dict() for d in _RECORD.values()]
    device = torch.device(device)
    probe(device)
    return [d.as_dict() for d in _RECORD.values() if _concerns(d, device)]


def summary(device=None, backend: str | None = None) -> str | None:
    """The downgrades of ``downgrades(device)`` (those of ``backend`` only, when given) in
    one line (what ``dcq_ops.backends()`` shows), or None when there is none.

    Parameters
    ----------
    device : torch.device or str, optional
    backend : str, optional

    Returns
    -------
    str or None
    """
    found = [d for d in downgrades(device) if backend is None or d["backend"] == backend]
    if not found:
        return None
    return "; ".join(f"{d['feature']} missing{' on ' + d['device'] if d['device'] else ''}: {d['what']} "
                     f"({d['consequence']})" for d in found)


def clear() -> None:
    """Forget every recorded downgrade (tests); the next note warns again."""
    _RECORD.clear()


def probe(device) -> None:
    """Note the downgrades the paths that can run on ``device`` would take: the chunked
    backend's CUDA GEMMs (when the extension has CUDA kernels) and the Triton tiles
    (when Triton is installed and a CUDA GPU is present). Nothing on other devices."""
    device = torch.device(device)
    if device.type != "cuda":
        return
    from dcq_ops._extension import has_cuda_kernels
    if has_cuda_kernels():
        note_chunked_gemm(device, torch.bfloat16)
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        index = device.index if device.index is not None else torch.cuda.current_device()
        shared_memory_per_block_optin(torch.cuda.get_device_properties(index), f"cuda:{index}")


# ----------------------------------------------------------------------------
# aten::mm.dtype_out: the chunked backend's 16-bit GEMMs with fp32 output


def mm_dtype_out_available() -> bool:
    """Whether torch registers ``aten::mm.dtype_out``: what csrc/cuda/queue_pass.cu looks
    up (``findOp({"aten::mm", "dtype_out"})``) before multiplying 16-bit operands into
    an fp32 output."""
    return "dtype_out" in torch.ops.aten.mm.overloads()


_MM_DTYPE_OUT: list = []  # [bool] once looked up: the lookup is per process, as the C++ one


def note_chunked_gemm(device, gemm_dtype: torch.dtype) -> None:
    """Note the fp32 GEMMs of the chunked backend on CUDA when torch lacks
    ``aten::mm.dtype_out`` and the operands (the queue's dtype) are 16-bit. Cheap after
    the first call (one cached lookup); nothing while torch.compile traces."""
    if torch.compiler.is_compiling() or gemm_dtype not in (torch.float16, torch.bfloat16):
        return
    if torch.device(device).type != "cuda":
        return
    if not _MM_DTYPE_OUT:
        _MM_DTYPE_OUT.append(mm_dtype_out_available())
    if _MM_DTYPE_OUT[0]:
        return
    note(MM_DTYPE_OUT_FEATURE,
         "the chunked backend's CUDA GEMMs upcast their 16-bit operands (the queue chunk and the rows, "
         "then the probabilities) to fp32 and multiply in fp32",
         "the same cosines, but fp32 (or TF32) GEMMs instead of 16-bit tensor-core GEMMs, several times "
         "slower, and an fp32 copy of each queue chunk",
         f"a torch that has aten::mm.dtype_out (torch {torch.__version__} here; torch 2.11 and later have it)",
         device="cuda", backend="chunked")


# ----------------------------------------------------------------------------
# shared_memory_per_block_optin: the Triton tiles' shared-memory budget


def shared_memory_per_block_optin(props, device=None) -> int:
    """The shared memory a block may opt into on the GPU of ``props`` (what
    ``torch.cuda.get_device_properties`` returns). When torch does not report it, the
    value CUDA specifies for the compute capability if it is one of
    ``configs.ARCHITECTURES``, else ``CONSERVATIVE_OPTIN``; either is noted."""
    reported = getattr(props, "shared_memory_per_block_optin", None)
    if reported:
        return int(reported)
    capability = (props.major, props.minor)
    known = next((a for a in ARCHITECTURES.values() if a.capability == capability), None)
    if known is not None:
        value = known.shared_memory_per_block_optin
        what = (f"the Triton tiles assume {value >> 10} KiB, the value CUDA specifies for compute capability "
                f"{capability[0]}.{capability[1]} ({known.name})")
        consequence = ("none while that holds; a tile that does not fit would fail to launch, and the "
                       "first-contact check would then demote the triton backend")
    else:
        value = CONSERVATIVE_OPTIN
        what = (f"the Triton tiles assume {value >> 10} KiB, the smallest of the architectures the package is "
                f"tuned for, on this compute capability {capability[0]}.{capability[1]}")
        consequence = ("smaller tiles than the GPU may hold (on a 227 KiB GPU: 32 x 32 instead of 64 x 64, "
                       "1.5x the tensor-core work of the queue pass)")
    note(OPTIN_FEATURE, what, consequence,
         f"a torch whose device properties report shared_memory_per_block_optin (torch {torch.__version__} "
         "here; torch 2.11 and later report it)", device=device or "cuda", backend="triton")
    return value
