"""The queue's state independent of the topology: one global FIFO.

Every mode keeps the same global queue: K slots in *global slot order* and one
write pointer (the next slot written, i.e. the oldest one once the queue has
wrapped around; slots ``ptr, ptr + 1, ..., K - 1, 0, ..., ptr - 1`` are the
FIFO from the oldest to the newest). "none" and "gathered" hold all of it on
every rank; "sharded" holds global slots ``[start, stop)`` on each rank
(``shard_range``), with the same global pointer everywhere.

The *global form* of a queue state is what a single process holds, under the
keys of ``ClassQueue.state_dict()``::

    queue.weights  [K, D]   (the queue's dtype)
    queue.labels   [K]      int64, -1 = empty slot
    queue.ptr      [1]      int64, in [0, K)

It names no rank, world size or mode, and ``DCQLoss.load_state_dict`` takes it in
every mode at every world size (a sharded rank keeps its block of it). A sharded
rank's own ``state_dict()`` is its *block form*: its slots [stop - start, D], the
global pointer, and ``queue.shard`` = int64 [queue_size, start, stop, world_size,
rank], which says which block it is. This module turns either into the other:

- :func:`gather_queue_state`: the global queue of a (sharded or not) queue, a
  collective across the ranks of a sharded one (gathered block by block into
  host memory: at most one extra block on the device at a time);
- :func:`assemble_queue_state`: the global form from every rank's block-form
  state dicts, offline (e.g. per-rank files), older per-rank files without
  ``queue.shard`` included when given in rank order;
- :func:`block_state`: rank r's block of a global form, for a given world size.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from dcq_ops.parallel.collectives import gather_padded, world_size_and_rank
from dcq_ops.parallel.sharded import SHARD_KEY, ShardedClassQueue, shard_range
from dcq_ops.queue import ClassQueue, check_queue_state, check_queue_state_types
from dcq_ops.validation import check_int

_QUEUE_KEYS = ("weights", "labels", "ptr")


def queue_layout(queue: ClassQueue) -> dict:
    """Which global slots ``queue`` holds.

    Parameters
    ----------
    queue : ClassQueue or ShardedClassQueue
        A DCQLoss's ``queue``.

    Returns
    -------
    dict
        {"queue_size": K, "start", "stop", "world_size", "rank"}: [0, K) of 1 rank for an
        unsharded queue.
    """
    if not isinstance(queue, ClassQueue):
        raise TypeError(f"queue must be a ClassQueue or ShardedClassQueue, got {type(queue).__name__}")
    if isinstance(queue, ShardedClassQueue):
        return {"queue_size": queue.queue_size, "start": queue.start, "stop": queue.stop,
                "world_size": queue.world_size, "rank": queue.rank}
    return {"queue_size": queue.queue_size, "start": 0, "stop": queue.queue_size, "world_size": 1, "rank": 0}


@torch.no_grad()
def gather_queue_state(queue: ClassQueue, group=None, *, device="cpu",
                       dst: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """The global queue (weights [K, D], labels [K], ptr [1]) in global slot order.

    For a sharded queue this is a collective (every rank of ``group`` calls it): the
    blocks are broadcast one rank at a time and copied to ``device``, so that a rank's
    device holds at most one other block at a time - a sharded queue may not fit one
    GPU whole, host memory holds a checkpoint anyway. The ranks' pointers are compared
    first (ValueError on every rank when they differ: the queue is out of sync and
    there is no one global state to save). For an unsharded queue ("none", or a rank
    of "gathered", whose queue is every rank's) it is a copy, no communication.

    Parameters
    ----------
    queue : ClassQueue or ShardedClassQueue
        A DCQLoss's ``queue``.
    group : ProcessGroup, optional
        The group the queue is sharded over (default: the default group).
    device : torch.device or str
        Where the result is put (default: the CPU).
    dst : int, optional
        The rank of ``group`` that receives the queue (the others take part and get
        None); default: every rank.

    Returns
    -------
    tuple of torch.Tensor or None
    """
    device = torch.device(device)
    world, rank = world_size_and_rank(group) if isinstance(queue, ShardedClassQueue) else (1, 0)
    if dst is not None:
        check_int("dst", dst, minimum=0)
        if dst >= world and isinstance(queue, ShardedClassQueue):
            raise ValueError(f"dst must be a rank of the group, in [0, {world}), got {dst}")
    if not isinstance(queue, ShardedClassQueue):
        if not isinstance(queue, ClassQueue):
            raise TypeError(f"queue must be a ClassQueue or ShardedClassQueue, got {type(queue).__name__}")
        return (queue.weights.detach().to(device, copy=True), queue.labels.detach().to(device, copy=True),
                queue.ptr.detach().to(device, copy=True))
    if world != queue.world_size or rank != queue.rank:
        raise ValueError(f"the queue is rank {queue.rank}'s block of {queue.world_size} ranks, but this process is "
                         f"rank {rank} of {world} in group: pass the group the queue was sharded over")
    size = queue.queue_size
    # One small all-gather checks what must agree (and the pointers), before any block moves.
    header = torch.stack([torch.tensor(size, device=queue.ptr.device), queue.ptr.view(())]).view(1, 2)
    table = gather_padded(header, 1, group, world).view(world, 2).tolist()
    if any(row[0] != size for row in table):
        raise ValueError(f"gather_queue_state: every rank must hold a block of the same queue, got queue sizes "
                         f"{[row[0] for row in table]} on ranks 0..{world - 1}")
    if any(row[1] != table[0][1] for row in table):
        raise ValueError(f"gather_queue_state: the ranks' queue pointers differ ({[row[1] for row in table]} on "
                         f"ranks 0..{world - 1}): the sharded queue is out of sync, there is no one global state")
    receive = dst is None or rank == dst
    weights = torch.empty((size, queue.dim), dtype=queue.weights.dtype, device=device) if receive else None
    labels = torch.empty(size, dtype=torch.long, device=device) if receive else None
    for r in range(world):
        start, stop = shard_range(size, world, r)
        if r == rank:
            block_w, block_l = queue.weights.detach().contiguous(), queue.labels.detach().contiguous()
        else:
            block_w = queue.weights.new_empty((stop - start, queue.dim))
            block_l = queue.labels.new_empty(stop - start)
        dist.broadcast(block_w, group=group, group_src=r)
        dist.broadcast(block_l, group=group, group_src=r)
        if receive:
            weights[start:stop].copy_(block_w)
            labels[start:stop].copy_(block_l)
        del block_w, block_l
    if not receive:
        return None
    return weights, labels, torch.tensor([table[0][1]], dtype=torch.long, device=device)


def _shard_meta(state: Mapping, prefix: str) -> tuple[int, int, int, int, int] | None:
    meta = state.get(prefix + SHARD_KEY)
    if meta is None:
        return None
    values = torch.as_tensor(meta).reshape(-1).tolist()
    if len(values) != 5:
        raise ValueError(f"{prefix}{SHARD_KEY} must hold [queue_size, start, stop, world_size, rank], got {values}")
    return tuple(int(v) for v in values)


def is_block_state(state: Mapping, prefix: str = "queue.") -> bool:
    """Whether ``state`` holds one rank's block of a sharded queue (a sharded DCQLoss's own
    ``state_dict()``), not the global queue.

    Parameters
    ----------
    state : Mapping
        A DCQLoss (or queue) state dict.
    prefix : str
        The queue's keys' prefix ("queue." in a DCQLoss state dict, "" in a queue's).

    Returns
    -------
    bool
    """
    meta = _shard_meta(state, prefix)
    return meta is not None and (meta[1], meta[2]) != (0, meta[0])


@torch.no_grad()
def assemble_queue_state(states: Sequence[Mapping], prefix: str = "queue.") -> dict:
    """The global form of a sharded queue from the state dicts of every rank's block.

    Other keys (those not of the queue) are taken from the state of the block that
    starts at slot 0. States with ``queue.shard`` (written by this version) may come
    in any order; older per-rank states without it must come in rank order, all of
    them (their blocks are then those of ``shard_range(sum of sizes, len(states), r)``).

    Parameters
    ----------
    states : sequence of Mapping
        One state dict per rank (``DCQLoss.state_dict()`` of every rank of a sharded run).
    prefix : str
        The queue's keys' prefix ("queue." for DCQLoss state dicts).

    Returns
    -------
    dict
        A state dict in the global form (no ``queue.shard``), which
        ``DCQLoss.load_state_dict`` takes in every mode and world size.
    """
    if isinstance(states, Mapping) or not isinstance(states, Sequence) or not states:
        raise TypeError(f"states must be a non-empty list of state dicts (one per rank), got {type(states).__name__}")
    for i, state in enumerate(states):
        if not isinstance(state, Mapping):
            raise TypeError(f"states[{i}] must be a state dict, got {type(state).__name__}")
        missing = [prefix + k for k in _QUEUE_KEYS if prefix + k not in state]
        if missing:
            raise ValueError(f"states[{i}] has no queue: missing {missing} (saved with save_queue=False?)")
        # Before any value is read: a float pointer or float labels would be truncated.
        check_queue_state_types(*(state[prefix + k] for k in _QUEUE_KEYS), what=f"assemble_queue_state: states[{i}]",
                                names=tuple(prefix + k for k in _QUEUE_KEYS))
    metas = [_shard_meta(s, prefix) for s in states]
    world = len(states)
    if all(m is None for m in metas):  # older per-rank files: rank order, the blocks of shard_range
        size = sum(int(s[prefix + "weights"].shape[0]) for s in states)
        metas = [(size, *shard_range(size, world, r), world, r) for r in range(world)]
        for r, (state, meta) in enumerate(zip(states, metas)):
            if int(state[prefix + "weights"].shape[0]) != meta[2] - meta[1]:
                raise ValueError(f"states without {prefix}{SHARD_KEY} must be every rank's, in rank order: a queue "
                                 f"of {size} slots over {world} ranks has blocks of "
                                 f"{[b - a for a, b in (shard_range(size, world, q) for q in range(world))]} slots, "
                                 f"states[{r}] holds {int(state[prefix + 'weights'].shape[0])}")
    elif any(m is None for m in metas):
        raise ValueError(f"states mix blocks with and without {prefix}{SHARD_KEY}: give the states of one run")
    size, saved_world = metas[0][0], metas[0][3]
    if any(m[0] != size or m[3] != saved_world for m in metas):
        raise ValueError(f"states must be the blocks of one queue, got (queue_size, world_size) "
                         f"{[(m[0], m[3]) for m in metas]}")
    ranks = sorted(m[4] for m in metas)
    if ranks != list(range(saved_world)):
        raise ValueError(f"states must hold every rank's block of the queue sharded over {saved_world} ranks exactly "
                         f"once, got the blocks of ranks {ranks}")
    order = sorted(range(world), key=lambda i: metas[i][1])
    ptrs = [int(torch.as_tensor(states[i][prefix + "ptr"]).reshape(-1)[0]) for i in order]
    if any(p != ptrs[0] for p in ptrs):
        raise ValueError(f"the blocks' queue pointers differ ({ptrs} in slot order): these states were not saved "
                         f"at the same step")
    for i in order:
        start, stop = metas[i][1], metas[i][2]
        if (start, stop) != shard_range(size, saved_world, metas[i][4]):
            raise ValueError(f"states[{i}] claims slots [{start}, {stop}) of rank {metas[i][4]}, which holds "
                             f"{list(shard_range(size, saved_world, metas[i][4]))} of {size} slots over "
                             f"{saved_world} ranks")
        w, l = states[i][prefix + "weights"], states[i][prefix + "labels"]
        if tuple(w.shape[:1]) != (stop - start,) or tuple(l.shape) != (stop - start,):
            raise ValueError(f"states[{i}]: rank {metas[i][4]}'s block must hold {stop - start} slots, got weights "
                             f"{tuple(w.shape)} and labels {tuple(l.shape)}")
    weights = torch.cat([torch.as_tensor(states[i][prefix + "weights"]).cpu() for i in order])
    labels = torch.cat([torch.as_tensor(states[i][prefix + "labels"]).cpu() for i in order])
    ptr = torch.tensor([ptrs[0]], dtype=torch.long)
    check_queue_state(weights, labels, ptr, ptr_limit=size, what="assemble_queue_state")
    first = states[order[0]]
    out = {k: v for k, v in first.items() if not (k.startswith(prefix) and k[len(prefix):] in
                                                    (*_QUEUE_KEYS, SHARD_KEY))}
    out.update({prefix + "weights": weights, prefix + "labels": labels, prefix + "ptr": ptr})
    return out


def block_state(state: Mapping, world_size: int, rank: int, prefix: str = "queue.") -> dict:
    """Rank ``rank``'s block form of a global-form state, for a queue sharded over
    ``world_size`` ranks (what a sharded rank keeps when it loads the global form;
    ``DCQLoss.load_state_dict`` does this itself, this is for tools and tests).

    Parameters
    ----------
    state : Mapping
        A state dict in the global form.
    world_size, rank : int
        The sharding.
    prefix : str
        The queue's keys' prefix.

    Returns
    -------
    dict
    """
    check_int("world_size", world_size, minimum=1)
    check_int("rank", rank, minimum=0)
    if is_block_state(state, prefix):
        raise ValueError("state must be in the global form, got one rank's block (assemble_queue_state first)")
    weights, labels = state[prefix + "weights"], state[prefix + "labels"]
    size = int(weights.shape[0])
    start, stop = shard_range(size, world_size, rank)
    out = {k: v for k, v in state.items() if k != prefix + SHARD_KEY}
    out.update({prefix + "weights": weights[start:stop].clone(), prefix + "labels": labels[start:stop].clone(),
                prefix + SHARD_KEY: torch.tensor([size, start, stop, world_size, rank], dtype=torch.long)})
    return out


__all__ = ["assemble_queue_state", "block_state", "gather_queue_state", "is_block_state", "queue_layout"]
