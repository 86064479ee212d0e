"""The interface every queue strategy of DCQLoss implements, the modes that
choose one, and the step protocol of the multi-rank strategies.

A strategy owns how the queue is shared between ranks. DCQLoss calls every
strategy the same way, once per step:

    batch = strategy.exchange(embeddings, prepare, training=..., reasons=..., eager=...)
    rows  = strategy.loss_rows(batch, kernels)         # loss of this rank's rows
    loss  = strategy.reduce(rows, batch, reduction)
    strategy.enqueue(batch)                            # training only

``prepare`` is DCQLoss's local check of the step's input: it returns the labels
(int64 [n]) and the detached class weights, or raises. ``reasons`` (or None)
computes the device-side bit mask of what is wrong with the batch's values
(dcq_ops.batch_guard). ``kernels`` (dcq_ops.loss_kernels.LossKernels) computes
the loss against a queue or a slice of one.

The multi-rank step (``HeaderExchangeQueue``), without a host read in steady state
-----------------------------------------------------------------------------------

Every step, on every rank, starts with one all-gather of a small int64 header
(``HEADER_FIELDS``): the rank's flags, its row count, its queue pointer and the
value-check bit mask (both copied on the device), its *signature* (mode,
training flag, embedding size, queue size and dtypes, whether a gradient is
needed, eager validation) and the capacity it works with. The result stays on
the device: from it every rank computes, with device ops only, the row counts
of all ranks, their total (the "mean" reduction's divisor) and one bit mask of
reasons per rank (bad values, an input the rank refused, a request to
renegotiate, queue pointers out of step, a gathered batch larger than the
queue). The enqueue is guarded by their combination: a bad batch on any rank
enters no rank's queue; ``BatchGuard`` keeps the first one and every rank raises
at its next call, naming the rank, the step and the reason.

What must agree and never changes is checked on the host once: a rank reads the
header table (one host sync) only when it *requests* an agreement, which it
knows on its own host: at its first step, when its signature differs from the
one it agreed to, when its batch exceeds the agreed capacity C (the rows every
rank's batch is padded to; the largest batch of the first step, or more with
``reserve_batch_capacity``), and at every step under ``validate="eager"``. When
every rank requests (the first step; every rank switching to eval; every rank's
batch growing; eager), they all read the same table and agree, exactly as a
per-step header exchange would, raising the same error on every rank if they
cannot. When only some ranks request, the others are not waiting for a table
and cannot learn of it without a host read; so the requesting ranks follow the
agreement the others still hold: they take part in every collective of the step
with placeholder rows of the agreed shapes (no rank ever blocks in a collective
the others do not enter), their request marks the step bad on the device, and
the step is refused on every rank. The one thing this cannot do is let one
rank's batch outgrow C alone: that needs every rank to learn of it on the host,
which only a per-step host read could give. A trainer whose batch sizes vary
reserves the capacity up front on every rank (``reserve_batch_capacity``).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist

from dcq_ops.algebra import reduce_rows
from dcq_ops.batch_guard import BATCH_EXCEEDS_QUEUE, DISAGREES, INPUT_REFUSED, QUEUE_OUT_OF_STEP
from dcq_ops.parallel.collectives import (CODE_DTYPES, DTYPE_NAMES, dtype_code, gather_padded, initialized,
                                          raise_collectively, world_size_and_rank)

MODES = ("auto", "none", "gathered", "sharded")


@dataclass
class Batch:
    """One step's checked input, and what the ranks agreed on.

    In a multi-rank steady-state step the other ranks' row counts are known on the
    device only (``counts``, ``total``); ``sizes`` holds them when the host knows them
    too (one process, or a step whose header table was read)."""

    embeddings: torch.Tensor
    labels: torch.Tensor          # int64 [n]
    class_weights: torch.Tensor   # detached
    sizes: list[int] | None = None  # rows of every rank, in rank order, when known on the host
    rank: int = 0
    world: int = 1
    capacity: int = 0             # the rows every rank's batch is padded to in the gathers
    counts: torch.Tensor | None = None  # int64 [world] on the device: every rank's rows
    compute_grad: bool = False    # some rank's embeddings require a gradient (agreed)
    training: bool = True         # the agreed training flag: which collectives the step runs
    bad_reasons: torch.Tensor | None = None   # int64 [1]: 0 iff the batch may be enqueued (every rank fine)
    rank_reasons: torch.Tensor | None = None  # int64 [world]: each rank's bit mask (BatchGuard.record)
    placeholder: bool = False     # this rank takes part in the collectives with no rows of its own
    error: BaseException | None = None        # why this rank's input was refused (raised by DCQLoss)
    gathered_labels: torch.Tensor | None = None  # [world * capacity], when the loss already gathered them

    @property
    def rows(self) -> int:
        return self.embeddings.shape[0]

    @property
    def total(self):
        """The rows of all ranks: an int when known on the host, else a device tensor."""
        if self.sizes is not None:
            return sum(self.sizes)
        return self.counts.sum()


class QueueStrategy:
    """How a DCQLoss's queue is shared between ranks (see the module docstring)."""

    mode = "none"
    # Whether the batch's values are checked on the device (no host sync) and reported
    # by BatchGuard at a later call (DCQLoss's validate="async").
    validates_on_device = True

    def __init__(self, queue, group=None):
        self.queue = queue
        self.group = group

    def exchange(self, embeddings, prepare, *, training: bool, reasons=None, eager: bool = False) -> Batch:
        raise NotImplementedError

    def loss_rows(self, batch: Batch, kernels) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, rows: torch.Tensor, batch: Batch, reduction: str) -> torch.Tensor:
        """As one process on the concatenated batch, given that DDP averages gradients over
        ranks: "mean" -> sum of local rows * W / N_total (the local mean for equal batch sizes).
        N_total stays on the device when the host does not know it."""
        if batch.world == 1:
            return reduce_rows(rows, reduction)
        if batch.sizes is not None and all(n == batch.sizes[0] for n in batch.sizes):
            return reduce_rows(rows, reduction)
        if reduction != "mean":
            return reduce_rows(rows, reduction)
        total = batch.total
        if isinstance(total, torch.Tensor):  # in the rows' dtype: fp64 rows keep fp64's precision
            return rows.sum() * (batch.world / total.to(rows.dtype))
        return rows.sum() * (batch.world / total)

    def enqueue(self, batch: Batch) -> None:
        raise NotImplementedError


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    return mode


