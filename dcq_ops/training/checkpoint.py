"""Checkpoints of a run: what they hold (a trainer's state, every rank's RNG
states), written atomically (a kill leaves the old file or the new one, never half
of one), found again on resume (``--resume auto`` falls back to the newest readable
step checkpoint) and checked against the run that resumes them. :func:`load_backbone` reads the feature extractor
back out of one."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import re

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dcq_ops.training.backbones import build_backbone
from dcq_ops.training.config import RESUME_NEUTRAL, ConfigError, TrainConfig
from dcq_ops.training.step_guard import TrainingError

CHECKPOINT_FORMAT = 1
STEP_CHECKPOINT = re.compile(r"checkpoint_(\d+)\.pt")
LATEST = "checkpoint.pt"


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.remove(path)


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, Python, CUDA when it is in use)."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back the RNG states :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(state: dict, output: str, step: int, keep: int) -> str:
    """Write OUTPUT/checkpoint_<step>.pt and OUTPUT/checkpoint.pt (the latest), and keep
    the newest ``keep`` step checkpoints; returns the step checkpoint's path.

    Neither is ever written in place: each is written (or hard-linked) under a
    temporary name and renamed over the final one, so a kill leaves the old file or
    the new one, never half of one. A temporary left by a kill is removed first: it
    may be a hard link to an older step checkpoint, and writing through it would
    overwrite that checkpoint."""
    os.makedirs(output, exist_ok=True)
    path = os.path.join(output, f"checkpoint_{step:07d}.pt")
    tmp = path + ".tmp"
    _remove(tmp)
    torch.save(state, tmp)
    os.replace(tmp, path)  # never a half-written checkpoint under the final name
    latest = os.path.join(output, LATEST)
    latest_tmp = latest + ".tmp"
    _remove(latest_tmp)  # a kill between link and replace leaves it linked to an older checkpoint
    try:
        os.link(path, latest_tmp)  # the latest shares the step file's bytes: no second write
    except OSError:  # a file system without hard links: a copy, into a file just created
        _remove(latest_tmp)
        torch.save(state, latest_tmp)
    os.replace(latest_tmp, latest)
    steps = sorted(f for f in os.listdir(output) if STEP_CHECKPOINT.fullmatch(f))
    for old in steps[:-keep]:
        os.remove(os.path.join(output, old))
    return path


def read_checkpoint(path: str, map_location):
    """(state, None) of a checkpoint this application wrote, or (None, why it cannot be read)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # a truncated or corrupt file fails in the zip reader or the unpickler
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if not isinstance(state, dict) or "step" not in state:
        return None, "not a dcq_ops.train checkpoint"
    return state, None


def find_checkpoint(path: str, output: str | None, map_location) -> tuple[dict | None, list[str]]:
    """The checkpoint ``--resume`` names: (its state, or None for a fresh run; messages
    for the progress output and the log).

    ``path`` is a checkpoint (ConfigError when it is missing or unreadable) or "auto":
    it reads OUTPUT/checkpoint.pt and also the step checkpoints newer than it (a kill
    between writing a step checkpoint and renaming it to checkpoint.pt leaves the newer
    one only there); when checkpoint.pt cannot be read (truncated, corrupt) it falls
    back to the newest readable step checkpoint and says so (TrainingError when none is
    readable)."""
    if path != "auto":
        if not os.path.exists(path):
            raise ConfigError(f"--resume must be an existing checkpoint or 'auto', got {path!r} (no such file)")
        state, why = read_checkpoint(path, map_location)
        if state is None:
            raise ConfigError(f"--resume {path}: cannot read the checkpoint ({why})")
        return state, []
    if not output or not os.path.isdir(output):
        return None, []  # nothing to resume: a fresh run
    latest = os.path.join(output, LATEST)
    steps = sorted((f for f in os.listdir(output) if STEP_CHECKPOINT.fullmatch(f)), reverse=True)
    if not steps and not os.path.exists(latest):
        return None, []
    failures, state, source = [], None, None
    if os.path.exists(latest):
        state, why = read_checkpoint(latest, map_location)
        if state is None:
            failures.append(f"{LATEST} ({why})")
        else:
            source = LATEST
    for name in steps:
        if state is not None and int(STEP_CHECKPOINT.fullmatch(name).group(1)) <= int(state["step"]):
            break  # checkpoint.pt is at least as new
        candidate, why = read_checkpoint(os.path.join(output, name), map_location)
        if candidate is None:
            failures.append(f"{name} ({why})")
            continue
        state, source = candidate, name
        break
    if state is None:
        raise TrainingError(f"--resume auto: no readable checkpoint in {output}: could not read "
                            f"{', '.join(failures)}")
    messages = []
    if failures:
        messages.append(f"resume: could not read {', '.join(failures)}; resuming from {source} "
                        f"(step {int(state['step'])})")
    elif source != LATEST:
        messages.append(f"resume: {source} (step {int(state['step'])}) is newer than {LATEST}"
                        + ("" if os.path.exists(latest) else " (which is missing)") + "; resuming from it")
    return state, messages


