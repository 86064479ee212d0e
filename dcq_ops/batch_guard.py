"""The checks of DCQLoss's training batches that read tensor values (label
range, finiteness, a degenerate queue), without making the host wait.

With ``validate="async"`` (the default) every check runs on the device:

- ``reasons(...)`` computes a bit mask of what is wrong with the batch (0 when
  nothing is), as a one-element device tensor;
- the enqueue is guarded by it (ClassQueue.enqueue's ``guard``): a bad batch
  never enters the queue;
- ``record(...)`` keeps the first bad step and its reasons in a small device
  buffer and, on a GPU, starts copying it to pinned host memory behind an event;
- ``check()``, at the start of the next call, reads that copy once the event
  has passed (the GPU keeps working on what was queued after it) and raises
  ``ValueError`` naming the step and the reason.

So the error reaches the user at the latest at the next call, and nothing is
lost in between. Under torch.compile the host reads are skipped (they would
break the graph): the status waits on the device until an eager call or an
explicit ``DCQLoss.check()``.

``validate="eager"`` (and every multi-rank mode, whose header exchange syncs
anyway) reads the label range and finiteness on the host at once
(``check_values_now``, one host sync per step) and raises before anything is
enqueued; inside a torch.compile graph it asserts asynchronously instead
(RuntimeError; on CUDA a device-side assert).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

NEGATIVE_LABEL, LABEL_TOO_LARGE, BAD_EMBEDDINGS, BAD_CLASS_WEIGHTS, ZERO_CLASS_WEIGHTS = 1, 2, 4, 8, 16


def zero_rows(class_weights: torch.Tensor) -> torch.Tensor:
    """Which rows are zero vectors [N] bool: they have no direction, so they would enter the
    queue as zero rows (a "class weight" similar to nothing), which no generator produces."""
    return class_weights.abs().amax(dim=1) == 0


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
        words.append("a class_weights row of zeros (class weights must be nonzero: they are normalised)")
    return "; ".join(words)


class BatchGuard(nn.Module):
    """Device-side validation state of a DCQLoss (see the module docstring).
    Its buffers are not part of the state dict: they describe this run only."""

    def __init__(self, num_classes: int | None, device=None):
        super().__init__()
        self.num_classes = num_classes
        # Training calls so far, and [first bad step, its reasons, first degenerate step] (-1: none).
        self.register_buffer("calls", torch.zeros(1, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("status", torch.tensor([-1, 0, -1], dtype=torch.long, device=device), persistent=False)
        self._pending = None  # (pinned host copy of status, CUDA event) of the last recorded step
        self._warned_degenerate = False

    def reasons(self, embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """The bit mask of what is wrong with the batch, as an int64 [1] device tensor."""
        mask = (labels < 0).any().long() * NEGATIVE_LABEL
        if self.num_classes is not None:
            mask = mask + (labels >= self.num_classes).any().long() * LABEL_TOO_LARGE
        mask = mask + (~torch.isfinite(embeddings)).any().long() * BAD_EMBEDDINGS
        mask = mask + (~torch.isfinite(class_weights)).any().long() * BAD_CLASS_WEIGHTS
        mask = mask + zero_rows(class_weights).any().long() * ZERO_CLASS_WEIGHTS
        return mask.view(1)

    @staticmethod
    def degenerate(labels: torch.Tensor, queue_labels: torch.Tensor) -> torch.Tensor:
        """Whether the queue is full and every entry of it is excluded for every row
        (one class everywhere): the loss is then exactly 0, every step."""
        return (queue_labels >= 0).all() & (queue_labels == labels[0]).all() & (labels == labels[0]).all()

    def record(self, reasons: torch.Tensor, degenerate: torch.Tensor) -> None:
        """Keep the first bad step and the first degenerate step (device ops only)."""
        step = self.calls + 1  # steps are counted from 1
        bad = (reasons != 0) & (self.status[0:1] < 0)
        first_degenerate = degenerate.view(1) & (self.status[2:3] < 0)
        self.status.copy_(torch.cat([torch.where(bad, step, self.status[0:1]),
                                     torch.where(bad, reasons, self.status[1:2]),
                                     torch.where(first_degenerate, step, self.status[2:3])]))
        self.calls.add_(1)
        if self.status.is_cuda and not torch.compiler.is_compiling():
            host = torch.empty(3, dtype=torch.long, pin_memory=True)
            host.copy_(self.status, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event)

    def check(self, now: bool = False) -> None:
        """Raise for a recorded bad batch, warn once for a degenerate queue; a no-op
        under torch.compile. On a GPU it waits only for the event of the last step
        recorded outside torch.compile, never for the whole stream; ``now`` reads the
        status itself instead (one sync), which also sees steps recorded inside
        compiled graphs (they copy nothing to the host)."""
        if torch.compiler.is_compiling():
            return
        if self.status.is_cuda and not now:
            if self._pending is None:
                return
            host, event = self._pending
            event.synchronize()
            self._pending = None
            first_bad, reasons, degenerate_step = host.tolist()
        else:
            self._pending = None
            first_bad, reasons, degenerate_step = self.status.tolist()
        if degenerate_step >= 0 and not self._warned_degenerate:
            self._warned_degenerate = True
            warnings.warn(
                f"DCQLoss: at step {degenerate_step} the queue was full and every entry of it had the label of "
                "every row (a single class in the batch and the queue), so every queue entry was excluded and the "
                "loss was exactly 0: nothing is learned. Is every sample labelled the same (e.g. a synthetic data "
                "set with constant labels)?", RuntimeWarning, stacklevel=3)
        if first_bad >= 0:
            self.status[0].fill_(-1)  # reported once (device fills: no host-to-device copy)
            self.status[1].fill_(0)
            raise ValueError(
                f"DCQLoss: the training batch of step {first_bad} had {describe(reasons, self.num_classes)}. "
                "It was not enqueued: the queue is as it was before that step. (validate='async' reports a bad "
                "batch at the next call; validate='eager' raises at once, at the cost of one host sync per step.)")


def check_values_now(embeddings, labels, class_weights, num_classes: int | None) -> None:
    """validate="eager": label range and finiteness read on the host at once (one sync).
    Inside a torch.compile graph, asynchronous asserts instead (no graph break)."""
    if torch.compiler.is_compiling():
        _assert_values(embeddings, labels, class_weights, num_classes)
        return
    low, high, bad_embeddings, bad_weights, zero_weights = torch.stack([
        labels.min(), labels.max(), (~torch.isfinite(embeddings)).sum(), (~torch.isfinite(class_weights)).sum(),
        zero_rows(class_weights).sum(),
    ]).tolist()
    if low < 0:
        raise ValueError(f"labels must be >= 0, got a label of {low}")
    if num_classes is not None and high >= num_classes:
        raise ValueError(f"labels must be < num_classes = {num_classes}, got a label of {high}")
    if bad_embeddings:
        raise ValueError(f"embeddings must be finite, got {bad_embeddings} NaN or infinite values")
    if bad_weights:
        raise ValueError(f"class_weights must be finite, got {bad_weights} NaN or infinite values")
    if zero_weights:
        raise ValueError(f"class_weights rows must be nonzero (they are normalised), got {zero_weights} rows of zeros")


def _assert_values(embeddings, labels, class_weights, num_classes: int | None) -> None:
    """The checks of check_values_now as asynchronous asserts: RuntimeError with these
    messages (on CUDA, a device-side assert), before anything is enqueued."""
    torch._assert_async((labels >= 0).all(), "labels must be >= 0, got a negative label")
    if num_classes is not None:
        torch._assert_async((labels < num_classes).all(),
                            f"labels must be < num_classes = {num_classes}, got a larger label")
    torch._assert_async(torch.isfinite(embeddings).all(), "embeddings must be finite, got NaN or infinite values")
    torch._assert_async(torch.isfinite(class_weights).all(), "class_weights must be finite, got NaN or infinite values")
    torch._assert_async(~zero_rows(class_weights).any(), "class_weights rows must be nonzero, got a row of zeros")
