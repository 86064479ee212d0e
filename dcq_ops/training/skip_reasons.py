"""Why a step was skipped, and on which rank, carried in the flags the ranks already
exchange: each rank writes the bit mask of what is wrong on its side into its own slot
of a [world] vector, and the one all-reduce (SUM) that makes every rank keep or skip
the same steps gives every rank every rank's mask. No collective and no host read is
added: the vector replaces the single flag of before, and is read where the bad-step
guard reads its flags anyway (:mod:`.step_guard`)."""

from __future__ import annotations

import torch
import torch.distributed as dist

from dcq_ops.batch_guard import BatchGuard, describe

# What a step's own values can get wrong (the bits of a rank's mask).
LOSS, EMBEDDINGS, CLASS_WEIGHTS, GRADIENTS = 1, 2, 4, 8
_WORDS = ((LOSS, "the loss"), (EMBEDDINGS, "the embeddings"), (CLASS_WEIGHTS, "the class weights"),
          (GRADIENTS, "the gradients"))


def _share(mask: torch.Tensor, world_size: int) -> torch.Tensor:
    """[world] int64 on the device: every rank's mask (one all-reduce; [1] for one process)."""
    if world_size == 1:
        return mask.view(1)
    flags = torch.zeros(world_size, dtype=torch.int64, device=mask.device)
    flags[dist.get_rank()] = mask.view(())
    dist.all_reduce(flags, op=dist.ReduceOp.SUM)
    return flags


def step_flags(loss: torch.Tensor, embeddings: torch.Tensor, class_weights: torch.Tensor | None,
               grads_finite: torch.Tensor | None, world_size: int) -> torch.Tensor:
    """Every rank's mask of what is not finite in its step (the bits LOSS, EMBEDDINGS,
    CLASS_WEIGHTS, GRADIENTS), on the device, with no host read: the step is kept on
    every rank where the result is all zero.

    Parameters
    ----------
    loss, embeddings : torch.Tensor
        The step's loss and the backbone's embeddings.
    class_weights : torch.Tensor, optional
        The weight generator's output.
    grads_finite : torch.Tensor, optional
        A device bool: whether every gradient is finite (None: not checked).
    world_size : int
        The number of processes.

    Returns
    -------
    torch.Tensor
        int64 [world_size].
    """
    mask = (~torch.isfinite(loss.detach())).long() * LOSS + (~torch.isfinite(embeddings).all()).long() * EMBEDDINGS
    if class_weights is not None:
        mask = mask + (~torch.isfinite(class_weights).all()).long() * CLASS_WEIGHTS
    if grads_finite is not None:
        mask = mask + (~grads_finite).long() * GRADIENTS
    return _share(mask, world_size)


def describe_step(masks: list[int], grads_checked: bool = True) -> str:
    """The reason of a skipped step from every rank's mask (:func:`step_flags`): what
    held NaN or infinite values, and where several processes run, on which rank.

    Parameters
    ----------
    masks : list of int
        One mask per rank.
    grads_checked : bool
        Whether the gradients were checked (the words of an empty mask say so).

    Returns
    -------
    str
    """
    parts = []
    for rank, mask in enumerate(masks):
        if mask:
            words = [w for bit, w in _WORDS if mask & bit]
            words = ", ".join(words[:-1]) + " and " + words[-1] if len(words) > 1 else words[0]
            parts.append(("" if len(masks) == 1 else f"rank {rank}: ") + f"NaN or infinite values in {words}")
    if parts:
        return "; ".join(parts)
    return ("NaN or infinite values in the loss, the gradients or the head's inputs (embeddings, class weights)"
            if grads_checked else "NaN or infinite values in the loss or the head's inputs (embeddings, class weights)")


def batch_problem(embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor, num_classes: int,
                  world_size: int) -> str | None:
    """Under several processes, why DCQLoss would reject this step's batch of any rank,
    naming each rank whose batch is bad and why (one all-reduce and one host read, which
    every rank makes at the same step); None when every rank's batch is good.

    Parameters
    ----------
    embeddings, class_weights : torch.Tensor
        This rank's head inputs.
    labels : torch.Tensor
        This rank's labels.
    num_classes : int
        The number of classes of the data.
    world_size : int
        The number of processes.

    Returns
    -------
    str or None
    """
    # DCQLoss's own rule for a batch (its device-side bit mask), so that both say the same.
    mask = BatchGuard.reasons(_Classes(num_classes), embeddings, labels.view(-1), class_weights)
    masks = _share(mask, world_size).tolist()
    if not any(masks):
        return None
    return "DCQLoss would reject the batch of " + "; ".join(
        f"rank {rank} ({describe(m, num_classes)})" for rank, m in enumerate(masks) if m)


class _Classes:
    """What BatchGuard.reasons reads of its module: the number of classes."""

    def __init__(self, num_classes: int):
        self.num_classes = num_classes
