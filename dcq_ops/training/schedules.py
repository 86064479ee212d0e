"""The schedules of a run, pure functions of the step: the learning-rate factor
(linear warm-up, then cosine or step decay) and the weight generator's EMA
momentum (constant, or a cosine rise)."""

from __future__ import annotations

import math
from typing import Sequence

from dcq_ops.training.config import MOMENTUM_SCHEDULES


def lr_factor(step: int, total: int, warmup: int, schedule: str, decay_at: Sequence[float], gamma: float) -> float:
    """The learning-rate multiplier of ``step`` (0-based): linear warm-up over
    ``warmup`` steps, then cosine to 0 at ``total``, or x ``gamma`` at each
    fraction of ``decay_at``.

    Parameters
    ----------
    step, total, warmup : int
        The step, the steps of the run, the warm-up steps.
    schedule : str
        "cosine" or "step".
    decay_at : sequence of float
        The step schedule's decay points, fractions of the run.
    gamma : float
        The step schedule's factor at each of them.

    Returns
    -------
    float
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return gamma ** sum(step >= round(f * total) for f in decay_at)


def generator_momentum(step: int, total: int, start: float, end: float, schedule: str) -> float:
    """The weight generator's EMA momentum for the update after ``step`` (0-based)
    of ``total``: ``start`` throughout ("constant"), or a cosine rise from
    ``start`` at step 0 to ``end`` at the last step ("cosine"), as BYOL raises its
    target momentum: m_t = end - (end - start) * (cos(pi t / (T - 1)) + 1) / 2.

    Why a rise: the EMA's time constant is 1 / (1 - m) steps. Early in training
    the feature extractor moves fast and a generator with m = 0.999 (1000 steps)
    still produces the class weights of an almost random network, so the loss
    has little to pull towards; late in training a long average gives stabler
    class weights.

    Parameters
    ----------
    step, total : int
        The step and the steps of the run.
    start, end : float
        The momentum at the first step, and at the last under "cosine".
    schedule : str
        "constant" or "cosine".

    Returns
    -------
    float
    """
    if schedule == "constant":
        return start
    if schedule != "cosine":
        raise ValueError(f"schedule must be one of {MOMENTUM_SCHEDULES}, got {schedule!r}")
    progress = min(1.0, step / max(1, total - 1))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2
