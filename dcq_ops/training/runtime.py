"""Where a run runs: the device ``--device`` names (checked against the GPUs
there), the process's torch settings and seeds, and, under ``torchrun`` with
WORLD_SIZE > 1, the default process group (gloo on CPU, NCCL on CUDA, every
collective bounded by ``--dist-timeout``), DistributedDataParallel, and the end of
the process group (:func:`end_process`: every rank meets before it is destroyed)."""

from __future__ import annotations

import datetime
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dcq_ops.training.config import ConfigError, TrainConfig, parse_device


def setup_distributed(device: torch.device, timeout_s: float = 300.0) -> tuple[int, int]:
    """(rank, world size); initialises the default process group when launched
    by torchrun with WORLD_SIZE > 1 (gloo on CPU, NCCL on CUDA), with ``timeout_s``
    (``--dist-timeout``) as the longest a collective waits for the other ranks: a
    rank that stopped or hung ends the others with an error, not a silent wait
    (gloo's and NCCL's defaults are 30 and 10 minutes)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(name: str) -> torch.device:
    """The device of ``--device`` ("auto": this rank's GPU, LOCAL_RANK, when CUDA is
    available, else the CPU); ConfigError for a GPU that is not there."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    device = torch.device(parse_device(name))
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available here (torch.cuda.is_available() is False)")
        if device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: there is no GPU {device.index} "
                              f"({torch.cuda.device_count()} visible)")
    return device


def start_process(config: TrainConfig, device: torch.device | None = None) -> tuple[torch.device, int, int]:
    """(device, rank, world size) of this process, set up for ``config``: its threads,
    the process group, the current GPU, deterministic algorithms, and one seed for the
    model initialisation (the same on every rank: DDP broadcasts rank 0's anyway, and
    every head starts from the same backbone). ``device``: ``config.device`` resolved
    (:func:`resolve_device`), when the caller has done it."""
    device = resolve_device(config.device) if device is None else device
    if config.threads:
        torch.set_num_threads(config.threads)
    rank, world_size = setup_distributed(device, config.dist_timeout)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    np.random.seed(config.seed)
    random.seed(config.seed)
    return device, rank, world_size


def wrap_distributed(backbone: nn.Module, head: nn.Module, device: torch.device,
                     world_size: int) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) as the step calls them: under several ranks the backbone (and a
    head with parameters) in DistributedDataParallel, else themselves."""
    if world_size == 1:
        return backbone, head
    ids = [device.index] if device.type == "cuda" else None
    model = nn.parallel.DistributedDataParallel(backbone, device_ids=ids)
    if any(p.requires_grad for p in head.parameters()):
        head = nn.parallel.DistributedDataParallel(head, device_ids=ids)
    return model, head


class CommunicationError(RuntimeError):
    """A collective failed: another process stopped, hung or died (``--dist-timeout``
    bounds the wait for it).

    Parameters
    ----------
    message : str
        What failed, and what to do about it.
    """


def is_communication_error(exc: BaseException) -> bool:
    """Whether ``exc`` says a collective failed (a timeout, a process that went away):
    torch raises them as RuntimeError (gloo: "Timed out waiting 3000ms for recv
    operation to complete", "Connection closed by peer") or as its DistError types."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(exc, dist_error):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(words in text for words in (
        "timed out", "timeout", "connection closed", "connection reset", "broken pipe", "nccl error",
        "ncclremoteerror", "ncclsystemerror"))


def synchronize() -> None:
    """Every rank waits here for the others (nothing under one process). A collective's
    last transfer is finished, and its tensors released, by a communication thread after
    the caller's ``wait()`` returns; a barrier, during which the caller releases the
    interpreter lock, lets that thread finish before the process moves on (and ends)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


_ENDED_MULTI_RANK: list = []  # [True] once end_process left a group of several ranks


def ended_multi_rank() -> bool:
    """Whether this process left a process group of several ranks (end_process)."""
    return bool(_ENDED_MULTI_RANK)


def exit_now(status: int) -> None:
    """Ends a process that left a group of several ranks at once, with ``status``, after
    flushing its output: not through the interpreter's shutdown. Even after the ranks met
    and the group was destroyed, gloo's communication thread can still hold the last
    collective's tensors; the shutdown then kills it inside a destructor ("terminate
    called without an active exception", SIGABRT: seen in 1 of 3 sharded runs under load
    with only the barrier). Every file of the run is written, fsynced and closed before."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(status)


def end_process(meet: bool) -> None:
    """The end of this process's part in the process group (nothing without one):
    :func:`synchronize` first when ``meet`` (every rank gets here: a finished run, or a
    stop every rank makes at the same step), then ``destroy_process_group``.

    Why the meeting matters: gloo's worker thread drops its references to the tensors
    of the last collective after the caller's ``wait()`` has returned, and dropping the
    last one needs the interpreter lock. A process that goes straight on to exit leaves
    that thread waiting for the lock of an interpreter that is shutting down, which
    kills the thread inside a destructor: "terminate called without an active
    exception", SIGABRT, after the run's work was done (``destroy_process_group`` alone
    did not prevent it: the run called it and still aborted in about 1 run in 8).

    Parameters
    ----------
    meet : bool
        Whether every rank reaches this call (False after a communication error or an
        error of this rank alone: there is no one to meet, and waiting would only add
        ``--dist-timeout``).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return
    if dist.get_world_size() > 1:
        _ENDED_MULTI_RANK[:] = [True]
    try:
        if meet:
            synchronize()
    except RuntimeError as exc:
        # A meeting no other rank came to (this rank stopped alone after all, e.g. a full
        # disk at rank 0's checkpoint): bounded by --dist-timeout, and not the error to
        # report; the one that brought this rank here is.
        if not is_communication_error(exc):
            raise
    finally:
        dist.destroy_process_group()
