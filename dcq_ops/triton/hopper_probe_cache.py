"""The on-disk cache of the Gluon sm_90 kernels' probe verdicts
(dcq_ops.triton.hopper_probe), so that a machine pays each probe once.

A verdict is valid for the machine and the code it was found with: its key holds the
GPU (name and compute capability), the CUDA driver and runtime versions, the torch and
Triton versions, a hash of the kernel's sources (``sources()``: every
dcq_ops/triton/hopper*.py, the Gluon kernels, their launch and the probe's child among them,
whose change changes what runs or what is checked) and the probe class (the kernel
included: one kernel's verdict never answers for the other). Each key is one
file, ``<sha256 of the key>.json`` in ``cache_dir()``, holding the key itself (checked on
reading) and the verdict.

Several ranks of one machine may probe the same class at once: each writes its file
whole under a name of its own (``atomic_write``), then renames it over the shared name
(``os.replace``, atomic on POSIX), so that a reader sees one rank's whole file or
another's, never a mixture. A file that cannot be read or parsed, or holds another
key, counts as no verdict (the class is probed again).

``DCQ_OPS_HOPPER_PROBE_CACHE=0`` disables the cache (nothing read or written);
``DCQ_OPS_HOPPER_PROBE_CACHE_DIR`` moves it (default
``$XDG_CACHE_HOME/dcq_ops/hopper_probe``, else ``~/.cache/dcq_ops/hopper_probe``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import json
import os
import uuid
from pathlib import Path

import torch

from dcq_ops.atomic_write import atomic_write, fsync_directory, remove_quietly

CACHE_ENV = "DCQ_OPS_HOPPER_PROBE_CACHE"
CACHE_DIR_ENV = "DCQ_OPS_HOPPER_PROBE_CACHE_DIR"

_HERE = Path(__file__).resolve().parent
# The sources whose change invalidates a verdict (tests replace it); None: every
# dcq_ops/triton/hopper*.py (the Gluon kernel and any kernel file beside it, its launch,
# its twin, the probe and its child).
SOURCES: tuple | None = None


def sources() -> tuple:
    """The files ``source_digest`` hashes (``SOURCES``, or every hopper*.py here, sorted)."""
    return tuple(SOURCES) if SOURCES is not None else tuple(sorted(_HERE.glob("hopper*.py")))


def enabled() -> bool:
    """Whether the cache is on (``DCQ_OPS_HOPPER_PROBE_CACHE`` not "0", "false", "no", "off")."""
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    """The cache's folder (see the module docstring); not created here."""
    explicit = os.environ.get(CACHE_DIR_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "dcq_ops" / "hopper_probe"


def source_digest() -> str:
    """sha256 of the bytes of ``sources()``, in order (a missing file hashes as its name only),
    read once per process: a verdict is about the code the process imported, which a file
    edited later does not change."""
    return _digest(sources())


@functools.lru_cache(maxsize=8)
def _digest(paths: tuple) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(Path(path).name).encode())
        with contextlib.suppress(OSError):
            digest.update(Path(path).read_bytes())
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def driver_version() -> str:
    """The CUDA driver's version (cuDriverGetVersion, e.g. "12080"), or "unknown"."""
    try:
        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            return str(version.value)
    except (OSError, AttributeError):
        pass
    return "unknown"


def fingerprint(device: torch.device) -> dict:
    """What a verdict found on ``device`` holds for: its GPU, driver, CUDA, torch, Triton and
    the kernel's sources (a CPU device: the Triton interpreter)."""
    import triton

    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        gpu = torch.cuda.get_device_name(index)
        capability = list(torch.cuda.get_device_capability(index))
    else:
        gpu, capability = f"{device.type} (Triton interpreter)", None
    return {"gpu": gpu, "capability": capability, "driver": driver_version() if device.type == "cuda" else None,
            "cuda": torch.version.cuda, "torch": str(torch.__version__), "triton": str(triton.__version__),
            "sources": source_digest()}


def key_of(device: torch.device, probe_class) -> dict:
    """The cache key of ``probe_class`` (a ``ProbeClass``) on ``device``."""
    return {"machine": fingerprint(device), "class": probe_class._asdict()}


def path_of(key: dict) -> Path:
    """The file of ``key`` in ``cache_dir()``."""
    text = json.dumps(key, sort_keys=True)
    return cache_dir() / f"{hashlib.sha256(text.encode()).hexdigest()}.json"


def read(key: dict) -> tuple[dict, Path] | None:
    """(the verdict cached for ``key``, its file), or None: the cache is off, holds no
    verdict for the key, or its file is unreadable or holds another key."""
    if not enabled():
        return None
    path = path_of(key)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != json.loads(json.dumps(key)) or not isinstance(
            data.get("verdict"), dict):
        return None
    return data["verdict"], path


def write(key: dict, verdict: dict) -> Path | None:
    """Cache ``verdict`` for ``key`` (see the module docstring: a file of this process's
    own, renamed over the shared name); its file, or None when the cache is off or the
    write failed (a cache that cannot be written costs a probe per process, nothing else)."""
    if not enabled():
        return None
    path = path_of(key)
    own = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(own, "w", encoding="utf-8") as f:
            json.dump({"key": key, "verdict": verdict}, f, sort_keys=True, indent=1)
        os.replace(own, path)
        fsync_directory(path.parent)
    except OSError:
        with contextlib.suppress(OSError):
            remove_quietly(own)
        return None
    return path