def resolve_mode(mode: str, group=None) -> str:
    """"none", "gathered" or "sharded": what DCQLoss does now.

    "auto" is "gathered" under an initialised process group of more than one rank,
    else "none". "gathered" and "sharded" on a single rank are "none" (the same
    result, no communication).
    """
    mode = check_mode(mode)
    if mode == "none":
        return "none"
    if not initialized():
        if mode == "auto":
            return "none"
        raise ValueError(f"distributed={mode!r} needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun), got none; "
                         "use distributed='none' for a single process")
    if dist.get_world_size(group) == 1:
        return "none"
    return "gathered" if mode == "auto" else mode


# --------------------------------------------------------------------------- the header

HEADER_FIELDS = ("flags", "rows", "ptr", "reasons", "mode", "training", "dim", "queue_size", "queue_dtype",
                 "embeddings_dtype", "class_weights_dtype", "compute_grad", "eager", "capacity", "generation")
(FLAGS, ROWS, PTR, REASONS, MODE, TRAINING, DIM, QUEUE_SIZE, QUEUE_DTYPE, EMBEDDINGS_DTYPE, CLASS_WEIGHTS_DTYPE,
 COMPUTE_GRAD, EAGER, CAPACITY, GENERATION) = range(len(HEADER_FIELDS))
SIGNATURE = slice(MODE, EAGER + 1)  # what a rank agrees to once
REQUEST, REFUSED = 1, 2  # flags: this rank reads the table to (re)agree; this rank refused its own input


@dataclass
class Agreement:
    """What the ranks agreed on at the last host-read exchange (the same on every rank,
    but for ``signature``, which is this rank's own)."""

    signature: tuple   # this rank's signature when it agreed
    training: bool
    dim: int
    embeddings_dtype: int
    class_weights_dtype: int
    compute_grad: bool
    capacity: int
    generation: int


class RankState:
    """Host-side state of one queue's multi-rank protocol on this rank (not saved: it
    describes the running processes, and a fresh one simply agrees again)."""

    def __init__(self):
        self.agreement: Agreement | None = None
        self.capacities: dict[bool, int] = {}  # per training flag: capacities only grow
        self.reserved = 0
        self._header_key = None
        self._header = None

    def host_header(self, values: tuple, device) -> torch.Tensor:
        """The host-known part of the header on the device. Built once per distinct value
        (a steady state rebuilds it only when the local batch size changes), and copied
        from pinned memory without blocking: never a synchronising host-to-device copy."""
        if values != self._header_key:
            host = torch.tensor(values, dtype=torch.long)
            if device.type == "cuda":
                host = host.pin_memory().to(device, non_blocking=True)
            else:
                host = host.to(device)
            self._header_key, self._header = values, host
        return self._header


_STATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def rank_state(queue) -> RankState:
    """The protocol state of ``queue`` (a ClassQueue) on this rank."""
    state = _STATES.get(queue)
    if state is None:
        state = _STATES[queue] = RankState()
    return state


