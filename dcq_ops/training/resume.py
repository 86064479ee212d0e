"""Which checkpoint a run resumes, all or nothing: ``--resume auto`` tries OUTPUT's
checkpoints newest first and takes the first that every rank reads, verifies and loads;
a file that fails any of the three is named with why (stderr and the run log) and
skipped, and a load that fails is undone (:class:`_TrainerSnapshot`), so no single
damaged file loses the progress of the files before it."""

from __future__ import annotations

import copy
import itertools
import os
import sys

import torch
import torch.distributed as dist

from dcq_ops.training.checkpoint import SettingsDiffer, rng_state, set_rng_state
from dcq_ops.training.checkpoint_files import LATEST, candidates, read_checkpoint, remove_stale_temporaries
from dcq_ops.training.config import ConfigError
from dcq_ops.training.step_guard import TrainingError


class _TrainerSnapshot:
    """What a load may change in a trainer, copied before it: a load that fails (or that
    another rank's load refused) is undone, so a resume is all or nothing and the next
    checkpoint loads into the trainer as it was built."""

    def __init__(self, trainer):
        self.trainer = trainer
        self.modules = [m for m in (trainer.backbone, trainer.head, trainer.generator) if m is not None]
        self.tensors = [{name: t.detach().clone() for name, t in self._tensors(m)} for m in self.modules]
        self.optimizer = copy.deepcopy(trainer.optimizer.state_dict())
        self.scheduler = copy.deepcopy(trainer.scheduler.state_dict())
        self.scaler = copy.deepcopy(trainer.scaler.state_dict())
        self.rng = rng_state()
        self.step, self.bad_steps = trainer.step, trainer.guard.bad_steps

    @staticmethod
    def _tensors(module):
        return itertools.chain(module.named_parameters(), module.named_buffers())

    @torch.no_grad()
    def restore(self) -> None:
        trainer = self.trainer
        for module, saved in zip(self.modules, self.tensors):
            for name, t in self._tensors(module):  # by name: a load may have replaced a tensor
                t.copy_(saved[name])
        trainer.optimizer.load_state_dict(copy.deepcopy(self.optimizer))
        trainer.scheduler.load_state_dict(copy.deepcopy(self.scheduler))
        trainer.scaler.load_state_dict(copy.deepcopy(self.scaler))
        set_rng_state(self.rng)
        trainer.step, trainer.guard.bad_steps = self.step, self.bad_steps


def _first_line(exc: BaseException) -> str:
    """The exception in one line (torch's load errors say what in their second line)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()][:2]
    text = " ".join(lines)
    return f"{type(exc).__name__}: {text[:300]}"


def _every_rank(trainer, value):
    """[value of every rank] (a collective under several ranks; [value] in one process)."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        values = [None] * trainer.world_size
        dist.all_gather_object(values, value)
        return values
    return [value]


def _rank_zeros(trainer, value):
    """Rank 0's ``value`` on every rank (so that every rank tries the same files)."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _try_load(trainer, files: list[tuple[str, str]], cached: dict) -> tuple[dict | None, list[str], list[str]]:
    """Load the first of ``files`` ((name, path) pairs) that every rank reads, verifies and
    loads; (its state, the load's messages, why each file before it was skipped).
    A load that fails on any rank is undone on every rank (:class:`_TrainerSnapshot`)."""
    snapshot, skipped = None, []
    for name, path in files:
        state, why = cached.pop(name) if name in cached else read_checkpoint(path, trainer.device)
        messages = []
        if state is not None:
            snapshot = snapshot or _TrainerSnapshot(trainer)
            try:
                messages = trainer.load_state_dict(state)
            except SettingsDiffer:
                raise  # another run's settings: not a damaged file (every rank raises alike)
            except Exception as exc:  # whatever the file holds that the trainer cannot take
                why = f"failed to load: {_first_line(exc)}"
        whys = _every_rank(trainer, why)
        if all(w is None for w in whys):
            return state, messages, skipped
        if snapshot is not None and state is not None:
            snapshot.restore()
        state = None
        same = all(w == whys[0] for w in whys)
        skipped.append(whys[0] if same else "; ".join(f"rank {r}: {w}" for r, w in enumerate(whys) if w is not None))
    return None, [], skipped


def resume_trainer(trainer, path: str) -> list[str]:
    """Resume ``trainer`` from the checkpoint ``path`` names: a file (ConfigError when it is
    missing or fails to read, verify or load), or "auto": the newest of OUTPUT's checkpoints
    that reads, verifies (:func:`~.checkpoint_files.verify_checkpoint`) and loads on every
    rank, each file skipped named with why (on stderr, and in the messages for the log);
    nothing to resume is a fresh run, nothing loadable a TrainingError. A load is all or
    nothing: a file that fails to load leaves the trainer as it was. What a kill or a full
    disk left under temporary names is removed first. A collective under several ranks.

    Parameters
    ----------
    trainer : Trainer
        The run to resume (its ``load_state_dict`` loads a checkpoint's state).
    path : str
        A checkpoint, or "auto".

    Returns
    -------
    list of str
        Messages for the progress output and the log (which checkpoint, what was skipped
        and why, what changed with the world size or the queue mode).
    """
    output = trainer.config.output
    if trainer.rank == 0 and output:
        remove_stale_temporaries(output)
    if path != "auto":
        if not os.path.exists(path):
            raise ConfigError(f"--resume must be an existing checkpoint or 'auto', got {path!r} (no such file)")
        state, messages, whys = _try_load(trainer, [(path, path)], {})
        if state is None:
            raise ConfigError(f"--resume {path}: cannot resume the checkpoint: {whys[0]}")
        return messages
    if not output or not os.path.isdir(output):
        return []  # nothing to resume: a fresh run
    latest = os.path.join(output, LATEST)
    cached, skipped, latest_step = {}, [], None
    if os.path.exists(latest):
        state, why = read_checkpoint(latest, trainer.device)
        whys = _every_rank(trainer, why)
        if any(w is not None for w in whys):
            skipped.append(f"{LATEST} ({next(w for w in whys if w is not None)})")
        else:
            cached[LATEST], latest_step = (state, None), int(state["step"])
    names = _rank_zeros(trainer, candidates(output, latest_step))
    if not names and not skipped:
        return []
    if names and names[0] != LATEST:
        cached.clear()  # a newer step checkpoint comes first: not two states in memory
    state, messages, whys = _try_load(trainer, [(n, os.path.join(output, n)) for n in names], cached)
    skipped += [f"{name} ({why})" for name, why in zip(names, whys)]
    if state is None:
        raise TrainingError(f"--resume auto: no readable checkpoint in {output}: skipped {', '.join(skipped)}")
    step, source = int(state["step"]), names[len(whys)]
    notes = []
    if skipped:
        notes.append(f"resume: skipped {', '.join(skipped)}; resuming from {source} (step {step})")
        if trainer.rank == 0:
            print(f"dcq-train: {notes[-1]}", file=sys.stderr, flush=True)
    elif source != LATEST:
        notes.append(f"resume: {source} (step {step}) is newer than {LATEST}"
                     + ("" if os.path.exists(latest) else " (which is missing)") + "; resuming from it")
    return notes + messages


__all__ = ["resume_trainer"]
