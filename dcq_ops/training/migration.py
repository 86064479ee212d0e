"""What a trainer of one's own needs to resume like ``dcq-train`` (the arcface_torch
migration patch uses it in ``train_v2.py``): random states that ``torch.load``'s
defaults (``weights_only=True``) load, and a warm-up/polynomial schedule carried over
to another number of processes."""

from __future__ import annotations

import random

import numpy as np
import torch


def portable_rng_state() -> dict:
    """This process's random states (torch, numpy, Python; CUDA when in use) as tensors
    and plain types only, so that ``torch.load(path)`` with its defaults loads them
    (numpy's own state holds an ndarray, which ``weights_only=True`` refuses).

    Returns
    -------
    dict
        For :func:`set_portable_rng_state`.
    """
    name, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(),
             "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
             "python": [int(version), torch.tensor(internal, dtype=torch.int64), gauss]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_portable_rng_state(state: dict) -> None:
    """Put back the random states :func:`portable_rng_state` returned.

    Parameters
    ----------
    state : dict
        :func:`portable_rng_state`'s result.
    """
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal.tolist()), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def rescale_schedule(scheduler, step: int, saved_total: int, total: int, warmup: int) -> tuple[int, str]:
    """Carry a step-based warm-up/decay schedule (arcface_torch's ``PolynomialLRWarmup``:
    ``last_epoch``, ``warmup_iters``, ``total_iters``) over to a run of ``total`` steps,
    resumed from step ``step`` of a run of ``saved_total`` (another number of processes
    changes the global batch, hence the steps of an epoch): the same share of the run,
    as ``dcq-train`` does, and the learning rates of that step.

    Parameters
    ----------
    scheduler : torch.optim.lr_scheduler.LRScheduler
        Loaded from the checkpoint; it needs ``_get_closed_form_lr``.
    step, saved_total : int
        The checkpoint's step and its run's number of steps.
    total, warmup : int
        This run's number of steps and of warm-up steps.

    Returns
    -------
    tuple
        (the step this run resumes at, a sentence that says so).
    """
    for name, value in (("step", step), ("saved_total", saved_total), ("total", total), ("warmup", warmup)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if saved_total <= 0 or total <= 0:
        raise ValueError(f"saved_total and total must be > 0, got {saved_total} and {total}")
    new_step = min(total, round(step * total / saved_total))
    scheduler.total_iters = total
    scheduler.warmup_iters = warmup
    scheduler.last_epoch = new_step
    lrs = scheduler._get_closed_form_lr() if new_step > 0 else [g["initial_lr"] for g in scheduler.optimizer.param_groups]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = list(lrs)
    return new_step, (f"step {step} of {saved_total} resumes as step {new_step} of {total} (the schedule follows "
                      f"the new global batch: warm-up {warmup} steps, learning rate {lrs[0]:.6g})")
