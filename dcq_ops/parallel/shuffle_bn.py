"""MoCo's shuffle-BN for the weight generator under several ranks."""

from __future__ import annotations

import torch

from dcq_ops.parallel.collectives import (broadcast, default_device, dtype_code, gather_padded, raise_collectively,
                                          trim, world_size_and_rank)
from dcq_ops.validation import check_int

_MASK64 = (1 << 64) - 1


def _mix64(value: int) -> int:
    """SplitMix64's finaliser: a bijection of 64-bit ints that spreads every input bit."""
    value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
    value = (value ^ (value >> 27)) * 0x94D049BB133111EB & _MASK64
    return value ^ (value >> 31)


def shuffle_seed(seed: int, step: int) -> int:
    """The seed of the shuffle permutation of ``step`` in a run seeded with ``seed``: a
    fixed hash of the pair (not Python's ``hash``), the same in every process and
    every run, in [0, 2**63).

    Parameters
    ----------
    seed : int
        The run's seed (>= 0).
    step : int
        The training step (>= 0).

    Returns
    -------
    int
    """
    check_int("seed", seed, minimum=0)
    check_int("step", step, minimum=0)
    first = _mix64((seed + 0x9E3779B97F4A7C15) & _MASK64)  # the constant: seed 0, step 0 is no fixed point
    return _mix64(first ^ ((step + 1) * 0xD1B54A32D192ED03 & _MASK64)) >> 1


def shuffle_permutation(total: int, seed: int, step: int) -> torch.Tensor:
    """The permutation of the ``total`` gathered images that :func:`shuffled_forward`
    uses for ``step`` of a run seeded with ``seed`` (int64, on the CPU): a pure function
    of its arguments, so every rank draws the same one without communicating, and a
    run resumed at ``step`` draws what the uninterrupted run drew.

    Parameters
    ----------
    total : int
        The number of images of every rank together (>= 1).
    seed, step : int
        As :func:`shuffle_seed`.

    Returns
    -------
    torch.Tensor
        A permutation of ``range(total)``.
    """
    check_int("total", total, minimum=1)
    generator = torch.Generator(device="cpu").manual_seed(shuffle_seed(seed, step))
    return torch.randperm(total, generator=generator)


@torch.no_grad()
def shuffled_forward(module, images: torch.Tensor, *, group=None, generator: torch.Generator | None = None,
                     seed: int | None = None, step: int | None = None):
    """``module(images)`` with MoCo's batch shuffle across ranks (shuffle-BN), for the
    weight generator: BatchNorm statistics then come from a random mix of every
    rank's samples instead of this rank's own, which would let the batch statistics
    leak the identity of the positive pair.

    All ranks' images are all-gathered (batch sizes may differ) and permuted; this
    rank runs ``module`` on its chunk of the permuted batch (as many rows as its own
    batch); the outputs are all-gathered and un-permuted, and this rank gets the
    outputs of its own images back, in order. No gradient flows (it is for the
    weight generator). Without a process group of more than one rank it is
    ``module(images)``. Every rank of ``group`` must call it.

    The permutation: with ``seed`` and ``step`` it is
    :func:`shuffle_permutation` ``(total, seed, step)``, drawn by every rank alike (no
    broadcast) and independent of any random state, so that a run resumed from a
    checkpoint shuffles exactly as the uninterrupted run did (the ranks check that they
    agree on both). Otherwise rank 0 draws it (from ``generator`` if given, else from
    torch's global random state, which a checkpoint must then save for an exact
    resume) and broadcasts it.

    Parameters
    ----------
    module : callable
        The weight generator (e.g. a MomentumEncoder).
    images : torch.Tensor
        This rank's batch [N, ...].
    group : ProcessGroup, optional
        Default: the default group.
    generator : torch.Generator, optional
        The random stream of rank 0's permutation (default: torch's global one); not
        with ``seed``.
    seed : int, optional
        The run's seed (>= 0), with ``step``.
    step : int, optional
        The training step (>= 0), with ``seed``: the same on every rank.

    Returns
    -------
    torch.Tensor
        ``module``'s outputs of this rank's images, in their order.
    """
    if (seed is None) != (step is None):
        raise ValueError(f"shuffled_forward: give seed and step together (the permutation is a function of "
                         f"both), got seed={seed!r}, step={step!r}")
    if seed is not None:
        check_int("seed", seed, minimum=0)
        check_int("step", step, minimum=0)
        if generator is not None:
            raise ValueError("shuffled_forward: give either generator (rank 0 draws the permutation) or seed and "
                             "step (every rank computes it), not both")
    world, rank = world_size_and_rank(group)
    if world == 1:
        return module(images)
    error = None
    max_dims = 8
    try:
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
        if not 1 <= images.dim() <= max_dims or images.shape[0] == 0:
            raise ValueError(f"images must be a non-empty batch [N, ...] with 1 to {max_dims} dimensions, "
                             f"got shape {tuple(images.shape)}")
        device = images.device
    except Exception as exc:  # noqa: BLE001
        error, device = exc, default_device(group)
    shape = list(images.shape) if error is None else []
    seeded = [0, 0, 0] if seed is None else [1, seed, step]
    header = torch.tensor([0 if error is None else 1, dtype_code(images) if error is None else 0,
                           len(shape)] + shape + [0] * (max_dims - len(shape)) + seeded,
                          dtype=torch.long, device=device)
    table = gather_padded(header.view(1, -1), 1, group, world).view(world, -1).tolist()
    statuses = [row[0] for row in table]
    if any(statuses):
        raise_collectively(error, statuses, "shuffled_forward", group, world, device)
    trailing = [tuple(row[4:3 + row[2]]) + (row[1],) for row in table]
    if any(t != trailing[0] for t in trailing):
        raise ValueError(f"shuffled_forward: images must have the same shape after the batch dimension and the "
                         f"same dtype on every rank, got (shape[1:], dtype code) {trailing} on ranks 0..{world - 1}")
    seeds = [tuple(row[3 + max_dims:]) for row in table]
    if any(s != seeds[0] for s in seeds):
        shown = [("no seed" if not s[0] else f"seed={s[1]}, step={s[2]}") for s in seeds]
        raise ValueError(f"shuffled_forward: every rank must pass the same seed and step (or none), got "
                         f"{shown} on ranks 0..{world - 1}")
    sizes = [row[3] for row in table]
    rows, total, offset, n = max(sizes), sum(sizes), sum(sizes[:rank]), sizes[rank]
    all_images = trim(gather_padded(images, rows, group, world), sizes)
    if seed is not None:
        permutation = shuffle_permutation(total, seed, step).to(device)
    else:
        if rank == 0:
            permutation = torch.randperm(total, generator=generator,
                                         device=generator.device if generator is not None else device).to(device)
        else:
            permutation = torch.empty(total, dtype=torch.long, device=device)
        broadcast(permutation, group=group, group_src=0)
    out = module(all_images[permutation[offset:offset + n]])
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"shuffled_forward: module must return a tensor with one row per image ({n}), "
                         f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    all_out = trim(gather_padded(out, rows, group, world), sizes)  # all_out[p] = f(images[permutation[p]])
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(total, device=device)
    return all_out[inverse[offset:offset + n]]
