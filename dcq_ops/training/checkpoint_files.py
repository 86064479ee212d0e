"""The checkpoint files of a run on disk: how they are written (whole, fsynced, two
distinct copies), verified (the CRC-32 of every member, which torch.load does not
check), read (with torch.load's defaults, ``weights_only=True``), and which of them
``--resume auto`` tries, newest first.

A checkpoint is ``torch.save``'s zip archive. Every member of it (the pickle and each
tensor's bytes) carries a CRC-32 in the archive's directory; torch.load never reads
them, so a flipped bit in a tensor's data loaded silently. :func:`verify_checkpoint`
recomputes every one before the checkpoint is unpickled: a truncated file, a flipped
bit or a block of zeros is refused with the member named, and ``--resume auto`` falls
back to an older file (dcq_ops/training/checkpoint.py)."""

from __future__ import annotations

import os
import re
import zipfile
import zlib

import numpy as np
import torch
import torch.utils.serialization.config as serialization_config

from dcq_ops.atomic_write import AtomicFile, atomic_write, fsync_directory, remove_quietly, temporary_path
from dcq_ops.training.step_guard import TrainingError

STEP_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pt")
LATEST = "checkpoint.pt"
# What a run writes in OUTPUT and a kill or a full disk may leave under its temporary name.
_OWN_TEMPORARIES = re.compile(r"(checkpoint(_\d+)?\.pt|log\.csv|log\.jsonl|result\.json)" + re.escape(
    temporary_path("")))
_COPY_CHUNK = 16 << 20


class CheckpointWriteError(TrainingError):
    """A checkpoint could not be written (a full disk, an I/O error); nothing was replaced."""


def step_checkpoint_name(step: int) -> str:
    """The file name of the step checkpoint of ``step``."""
    return f"checkpoint_{step:07d}.pt"


def _save(state: dict, path: str) -> None:
    """torch.save ``state`` to ``path`` whole (:func:`atomic_write`), with the CRC-32 of every
    member computed whatever the process's torch.serialization config says."""
    with atomic_write(path) as file, serialization_config.patch({"save.compute_crc32": True}):
        torch.save(state, file)


def _copy(source: str, path: str) -> None:
    """Copy ``source`` to ``path`` whole, byte by byte: a distinct file with its own blocks (a
    hard link, or a reflink of copy_file_range, would share one copy's fate with the other)."""
    target = AtomicFile(path)
    try:
        with open(source, "rb") as f:
            while chunk := f.read(_COPY_CHUNK):
                target.file.write(chunk)
        target.publish()
    except BaseException:
        target.discard()
        raise


def write_checkpoint(state: dict, output: str, step: int, keep: int) -> str:
    """Write OUTPUT/checkpoint_<step>.pt and OUTPUT/checkpoint.pt (the latest), and keep
    the newest ``keep`` step checkpoints; returns the step checkpoint's path.

    Each file is written under a temporary name, fsynced and renamed, and the directory
    fsynced (:mod:`dcq_ops.atomic_write`): a kill leaves the old file or the new one,
    never half of one. checkpoint.pt is a second, distinct copy (not a hard link): with
    ``keep`` = 1 a damaged checkpoint.pt still leaves the step checkpoint, and the older
    step checkpoint is removed only once both new files are complete, so at least two
    complete checkpoints are on disk at every moment. A write that fails (a full disk)
    removes its temporary and raises :class:`CheckpointWriteError`; every checkpoint
    already on disk is as it was.

    Parameters
    ----------
    state : dict
        What the checkpoint holds (:func:`~dcq_ops.training.checkpoint.trainer_state`).
    output : str
        The run's output directory.
    step : int
        The step of the checkpoint.
    keep : int
        How many step checkpoints to keep (>= 1).

    Returns
    -------
    str
    """
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, step_checkpoint_name(step))
    latest = os.path.join(output, LATEST)
    for target, write in ((path, lambda: _save(state, path)), (latest, lambda: _copy(path, latest))):
        try:
            write()
        except (OSError, RuntimeError) as exc:
            kept = sorted(f for f in os.listdir(output) if f == LATEST or STEP_CHECKPOINT.fullmatch(f))
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} to {target}: {exc}. No complete checkpoint was "
                f"replaced or removed: {', '.join(kept) or 'none'} in {output} (free some space, then resume "
                "with --resume auto)") from exc
    steps = sorted(f for f in os.listdir(output) if STEP_CHECKPOINT.fullmatch(f))
    for old in steps[:-keep]:
        remove_quietly(os.path.join(output, old))
    fsync_directory(output)
    return path


