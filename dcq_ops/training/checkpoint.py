"""Checkpoints of a run: what they hold (a trainer's state, every rank's RNG states,
as tensors and plain values that torch.load's default ``weights_only=True`` reads), and
how a trainer loads one (:func:`load_trainer_state`). The files themselves (written whole
with two distinct copies, checksums verified on read) are :mod:`.checkpoint_files`'s;
which file a run resumes, all or nothing, falling back past any file that fails to read,
verify or load, is :mod:`.resume`'s.
:func:`load_backbone` reads the feature extractor back out of one.

A checkpoint does not depend on the topology: rank 0 writes one file, whose DCQ
queue is the global FIFO (``DCQLoss.global_state_dict``: a sharded run gathers it
at the save), and which resumes in either ``--queue-mode`` on any number of
processes. On the same number of processes the continuation is bit-exact (every
rank gets back its own RNG states and weight-generator BatchNorm statistics; the
data order and shuffle-BN's permutation are functions of (seed, step)); on another
number the queue, its pointer, the models and the optimizer are those saved, and
the data order is the new world's (docs/distributed.md, "Checkpoints")."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from dcq_ops.training.backbones import build_backbone
from dcq_ops.training.checkpoint_files import CheckpointWriteError, read_checkpoint, write_checkpoint
from dcq_ops.training.config import RESUME_NEUTRAL, ConfigError, TrainConfig

CHECKPOINT_FORMAT = 1


class SettingsDiffer(ConfigError):
    """The checkpoint was written by a run with other settings: the user's mistake, not a
    damaged file (``--resume auto`` does not fall back past it: every file of the run
    would differ the same way)."""


def rng_state() -> dict:
    """This process's RNG states (torch, numpy, Python, CUDA when it is in use), as tensors
    and plain values: a checkpoint of them loads with ``torch.load(weights_only=True)``."""
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
                       "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
             "python": {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss_next": gauss_next}}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Put back the RNG states :func:`rng_state` returned (or the tuples of checkpoints
    written before they were stored as tensors)."""
    numpy_state, python_state = state["numpy"], state["python"]
    if isinstance(numpy_state, dict):
        keys = numpy_state["keys"]
        if not isinstance(keys, torch.Tensor) or keys.dtype != torch.int64 or keys.shape != (624,):
            raise ValueError(f"the numpy RNG state's keys must be an int64 tensor [624], got {keys!r:.80}")
        numpy_state = (numpy_state["kind"], keys.cpu().numpy().astype(np.uint32), int(numpy_state["pos"]),
                       int(numpy_state["has_gauss"]), float(numpy_state["cached_gaussian"]))
    if isinstance(python_state, dict):
        internal = python_state["state"]
        if not isinstance(internal, torch.Tensor) or internal.dtype != torch.int64:
            raise ValueError(f"the Python RNG state must be an int64 tensor, got {internal!r:.80}")
        python_state = (int(python_state["version"]), tuple(int(v) for v in internal.tolist()),
                        python_state["gauss_next"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_state)
    random.setstate(python_state)
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_resumable(state: dict, config: TrainConfig, world_size: int) -> None:
    """ConfigError unless ``state`` resumes the run of ``config``: the same format and
    the same settings where they change what the run computes. The number of processes
    (``world_size``) and ``queue_mode`` may differ: the checkpoint's queue is the
    global one (see :func:`load_trainer_state` for what differs then)."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"checkpoint format must be {CHECKPOINT_FORMAT}, got {state.get('format')!r}")
    if not isinstance(state.get("config"), dict):
        raise ConfigError(f"the checkpoint's config must be a dict, got {type(state.get('config')).__name__}")
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"the checkpoint's step must be an int >= 0, got {step!r}")
    # A field the checkpoint's version did not have yet ran at its default.
    saved = {**dataclasses.asdict(TrainConfig()), **state["config"]}
    mine = dataclasses.asdict(config)
    differ = {k: (saved.get(k), v) for k, v in mine.items() if k not in RESUME_NEUTRAL and saved.get(k) != v}
    if differ:
        details = ", ".join(f"{k}: checkpoint {a!r}, now {b!r}" for k, (a, b) in sorted(differ.items()))
        raise SettingsDiffer(f"the checkpoint was written with different settings, which would not resume the "
                             f"same run: {details}")
    if not isinstance(state.get("world_size"), int) or state["world_size"] < 1:
        raise ConfigError(f"the checkpoint's world_size must be a positive int, got {state.get('world_size')!r}")


def head_state(head: nn.Module, dst: int | None = 0) -> dict | None:
    """``head.state_dict()`` with the queue of every DCQLoss in it in the global form
    (``DCQLoss.global_state_dict``, on the CPU): the same in every queue mode and at
    every world size. A collective under a sharded queue: every rank calls it.

    Parameters
    ----------
    head : torch.nn.Module
        The run's head (not wrapped in DistributedDataParallel).
    dst : int, optional
        The rank that gets the state (the others get None); None: every rank.

    Returns
    -------
    dict or None
    """
    from dcq_ops.loss import DCQLoss  # the loss module is the library's: imported where it is needed

    state = head.state_dict()
    for name, module in head.named_modules():
        if not isinstance(module, DCQLoss):
            continue
        prefix = f"{name}." if name else ""
        queue = module.global_state_dict(dst=dst)
        if queue is None:
            continue
        state = type(state)((k, v) for k, v in state.items() if not k.startswith(prefix + "queue."))
        state.update((prefix + k, v) for k, v in queue.items())
    if dst is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != dst:
        return None
    return state


def _generator_buffers(generator) -> dict:
    """The weight generator's persistent buffers (its BatchNorm statistics), on the CPU:
    with generator_bn=train every rank's are its own (its own forward passes)."""
    names = {name for name, _ in generator.named_buffers()}
    return {k: v.detach().cpu().clone() for k, v in generator.state_dict().items() if k in names}


def trainer_state(trainer) -> dict:
    """What a checkpoint of ``trainer`` (a :class:`~dcq_ops.training.trainer.Trainer`)
    holds: the config, the step (and the run's total), the world size and queue mode
    that wrote it, the models (the DCQ queue in its global form, see
    :func:`head_state`), the optimizer, the schedule, the grad scaler, every rank's
    RNG states and weight-generator buffers, and the bad-step count. A collective
    under several ranks: every rank calls it; the head's queue is gathered to rank 0
    only (on the other ranks ``head`` is None: their state is not for saving)."""
    rng = rng_state()
    buffers = None if trainer.generator is None else _generator_buffers(trainer.generator)
    if trainer.world_size > 1:  # every rank's, so each rank resumes its own stream
        states = [None] * trainer.world_size
        dist.all_gather_object(states, {"rng": rng, "generator_buffers": buffers})
        rng = [s["rng"] for s in states]
        buffers = [s["generator_buffers"] for s in states]
    return {
        "format": CHECKPOINT_FORMAT,
        "config": dataclasses.asdict(trainer.config),
        "step": trainer.step,
        "total_steps": trainer.total_steps,
        "world_size": trainer.world_size,
        "queue_mode": trainer.queue_mode,
        "backbone": trainer.backbone.state_dict(),
        "head": head_state(trainer.head, dst=0),
        "generator": None if trainer.generator is None else trainer.generator.state_dict(),
        "generator_buffers": buffers if trainer.world_size > 1 else None,
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": trainer.scheduler.state_dict(),
        "scaler": trainer.scaler.state_dict(),
        "rng": rng,
        "bad_steps": trainer.bad_steps,
    }


def resumed_step(step: int, saved_total: int, total: int) -> int:
    """The step at which a run resumes a checkpoint of ``step`` of ``saved_total`` steps
    when it has ``total`` steps (another world size changes the steps of an epoch):
    the same share of the run, so that the epoch, the learning-rate and momentum
    schedules and the end of the run stay where they were.

    Parameters
    ----------
    step, saved_total : int
        The checkpoint's step and its run's number of steps.
    total : int
        This run's number of steps.

    Returns
    -------
    int
    """
    if saved_total == total:
        return step
    return min(total, round(step * total / saved_total))


def _fresh_rng(seed: int, step: int, rank: int) -> None:
    """Seed this process's generators from (seed, step, rank): the streams of a resume on
    another world size, which the checkpoint's cannot be (there is no rank to take them from)."""
    mixed = (seed * 1_000_003 + step * 7919 + rank * 104_729 + 0x5EED) % (2**32)
    torch.manual_seed(mixed)
    np.random.seed(mixed)
    random.seed(mixed)


def load_trainer_state(trainer, state: dict) -> list[str]:
    """Put ``state`` (:func:`trainer_state`'s) back into ``trainer`` after
    :func:`check_resumable`.

    On the world size that wrote it, everything is put back as it was, every rank its
    own RNG states and weight-generator buffers: the run continues bit for bit. On
    another world size (or the other queue mode) the models, the queue (each rank takes
    its block when sharded), its pointer, the optimizer and the scaler are those saved;
    the weight generator's buffers are rank 0's on every rank; the step becomes the
    same share of the run (:func:`resumed_step`: another world size has other steps
    per epoch), and the RNG streams are seeded from (seed, step, rank). The data order
    is the new world's: each epoch's permutation is the same, split across the new
    number of ranks into batches of the new global size.

    Parameters
    ----------
    trainer : Trainer
        The run to resume.
    state : dict
        A checkpoint's contents.

    Returns
    -------
    list of str
        What changed with the world size or the queue mode (for the progress output
        and the log); empty on the same topology.
    """
    check_resumable(state, trainer.config, trainer.world_size)
    if state["head"] is None:
        raise ConfigError("the checkpoint holds no head state (a state of a rank other than 0, which is not "
                          "for saving)")
    saved_world = state["world_size"]
    same_world = saved_world == trainer.world_size
    trainer.backbone.load_state_dict(state["backbone"])
    trainer.head.load_state_dict(state["head"])
    if trainer.generator is not None:
        trainer.generator.load_state_dict(state["generator"])
        buffers = state.get("generator_buffers")
        if same_world and isinstance(buffers, list):
            # strict=False: a subset of the keys, the buffers; each rank's own.
            result = trainer.generator.load_state_dict(buffers[trainer.rank], strict=False)
            if result.unexpected_keys:
                raise ConfigError(f"the checkpoint's weight-generator buffers do not fit: {result.unexpected_keys}")
    trainer.optimizer.load_state_dict(state["optimizer"])
    trainer.scheduler.load_state_dict(state["scheduler"])
    trainer.scaler.load_state_dict(state["scaler"])
    step = state["step"]
    trainer.guard.bad_steps = int(state.get("bad_steps", 0))  # checkpoints before bad-step counting had none
    messages = []
    saved_mode = state.get("queue_mode", "gathered" if saved_world > 1 else "none")
    if saved_mode != trainer.queue_mode and trainer.config.head == "dcq":
        messages.append(f"resume: the DCQ queue was saved in {saved_mode!r} mode and loads in "
                        f"{trainer.queue_mode!r} mode (the same global queue)")
    if same_world:
        rng = state["rng"]
        set_rng_state(rng[trainer.rank] if isinstance(rng, list) else rng)
        trainer.step = step
        return messages
    saved_total = int(state.get("total_steps") or trainer.total_steps_for(saved_world))
    trainer.step = resumed_step(step, saved_total, trainer.total_steps)
    if trainer.step != step:
        # The schedule's position follows the step (its function is this run's: the new totals).
        trainer.scheduler.last_epoch = trainer.step - 1
        trainer.scheduler.step()
    _fresh_rng(trainer.config.seed, trainer.step, trainer.rank)
    messages.append(f"resume: the checkpoint was written by {saved_world} process(es), this run has "
                    f"{trainer.world_size}: step {step} of {saved_total} resumes as step {trainer.step} of "
                    f"{trainer.total_steps} (the same share of the run); the queue, its pointer, the models and "
                    f"the optimizer are those saved; the data order and the random streams are this world's")
    return messages


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
    state, why = read_checkpoint(path, map_location)
    if state is None:
        raise ValueError(f"{path!r}: {why}")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path!r} is not a dcq_ops.train checkpoint (format {CHECKPOINT_FORMAT})")
    c = TrainConfig(**state["config"])
    channels = next(v for k, v in state["backbone"].items() if v.dim() == 4).shape[1]  # the first conv's input
    model = build_backbone(c.backbone, in_channels=channels, embedding_size=c.embedding_size,
                           image_size=c.image_size, width=c.width, dropout=c.dropout)
    model.load_state_dict(state["backbone"])
    return model.eval()


__all__ = ["CHECKPOINT_FORMAT", "CheckpointWriteError", "SettingsDiffer", "check_resumable", "head_state",
           "load_backbone", "load_trainer_state", "resumed_step", "rng_state", "set_rng_state", "trainer_state",
           "write_checkpoint"]