def reserve_batch_capacity(loss, rows: int) -> None:
    """Let every rank's batch grow to ``rows`` rows without a refused step.

    The multi-rank modes pad every rank's batch to a capacity agreed once (the largest
    batch of the first step), so that a step needs no host sync. A batch larger than
    that on one rank only cannot be absorbed without every rank reading the device
    (the step is refused on every rank instead). A trainer whose batch sizes vary
    calls this on every rank, before the first step or at the same step everywhere,
    with the largest batch any rank will pass.

    Parameters
    ----------
    loss : DCQLoss or ClassQueue
    rows : int
        The largest local batch (>= 1).
    """
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be an int >= 1, got {rows!r}")
    queue = getattr(loss, "queue", loss)
    rank_state(queue).reserved = rows


def _words(field: str, value: int) -> str:
    if field == "mode":
        return MODES[value]
    if field == "training":
        return ["eval", "train"][value]
    if field == "eager":
        return ["async/off", "eager"][value]
    if field == "compute_grad":
        return ["no gradient", "a gradient"][value]
    if field.endswith("dtype"):
        return DTYPE_NAMES.get(value, str(value))
    return str(value)


def _agreement_from_rows(rows: list[list[int]], followers: list[int]) -> Agreement:
    """The agreement the ranks that did not request still hold, read from their rows."""
    row = rows[followers[0]]
    return Agreement(signature=tuple(row[SIGNATURE]), training=bool(row[TRAINING]), dim=row[DIM],
                     embeddings_dtype=row[EMBEDDINGS_DTYPE], class_weights_dtype=row[CLASS_WEIGHTS_DTYPE],
                     compute_grad=any(rows[r][COMPUTE_GRAD] for r in followers), capacity=row[CAPACITY],
                     generation=row[GENERATION])