def check_resumable(state: dict, config: TrainConfig, world_size: int) -> None:
    """ConfigError unless ``state`` resumes the run of ``config`` on ``world_size``
    processes: the same format, the same settings where they change what the run
    computes, and the same number of processes (the data order and RNG streams)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint format must be {CHECKPOINT_FORMAT}, got {state.get('format')!r}")
    # A field the checkpoint's version did not have yet ran at its default.
    saved = {**dataclasses.asdict(TrainConfig()), **state["config"]}
    mine = dataclasses.asdict(config)
    differ = {k: (saved.get(k), v) for k, v in mine.items() if k not in RESUME_NEUTRAL and saved.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise ConfigError(f"the checkpoint was written with different settings, which would not resume the "
                          f"same run: {details}")
    if state["world_size"] != world_size:
        raise ConfigError(f"the checkpoint was written by {state['world_size']} processes, this run has "
                          f"{world_size}: the data order and the RNG streams differ")


def trainer_state(trainer) -> dict:
    """What a checkpoint of ``trainer`` (a :class:`~dcq_ops.training.trainer.Trainer`)
    holds: the config, the step, the models, the optimizer, the schedule, the grad
    scaler, every rank's RNG states and the bad-step count. A collective under several
    ranks: every rank calls it."""
    rng = rng_state()
    if trainer.world_size > 1:  # every rank's generators, so each rank resumes its own stream
        states = [None] * trainer.world_size
        dist.all_gather_object(states, rng)
        rng = states
    return {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(trainer.config),
        "step": trainer.step,
        "world_size": trainer.world_size,
        "backbone": trainer.backbone.state_dict(),
        "head": trainer.head.state_dict(),
        "generator": None if trainer.generator is None else trainer.generator.state_dict(),
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng,
        "bad_steps": trainer.bad_steps,
    }


def load_trainer_state(trainer, state: dict) -> None:
    """Put ``state`` (:func:`trainer_state`'s) back into ``trainer`` after
    :func:`check_resumable`."""
    check_resumable(state, trainer.config, trainer.world_size)
    trainer.backbone.load_state_dict(state["backbone"])
    trainer.head.load_state_dict(state["head"])
    if trainer.generator is not None:
        trainer.generator.load_state_dict(state["generator"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    rng = state["rng"]
    set_rng_state(rng[trainer.rank] if isinstance(rng, list) else rng)
    trainer.step = int(state["step"])
    trainer.guard.bad_steps = int(state.get("bad_steps", 0))  # checkpoints before bad-step counting had none


def load_backbone(path: str, map_location="cpu") -> nn.Module:
    """The feature extractor of a checkpoint written by ``dcq-train``, in eval mode.

    Parameters
    ----------
    path : str
        A checkpoint written by :class:`Trainer` (``checkpoint.pt`` or ``checkpoint_<step>.pt``).
    map_location : str or torch.device
        Where its tensors are loaded (``torch.load``'s argument).

    Returns
    -------
    torch.nn.Module
        The backbone its config names, with the checkpoint's weights, in eval mode.
    """
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a dcq_ops.train checkpoint (format {CHECKPOINT_FORMAT})")
    c = TrainConfig(**state["config"])
    channels = next(v for k, v in state["backbone"].items() if v.dim() == 4).shape[1]  # the first conv's input
    model = build_backbone(c.backbone, in_channels=channels, embedding_size=c.embedding_size,
                           image_size=c.image_size, width=c.width, dropout=c.dropout)
    model.load_state_dict(state["backbone"])
    return model.eval()
