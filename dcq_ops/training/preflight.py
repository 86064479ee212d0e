"""The checks of a run's settings against this machine, made before the data is built
and before the process group is joined, so that a setting that cannot run is a usage
error at once (status 2), not a traceback after the data was read or the steps were
run: the output directory (a directory this process can write), the ``--eval-bin``
sets (read and checked whole, then kept for the run's verification), and the DCQ
backend on this device (and, under several processes, in this queue mode)."""

from __future__ import annotations

import os
import tempfile

import torch

from dcq_ops.training.config import ConfigError, TrainConfig
from dcq_ops.training.periodic_eval import load_eval_bins


def environment_rank_and_world() -> tuple[int, int]:
    """(rank, world size) as torchrun announces them (RANK, WORLD_SIZE), before the
    process group exists; (0, 1) without torchrun."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def check_output(output: str) -> None:
    """ConfigError unless ``output`` is a directory this process can create files in
    (it is made when missing): a file, a directory under a file, a read-only or
    unwritable place are refused before any work.

    Parameters
    ----------
    output : str
        ``--output``.
    """
    if os.path.exists(output) and not os.path.isdir(output):
        raise ConfigError(f"--output {output}: is a file, not a directory (the run writes its log and checkpoints "
                          f"into a directory)")
    try:
        os.makedirs(output, exist_ok=True)
        # Creating a file is the only check that tells: permissions, a read-only mount, root's rights.
        with tempfile.NamedTemporaryFile(dir=output, prefix=".dcq-train-write-check-"):
            pass
    except OSError as exc:
        raise ConfigError(f"--output {output}: cannot write there ({exc.strerror or exc}): choose a writable "
                          f"directory") from None


def check_backend(config: TrainConfig, device: torch.device, world_size: int) -> None:
    """ConfigError unless the DCQ head's ``--backend`` runs on ``device`` (and, for a
    sharded queue under several processes, is one with the loss algebra's partials).

    Parameters
    ----------
    config : TrainConfig
    device : torch.device
        Where the run runs.
    world_size : int
        The number of processes.
    """
    if config.head != "dcq":
        return
    from dcq_ops.backends import select_backend  # the library's choice, asked as DCQLoss will ask it
    sharded = world_size > 1 and config.queue_mode == "sharded"
    try:
        select_backend(device, config.backend, fused_only=sharded, warn=False)
    except (RuntimeError, TypeError, ValueError) as exc:
        flags = f"--backend {config.backend}" + (" with --queue-mode sharded" if sharded else "")
        raise ConfigError(f"{flags}: {exc}") from None


def preflight(config: TrainConfig, device: torch.device) -> dict | None:
    """Every check of this module for ``config`` on ``device``; returns the
    ``--eval-bin`` sets, loaded and checked, for the run's verification (rank 0 only,
    which evaluates; None elsewhere and without any).

    Parameters
    ----------
    config : TrainConfig
    device : torch.device

    Returns
    -------
    dict or None
        {set name: loaded set}.
    """
    rank, world_size = environment_rank_and_world()
    check_backend(config, device, world_size)
    if rank != 0:  # rank 0 writes the output and evaluates
        return None
    if config.output:
        check_output(config.output)
    if not config.eval_bin:
        return None
    try:
        return load_eval_bins(config.eval_bin, config.image_size)
    except (ValueError, OSError) as exc:
        raise ConfigError(f"--eval-bin: {exc}") from None