class HeaderExchangeQueue(QueueStrategy):
    """A multi-rank strategy whose step starts with the header all-gather (see the module
    docstring): agreement read on the host once, everything per step on the device."""

    validates_on_device = True

    def _what(self) -> str:
        return f"DCQLoss(distributed={self.mode!r})"

    def exchange(self, embeddings, prepare, *, training: bool, reasons=None, eager: bool = False) -> Batch:
        queue, group = self.queue, self.group
        world, rank = world_size_and_rank(group)
        device = queue.weights.device
        state = rank_state(queue)
        error = labels = class_weights = None
        try:
            labels, class_weights = prepare()
        except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks before they block
            error = exc
        ok = error is None
        rows = embeddings.shape[0] if ok else 0
        signature = (
            MODES.index(self.mode), int(training), embeddings.shape[1] if ok else 0, queue.queue_size,
            dtype_code(queue.weights), dtype_code(embeddings) if ok else 0, dtype_code(class_weights) if ok else 0,
            int(ok and embeddings.requires_grad and torch.is_grad_enabled()), int(eager),
        )
        agreement = state.agreement
        padded = training or self.mode == "sharded"  # the steps whose gathers are padded to the capacity
        wanted = max(rows, state.reserved)
        request = agreement is None or eager or (ok and (
            signature != agreement.signature or (padded and wanted > agreement.capacity)))
        flags = (REQUEST if request else 0) | (0 if ok else REFUSED)
        if request:
            capacity, generation = wanted, (-1 if agreement is None else agreement.generation)
        else:
            capacity, generation = agreement.capacity, agreement.generation
        host = state.host_header((flags, rows, 0, 0) + signature + (capacity, generation), device)
        if ok and reasons is not None:
            local_reasons = reasons(embeddings, labels, class_weights)
        else:
            local_reasons = host[REASONS:REASONS + 1]  # 0
        header = torch.cat([host[:PTR], queue.ptr.view(1), local_reasons.view(1), host[REASONS + 1:]])
        table = gather_padded(header.view(1, -1), 1, group, world).view(world, -1)

        sizes = None
        if request:
            rows_read = table.tolist()  # the one host read: this rank asked for an agreement
            requested = [bool(r[FLAGS] & REQUEST) for r in rows_read]
            if all(requested):
                agreement = self._agree(rows_read, error, signature, training, state, world, device)
                sizes = [r[ROWS] for r in rows_read]
            else:
                followers = [r for r, asked in enumerate(requested) if not asked]
                follow = agreement if agreement is not None else _agreement_from_rows(rows_read, followers)
                if error is None:
                    error = self._refusal(rank, signature, wanted, padded, follow, followers)
                agreement = follow
                ok = False
        # A refused input (or an unanswered request): take part with placeholder rows, as agreed.
        placeholder = not ok
        if placeholder:
            dim = agreement.dim or queue.dim
            embeddings = torch.zeros(0, dim, dtype=CODE_DTYPES.get(agreement.embeddings_dtype, queue.weights.dtype),
                                     device=device)
            class_weights = torch.zeros(0, dim, dtype=CODE_DTYPES.get(agreement.class_weights_dtype,
                                                                      queue.weights.dtype), device=device)
            labels = torch.zeros(0, dtype=torch.long, device=device)
        rank_reasons = self._rank_reasons(table, agreement.training, renegotiated=sizes is not None)
        return Batch(embeddings, labels, class_weights, sizes=sizes, rank=rank, world=world,
                     capacity=agreement.capacity, counts=table[:, ROWS], compute_grad=agreement.compute_grad,
                     training=agreement.training, bad_reasons=rank_reasons.amax().view(1), rank_reasons=rank_reasons,
                     placeholder=placeholder, error=error)

    def _rank_reasons(self, table: torch.Tensor, training: bool, *, renegotiated: bool) -> torch.Tensor:
        """Each rank's bit mask of reasons, from the gathered header, on the device."""
        flags = table[:, FLAGS]
        out = table[:, REASONS] | ((flags & REFUSED) != 0).long() * INPUT_REFUSED
        if not renegotiated:  # a request nobody else answered; or an agreement of another generation
            out = out | (((flags & REQUEST) != 0) | (table[:, GENERATION] != table[0, GENERATION])).long() * DISAGREES
        out = out | (table[:, PTR] != table[0, PTR]).long() * QUEUE_OUT_OF_STEP
        if training:
            out = out | (table[:, ROWS].sum() > self.queue.queue_size).long().expand_as(out) * BATCH_EXCEEDS_QUEUE
        return out

    def _agree(self, rows, error, signature, training, state: RankState, world: int, device) -> Agreement:
        """Every rank requested: the same table on every rank, the same decision on every
        rank. Raises on every rank if they cannot agree (nothing was enqueued)."""
        what = self._what()
        state.agreement = None  # until they agree
        statuses = [r[FLAGS] & REFUSED for r in rows]
        if any(statuses):
            raise_collectively(error, statuses, what, self.group, world, device,
                               note=" (nothing was enqueued, no queue changed)")
        columns = {name: [row[i] for row in rows] for i, name in enumerate(HEADER_FIELDS)}

        def agree(name, explain):
            values = columns[name]
            if any(v != values[0] for v in values):
                raise ValueError(f"{what}: every rank must have the same {explain}, got "
                                 f"{[_words(name, v) for v in values]} on ranks 0..{world - 1}")

        agree("mode", "distributed mode")
        agree("training", "training mode (call .train() or .eval() on every rank)")
        agree("eager", "validate setting (validate='eager' on every rank or on none)")
        agree("dim", "embedding size")
        agree("queue_size", "(global) queue size")
        agree("ptr", "queue pointer - the ranks' queues are out of sync (load the same queue state on every rank)")
        agree("queue_dtype", "queue dtype")
        if training:
            agree("class_weights_dtype", "class_weights dtype (they are all-gathered)")
        if self.mode == "sharded":
            agree("embeddings_dtype", "embeddings dtype (they are all-gathered)")
        sizes = columns["rows"]
        if training and sum(sizes) > self.queue.queue_size:
            raise ValueError(f"{what}: the gathered batch (batch sizes {sizes} on ranks 0..{world - 1}, "
                             f"{sum(sizes)} in all) must fit the queue of {self.queue.queue_size} slots")
        capacity = max(max(columns["capacity"]), state.capacities.get(bool(training), 0), 1)
        state.capacities[bool(training)] = capacity
        state.agreement = Agreement(
            signature=signature, training=bool(training), dim=columns["dim"][0],
            embeddings_dtype=columns["embeddings_dtype"][0], class_weights_dtype=columns["class_weights_dtype"][0],
            compute_grad=any(columns["compute_grad"]), capacity=capacity,
            generation=max(columns["generation"]) + 1)
        return state.agreement

    def _refusal(self, rank, signature, wanted, padded, follow: Agreement, followers) -> ValueError:
        """Why this rank's request could not be agreed (the others did not ask)."""
        changes = [f"its {name} is {_words(name, mine)} where the ranks agreed on {_words(name, agreed)}"
                   for name, mine, agreed in zip(HEADER_FIELDS[SIGNATURE], signature, follow.signature)
                   if mine != agreed]
        if padded and wanted > follow.capacity and not changes:
            changes.append(
                f"its batch of {wanted} rows exceeds the capacity of {follow.capacity} rows per rank that the "
                "ranks agreed on (the largest batch of the first step), while the other ranks' batches did not "
                "grow with it - a step needs no host sync because the ranks agree on the capacity once; if batch "
                "sizes vary, call dcq_ops.parallel.reserve_batch_capacity(loss, largest_batch) on every rank "
                "before the first step")
        if not changes:
            changes.append("it has no agreement with the other ranks (a new DCQLoss on this rank only?)")
        return ValueError(f"{self._what()}: rank {rank}: " + "; ".join(changes)
                          + f". Ranks {followers} did not change, so this step was refused on every rank "
                            "(nothing was enqueued)")
