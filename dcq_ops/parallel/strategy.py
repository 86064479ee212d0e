"""The interface every queue strategy of DCQLoss implements, the modes that
choose one, and the header exchange of the multi-rank strategies.

A strategy owns how the queue is shared between ranks. DCQLoss calls every
strategy the same way, once per step:

    batch = strategy.exchange(embeddings, prepare, training=...)  # check, and agree
    rows  = strategy.loss_rows(batch, kernels)         # loss of this rank's rows
    loss  = strategy.reduce(rows, batch, reduction)
    strategy.enqueue(batch)                            # training only

``prepare`` is DCQLoss's local check of the step's input: it returns the labels
(int64 [n]) and the detached class weights, or raises. A multi-rank strategy
runs it inside the header exchange, so that a bad input on one rank makes every
rank raise instead of hang. ``kernels`` (dcq_ops.loss_kernels.LossKernels) computes
the loss against a queue or a slice of one. ``validates_on_device`` says whether the
strategy leaves a batch's value checks to the device (DCQLoss's validate="async") or
checks them on the host in its exchange.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from dcq_ops.algebra import reduce_rows
from dcq_ops.parallel.collectives import (DTYPE_NAMES, dtype_code, gather_padded, initialized,
                                          raise_collectively, world_size_and_rank)

MODES = ("auto", "none", "gathered", "sharded")


@dataclass
class Batch:
    """One step's checked input, and what the ranks agreed on."""

    embeddings: torch.Tensor
    labels: torch.Tensor          # int64 [n]
    class_weights: torch.Tensor   # detached
    sizes: list[int] = field(default_factory=list)  # rows of every rank, in rank order
    rank: int = 0
    ptr: int | None = None        # the global queue pointer, when the exchange read it
    compute_grad: bool = False    # some rank's embeddings require a gradient
    bad_reasons: torch.Tensor | None = None  # device-side bit mask of what is wrong (0: enqueue it), or None

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def even(self) -> bool:
        return all(n == self.sizes[0] for n in self.sizes)


class QueueStrategy:
    """How a DCQLoss's queue is shared between ranks (see the module docstring)."""

    mode = "none"
    # Whether the batch's values may be checked on the device (no host sync): a
    # multi-rank exchange reads a header on the host anyway, and checks them there.
    validates_on_device = True

    def __init__(self, queue, group=None):
        self.queue = queue
        self.group = group

    def exchange(self, embeddings, prepare, *, training: bool) -> Batch:
        raise NotImplementedError

    def loss_rows(self, batch: Batch, kernels) -> torch.Tensor:
        raise NotImplementedError

    def reduce(self, rows: torch.Tensor, batch: Batch, reduction: str) -> torch.Tensor:
        """As one process on the concatenated batch, given that DDP averages gradients over
        ranks: "mean" -> sum of local rows * W / N_total (the local mean for equal batch sizes)."""
        uneven = batch.world > 1 and not batch.even
        return reduce_rows(rows, reduction, mean_factor=batch.world / batch.total if uneven else None)

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


_FIELDS = ("status", "mode", "training", "rows", "dim", "queue_size", "ptr", "compute_grad",
           "embeddings_dtype", "class_weights_dtype", "queue_dtype")


def exchange_header(prepare, embeddings, *, queue, queue_size: int, mode: str, training: bool, group) -> Batch:
    """Check locally, exchange one small header with every rank, and agree (one host sync).

    Returns the Batch, or raises on every rank: the bad rank its own error, the
    others a DistributedInputError; no queue is touched either way."""
    world, rank = world_size_and_rank(group)
    device = queue.weights.device
    error = labels = class_weights = None
    try:
        labels, class_weights = prepare()
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks before they block
        error = exc
    ok = error is None
    header = torch.tensor([
        0 if ok else 1,
        MODES.index(mode),
        int(training),
        embeddings.shape[0] if ok else 0,
        embeddings.shape[1] if ok else 0,
        queue_size,
        0,  # ptr, copied from the device below (no extra sync: the header is read once)
        int(ok and embeddings.requires_grad and torch.is_grad_enabled()),
        dtype_code(embeddings),
        dtype_code(class_weights),
        dtype_code(queue.weights),
    ], dtype=torch.long, device=device)
    header[6:7].copy_(queue.ptr.view(1))
    table = gather_padded(header.view(1, -1), 1, group, world).view(world, -1).tolist()
    columns = {name: [row[i] for row in table] for i, name in enumerate(_FIELDS)}
    what = f"DCQLoss(distributed={mode!r})"
    if any(columns["status"]):
        raise_collectively(error, columns["status"], what, group, world, device,
                           note=" (nothing was enqueued, no queue changed)")

    def agree(name, explain, show=lambda v: v):
        values = columns[name]
        if any(v != values[0] for v in values):
            raise ValueError(f"{what}: every rank must have the same {explain}, got "
                             f"{[show(v) for v in values]} on ranks 0..{world - 1}")

    agree("mode", "distributed mode", lambda v: MODES[v])
    agree("training", "training mode (call .train() or .eval() on every rank)", lambda v: ["eval", "train"][v])
    agree("dim", "embedding size")
    agree("queue_size", "(global) queue size")
    agree("ptr", "queue pointer - the ranks' queues are out of sync (load the same queue state on every rank)")
    agree("queue_dtype", "queue dtype", DTYPE_NAMES.get)
    if training:
        agree("class_weights_dtype", "class_weights dtype (they are all-gathered)", DTYPE_NAMES.get)
    if mode == "sharded":
        agree("embeddings_dtype", "embeddings dtype (they are all-gathered)", DTYPE_NAMES.get)
    sizes = columns["rows"]
    if training and sum(sizes) > queue_size:
        raise ValueError(f"{what}: the gathered batch (batch sizes {sizes} on ranks 0..{world - 1}, "
                         f"{sum(sizes)} in all) must fit the queue of {queue_size} slots")
    return Batch(embeddings, labels, class_weights, sizes=sizes, rank=rank, ptr=columns["ptr"][0],
                 compute_grad=any(columns["compute_grad"]))


class HeaderExchangeQueue(QueueStrategy):
    """A multi-rank strategy whose step starts with the header exchange (exchange_header):
    every rank checks its input, and the ranks agree, before anything runs."""

    validates_on_device = False  # the header exchange reads the host every step: values are checked there

    def exchange(self, embeddings, prepare, *, training: bool) -> Batch:
        return exchange_header(prepare, embeddings, queue=self.queue, queue_size=self.queue.queue_size,
                               mode=self.mode, training=training, group=self.group)