def remove_stale_temporaries(output: str) -> list[str]:
    """Remove what a kill or a full disk left of a run's files under their temporary names in
    ``output`` (a large one would keep the disk full for the resume's own writes). Returns
    their names."""
    if not output or not os.path.isdir(output):
        return []
    removed = [f for f in sorted(os.listdir(output)) if _OWN_TEMPORARIES.fullmatch(f)
               and remove_quietly(os.path.join(output, f))]
    if removed:
        fsync_directory(output)
    return removed


def verify_checkpoint(path: str) -> str | None:
    """None when every member of the checkpoint's archive matches its CRC-32, else why not
    (the member named). Reads the whole file once.

    Parameters
    ----------
    path : str
        A checkpoint written by torch.save.

    Returns
    -------
    str or None
    """
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                crc = 0
                try:
                    with archive.open(info) as member:  # reading to the end checks the CRC-32 too
                        while chunk := member.read(_COPY_CHUNK):
                            crc = zlib.crc32(chunk, crc)
                except zipfile.BadZipFile as exc:
                    if "CRC" not in str(exc):
                        raise
                    crc = None
                if crc != info.CRC:
                    return f"checksum mismatch in member {info.filename}"
    except zipfile.BadZipFile as exc:
        return f"not a complete checkpoint archive: {exc}"
    except (OSError, EOFError, ValueError, zlib.error, NotImplementedError) as exc:
        return f"not a complete checkpoint archive: {type(exc).__name__}: {exc}"
    return None


def _numpy_pickle_globals() -> list:
    """What an older checkpoint's numpy RNG state (a pickled uint32 array) needs from numpy
    to load under weights_only=True; checkpoints written now hold tensors and plain values."""
    core = getattr(np, "_core", None) or np.core
    return [core.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def read_checkpoint(path: str, map_location):
    """(state, None) of a checkpoint this application wrote, or (None, why it cannot be read):
    its checksums verified first (:func:`verify_checkpoint`), then torch.load with
    ``weights_only=True`` (torch's default: no code runs from the file)."""
    why = verify_checkpoint(path)
    if why is not None:
        return None, f"failed to verify: {why}"
    try:
        with torch.serialization.safe_globals(_numpy_pickle_globals()):
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a corrupt pickle fails in the unpickler
        return None, f"could not read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not isinstance(state, dict) or "step" not in state:
        return None, "could not read: not a dcq_ops.train checkpoint"
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        return None, f"could not read: the checkpoint's step must be an int >= 0, got {step!r}"
    return state, None


def checkpoint_step(name: str) -> int | None:
    """The step in a step checkpoint's file name (None for checkpoint.pt)."""
    match = STEP_CHECKPOINT.fullmatch(name)
    return None if match is None else int(match.group(1))


def candidates(output: str, latest_step: int | None) -> list[str]:
    """The checkpoints of ``output`` that ``--resume auto`` tries, newest first: the step
    checkpoints newer than checkpoint.pt (a kill after a step checkpoint but before
    checkpoint.pt names it), checkpoint.pt (of step ``latest_step``; None: unreadable or
    missing, left out), then the older step checkpoints."""
    steps = sorted((f for f in os.listdir(output) if STEP_CHECKPOINT.fullmatch(f)), reverse=True)
    has_latest = os.path.exists(os.path.join(output, LATEST))
    if latest_step is None or not has_latest:
        return steps
    newer = [f for f in steps if checkpoint_step(f) > latest_step]
    return newer + [LATEST] + [f for f in steps if checkpoint_step(f) <= latest_step]


__all__ = ["CheckpointWriteError", "LATEST", "STEP_CHECKPOINT", "candidates", "read_checkpoint",
           "remove_stale_temporaries", "step_checkpoint_name", "verify_checkpoint", "write_checkpoint"]
