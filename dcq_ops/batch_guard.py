"""The checks of DCQLoss's training batches that read tensor values (label
range, finiteness, a degenerate queue), without making the host wait.

With ``validate="async"`` (the default) every check runs on the device:

- ``reasons(...)`` computes a bit mask of what is wrong with the batch (0 when
  nothing is), as a one-element device tensor; a multi-rank step gathers every
  rank's mask and adds the reasons of the ranks' agreement
  (dcq_ops.parallel.strategy), one mask per rank;
- the enqueue is guarded by them (ClassQueue.enqueue's ``bad_reasons``): a bad
  batch never enters the queue (in a multi-rank step, no rank's queue);
- ``record(...)`` keeps the first bad step, the first bad rank and its reasons
  in a small device buffer and starts copying it to host memory (pinned, behind
  a CUDA event, on a GPU);
- ``check()``, at the start of a later call, reads the copies that have arrived
  (``event.query()``: it never waits) and raises ``ValueError`` naming the step,
  the rank and the reason. A copy that has not arrived is read at a later call:
  the status is cumulative, so a newer copy tells everything an older one did.

So the error reaches the user a call or a few calls later, and nothing is lost
in between: the bad batch and any later bad batch are kept out of the queue.
Under torch.compile the host reads are skipped (they would break the graph):
the status waits on the device until an eager call or an explicit
``DCQLoss.check()``.

Several ranks must raise at the *same* call: a rank that raises while another
goes on would leave the other blocked in the next collective (or in DDP's
gradient all-reduce). So under a multi-rank strategy ``check(wait=True)`` reads
the copy of the previous step at the next call, waiting for its event if the
device has not reached it yet: the host never runs more than one step ahead of
the device (the copy was issued at the end of the previous step's loss, so this
is normally no wait at all). Every rank holds the same status (it is computed
from the gathered masks), so every rank raises at the same call.

``validate="eager"`` reads the label range and finiteness on the host at once
(``check_values_now``, one host sync per step) and raises before anything is
enqueued; inside a torch.compile graph it asserts asynchronously instead
(RuntimeError; on CUDA a device-side assert).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

NEGATIVE_LABEL, LABEL_TOO_LARGE, BAD_EMBEDDINGS, BAD_CLASS_WEIGHTS, ZERO_CLASS_WEIGHTS = 1, 2, 4, 8, 16
# Reasons of a multi-rank step (dcq_ops.parallel.strategy): a rank refused its own input;
# a rank no longer matched the ranks' agreement; queue pointers differ; the ranks' batches
# together exceed the queue.
INPUT_REFUSED, DISAGREES, QUEUE_OUT_OF_STEP, BATCH_EXCEEDS_QUEUE = 32, 64, 128, 256

# status: [first bad step, its first bad rank's reasons, first degenerate step, first bad rank,
#          bad ranks in that step, refused steps so far]
_FIRST_BAD, _REASONS, _DEGENERATE, _BAD_RANK, _BAD_RANKS, _REFUSED = range(6)
_MAX_PENDING = 32


# The normalisation's epsilon (F.normalize's; docs/loss.md, "Any magnitude"): a row is
# divided by max(||row||, MIN_ROW_NORM), so only a row at least this long becomes a unit row.
MIN_ROW_NORM = 1e-12


def row_norms(rows: torch.Tensor) -> torch.Tensor:
    """The norms [N] float64 that the enqueue divides by: of the rows rounded to float32 (what
    the enqueue kernels read), summed in float64, where no float32 square over- or underflows."""
    return torch.linalg.vector_norm(rows.float(), dim=1, dtype=torch.float64)


def holdable_rows(rows: torch.Tensor) -> torch.Tensor:
    """Which rows [N] bool the queue can hold: those that normalisation turns into unit rows,
    i.e. whose norm (:func:`row_norms`) is finite and at least ``MIN_ROW_NORM``.

    This is the one rule of the batch check and the state check
    (:func:`dcq_ops.queue.check_queue_state`): a zero row has no direction; a row shorter
    than ``MIN_ROW_NORM`` would enter the queue shorter than 1 (the loss's normalisation
    divides it by ``MIN_ROW_NORM``, not by its norm), and a row past float32's range as
    NaN; a checkpoint of either would not load. Device ops only (no host sync)."""
    norms = row_norms(rows)
    return (norms >= MIN_ROW_NORM) & torch.isfinite(norms)


def describe(reasons: int, num_classes: int | None) -> str:
    """The words for a bit mask of reasons."""
    words = []
    if reasons & NEGATIVE_LABEL:
        words.append("a label < 0 (labels must be >= 0)")
    if reasons & LABEL_TOO_LARGE:
        words.append(f"a label >= num_classes = {num_classes} (labels must be < num_classes)")
    if reasons & BAD_EMBEDDINGS:
        words.append("NaN or infinite values in embeddings (embeddings must be finite)")
    if reasons & BAD_CLASS_WEIGHTS:
        words.append("NaN or infinite values in class_weights (class_weights must be finite)")
    if reasons & ZERO_CLASS_WEIGHTS:
        words.append(f"a class_weights row of zeros, or of a norm below {MIN_ROW_NORM:g} or past float32's range "
                     "(class weights must be nonzero and normalisable: the queue holds unit rows)")
    if reasons & INPUT_REFUSED:
        words.append("an input that rank refused (its shape, dtype or device failed that rank's checks; "
                     "that rank's report names the error)")
    if reasons & DISAGREES:
        words.append("settings or a batch size that no longer matched what the ranks had agreed on "
                     "(that rank's report says which)")
    if reasons & QUEUE_OUT_OF_STEP:
        words.append("a queue pointer different from rank 0's: the ranks' queues are out of step (load the "
                     "same queue state on every rank)")
    if reasons & BATCH_EXCEEDS_QUEUE:
        words.append("more rows in the batch of all ranks together than the queue has slots (the gathered "
                     "batch must fit the queue)")
    return "; ".join(words)


def host_copy(t: torch.Tensor) -> torch.Tensor:
    """Mark ``t`` as a host copy that reading never waits for a device (the guard reads
    it only once its event has passed). Tests of "no host sync" let these through."""
    t._dcq_host_copy = True
    return t


class BatchGuard(nn.Module):
    """Device-side validation state of a DCQLoss (see the module docstring).
    Its buffers are not part of the state dict: they describe this run only."""

    def __init__(self, num_classes: int | None, device=None):
        super().__init__()
        self.num_classes = num_classes
        # Training calls so far, and the status (see _FIRST_BAD...; -1: none).
        self.register_buffer("calls", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("status", torch.tensor([-1, 0, -1, -1, 0, 0], dtype=torch.long, device=device),
                             persistent=False)
        self._pending = []  # (host copy of status, event or None) of recorded steps, oldest first
        self._notes = {}    # host step -> this rank's own words about it (a refused input)
        self._host_calls = 0
        self._world = 1
        self._warned_degenerate = False

    def reasons(self, embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """The bit mask of what is wrong with the batch, as an int64 [1] device tensor."""
        mask = (labels < 0).any().long() * NEGATIVE_LABEL
        if self.num_classes is not None:
            mask = mask + (labels >= self.num_classes).any().long() * LABEL_TOO_LARGE
        mask = mask + (~torch.isfinite(embeddings)).any().long() * BAD_EMBEDDINGS
        finite = torch.isfinite(class_weights).all(dim=1)
        mask = mask + (~finite).any().long() * BAD_CLASS_WEIGHTS
        mask = mask + (finite & ~holdable_rows(class_weights)).any().long() * ZERO_CLASS_WEIGHTS
        return mask.view(1)

    @staticmethod
    def degenerate(labels: torch.Tensor, queue_labels: torch.Tensor) -> torch.Tensor:
        """Whether the queue is full and every entry of it is excluded for every row
        (one class everywhere): the loss is then exactly 0, every step."""
        if labels.shape[0] == 0:
            return torch.zeros((), dtype=torch.bool, device=labels.device)
        return (queue_labels >= 0).all() & (queue_labels == labels[0]).all() & (labels == labels[0]).all()

    def record(self, reasons: torch.Tensor, degenerate: torch.Tensor, note: str | None = None) -> None:
        """Keep the first bad step and the first degenerate step (device ops only).

        Parameters
        ----------
        reasons : torch.Tensor
            int64 [1] (one process) or [world]: each rank's bit mask of this step.
        degenerate : torch.Tensor
            bool: BatchGuard.degenerate of this step.
        note : str, optional
            What this rank itself knows about the step (the error of an input it refused),
            added to the report.
        """
        step = self.calls + 1  # steps are counted from 1
        nonzero = reasons.view(-1) != 0
        any_bad = nonzero.any().view(1)
        first_rank = torch.argmax(nonzero.long()).view(1)  # the first bad rank (0 if none)
        bad = any_bad & (self.status[_FIRST_BAD:_FIRST_BAD + 1] < 0)
        first_degenerate = degenerate.view(1) & (self.status[_DEGENERATE:_DEGENERATE + 1] < 0)
        s = self.status
        self.status.copy_(torch.cat([
            torch.where(bad, step, s[_FIRST_BAD:_FIRST_BAD + 1]),
            torch.where(bad, reasons.view(-1).gather(0, first_rank), s[_REASONS:_REASONS + 1]),
            torch.where(first_degenerate, step, s[_DEGENERATE:_DEGENERATE + 1]),
            torch.where(bad, first_rank, s[_BAD_RANK:_BAD_RANK + 1]),
            torch.where(bad, nonzero.sum().view(1), s[_BAD_RANKS:_BAD_RANKS + 1]),
            s[_REFUSED:_REFUSED + 1] + any_bad.long(),
        ]))
        self.calls.add_(1)
        if torch.compiler.is_compiling():
            return
        self._world = reasons.numel()
        self._host_calls += 1
        if note is not None:
            self._notes[self._host_calls] = note
        snapshot = self._snapshot()
        if len(self._pending) >= _MAX_PENDING:
            self._pending[-1] = snapshot  # the newest copy supersedes the newest unread one
        else:
            self._pending.append(snapshot)

    def _snapshot(self):
        """A host copy of the status and the event after which it may be read (None: at once)."""
        if self.status.is_cuda:
            host = torch.empty(self.status.shape, dtype=torch.long, pin_memory=True)
            host.copy_(self.status, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return host_copy(host), event
        return host_copy(self.status.clone()), None

    def check(self, now: bool = False, wait: bool = False) -> None:
        """Raise for a recorded bad batch, warn once for a degenerate queue; a no-op
        under torch.compile.

        By default it never waits: it reads the newest status copy whose event has passed
        (``event.query()``) and leaves the others for a later call. ``wait`` reads the
        copy of the last recorded step, waiting for its event if needed (what several
        ranks need to raise at the same call; ``pending_report``). ``now`` reads the
        status itself (one sync), which also sees steps recorded inside compiled graphs
        (they copy nothing to the host)."""
        if torch.compiler.is_compiling():
            return
        values = None
        if now:
            self._pending.clear()
            values = self.status.tolist()
        elif wait:
            if self._pending:
                host, event = self._pending[-1]
                if event is not None:
                    event.synchronize()
                self._pending.clear()
                values = host.tolist()
        else:
            while self._pending and (self._pending[0][1] is None or self._pending[0][1].query()):
                values = self._pending.pop(0)[0].tolist()
        if values is not None:
            self._report(values)

    def _report(self, values: list[int]) -> None:
        first_bad, reasons, degenerate_step, bad_rank, bad_ranks, refused = values
        if degenerate_step >= 0 and not self._warned_degenerate:
            self._warned_degenerate = True
            warnings.warn(
                f"DCQLoss: at step {degenerate_step} the queue was full and every entry of it had the label of "
                "every row (a single class in the batch and the queue), so every queue entry was excluded and the "
                "loss was exactly 0: nothing is learned. Is every sample labelled the same (e.g. a synthetic data "
                "set with constant labels)?", RuntimeWarning, stacklevel=3)
        if first_bad < 0:
            return
        # Reported once (device fills: no host-to-device copy). Copies taken before this
        # reset would report the same step again: drop them.
        for field, value in ((_FIRST_BAD, -1), (_REASONS, 0), (_BAD_RANK, -1), (_BAD_RANKS, 0)):
            self.status[field].fill_(value)
        self._pending.clear()
        note = self._notes.get(first_bad)
        self._notes.clear()
        where = ""
        if self._world > 1:
            others = f" (and {bad_ranks - 1} more rank(s))" if bad_ranks > 1 else ""
            where = f" on rank {bad_rank}{others} of {self._world}"
        tail = f" {refused} training step(s) refused so far." if refused > 1 else ""
        queues = "any rank's queue: every queue" if self._world > 1 else "the queue: the queue"
        raise ValueError(
            f"DCQLoss: the training batch of step {first_bad}{where} had {describe(reasons, self.num_classes)}. "
            f"It was not enqueued into {queues} is as it was before that step.{tail}"
            + (f" This rank: {note}." if note else "")
            + " (validate='async' reports a bad batch at a later call; validate='eager' raises at once, at the "
              "cost of one host sync per step.)")


def check_values_now(embeddings, labels, class_weights, num_classes: int | None) -> None:
    """validate="eager": label range and finiteness read on the host at once (one sync).
    Inside a torch.compile graph, asynchronous asserts instead (no graph break)."""
    if torch.compiler.is_compiling():
        _assert_values(embeddings, labels, class_weights, num_classes)
        return
    finite_rows = torch.isfinite(class_weights).all(dim=1)
    low, high, bad_embeddings, bad_weights, short_rows = torch.stack([
        labels.min(), labels.max(), (~torch.isfinite(embeddings)).sum(), (~torch.isfinite(class_weights)).sum(),
        (finite_rows & ~holdable_rows(class_weights)).sum(),
    ]).tolist()
    if low < 0:
        raise ValueError(f"labels must be >= 0, got a label of {low}")
    if num_classes is not None and high >= num_classes:
        raise ValueError(f"labels must be < num_classes = {num_classes}, got a label of {high}")
    if bad_embeddings:
        raise ValueError(f"embeddings must be finite, got {bad_embeddings} NaN or infinite values")
    if bad_weights:
        raise ValueError(f"class_weights must be finite, got {bad_weights} NaN or infinite values")
    if short_rows:
        raise ValueError(f"class_weights rows must be nonzero and normalisable (a norm of at least {MIN_ROW_NORM:g} "
                         f"and within float32's range: the queue holds unit rows), got {short_rows} row(s) of zeros "
                         "or of a norm outside that range")


def _assert_values(embeddings, labels, class_weights, num_classes: int | None) -> None:
    """The checks of check_values_now as asynchronous asserts: RuntimeError with these
    messages (on CUDA, a device-side assert), before anything is enqueued."""
    torch._assert_async((labels >= 0).all(), "labels must be >= 0, got a negative label")
    if num_classes is not None:
        torch._assert_async((labels < num_classes).all(),
                            f"labels must be < num_classes = {num_classes}, got a larger label")
    torch._assert_async(torch.isfinite(embeddings).all(), "embeddings must be finite, got NaN or infinite values")
    torch._assert_async(torch.isfinite(class_weights).all(), "class_weights must be finite, got NaN or infinite values")
    torch._assert_async(holdable_rows(class_weights).all(),
                        f"class_weights rows must be nonzero and normalisable (norm >= {MIN_ROW_NORM:g}, within "
                        "float32's range), got a row of zeros or of a norm outside that range")
