"""MoCo's shuffle-BN for the weight generator under several ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dcq_ops.parallel.collectives import (default_device, dtype_code, gather_padded, raise_collectively, trim,
                                          world_size_and_rank)


@torch.no_grad()
def shuffled_forward(module, images: torch.Tensor, *, group=None, generator: torch.Generator | None = None):
    """``module(images)`` with MoCo's batch shuffle across ranks (shuffle-BN), for the
    weight generator: BatchNorm statistics then come from a random mix of every
    rank's samples instead of this rank's own, which would let the batch statistics
    leak the identity of the positive pair.

    All ranks' images are all-gathered (batch sizes may differ), permuted with a
    permutation drawn on rank 0 (from ``generator`` if given) and broadcast; this
    rank runs ``module`` on its chunk of the permuted batch (as many rows as its own
    batch); the outputs are all-gathered and un-permuted, and this rank gets the
    outputs of its own images back, in order. No gradient flows (it is for the
    weight generator). Without a process group of more than one rank it is
    ``module(images)``. Every rank of ``group`` must call it.

    Parameters
    ----------
    module : callable
        The weight generator (e.g. a MomentumEncoder).
    images : torch.Tensor
        This rank's batch [N, ...].
    group : ProcessGroup, optional
        Default: the default group.
    generator : torch.Generator, optional
        The random stream of rank 0's permutation (default: torch's global one).

    Returns
    -------
    torch.Tensor
        ``module``'s outputs of this rank's images, in their order.
    """
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
    header = torch.tensor([0 if error is None else 1, dtype_code(images) if error is None else 0,
                           len(shape)] + shape + [0] * (max_dims - len(shape)), dtype=torch.long, device=device)
    table = gather_padded(header.view(1, -1), 1, group, world).view(world, -1).tolist()
    statuses = [row[0] for row in table]
    if any(statuses):
        raise_collectively(error, statuses, "shuffled_forward", group, world, device)
    trailing = [tuple(row[4:3 + row[2]]) + (row[1],) for row in table]
    if any(t != trailing[0] for t in trailing):
        raise ValueError(f"shuffled_forward: images must have the same shape after the batch dimension and the "
                         f"same dtype on every rank, got (shape[1:], dtype code) {trailing} on ranks 0..{world - 1}")
    sizes = [row[3] for row in table]
    rows, total, offset, n = max(sizes), sum(sizes), sum(sizes[:rank]), sizes[rank]
    all_images = trim(gather_padded(images, rows, group, world), sizes)
    if rank == 0:
        permutation = torch.randperm(total, generator=generator,
                                     device=generator.device if generator is not None else device).to(device)
    else:
        permutation = torch.empty(total, dtype=torch.long, device=device)
    dist.broadcast(permutation, group=group, group_src=0)
    out = module(all_images[permutation[offset:offset + n]])
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != n:
        raise ValueError(f"shuffled_forward: module must return a tensor with one row per image ({n}), "
                         f"got {type(out).__name__} {tuple(getattr(out, 'shape', ()))}")
    all_out = trim(gather_padded(out, rows, group, world), sizes)  # all_out[p] = f(images[permutation[p]])
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(total, device=device)
    return all_out[inverse[offset:offset + n]]
