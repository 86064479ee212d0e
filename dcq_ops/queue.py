"""ClassQueue: the FIFO of the most recent class weights and their labels."""

from __future__ import annotations

import torch
from torch import nn

from dcq_ops.ops.queue import queue_enqueue_

_QUEUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 the norm of an enqueued row may be: the rounding of a row normalised
    in fp32 to the queue's dtype moves its norm by at most half an ulp of the dtype
    (relative), plus the fp32 normalisation's own error; 4 ulp leaves a margin."""
    return 4 * torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps


@torch.no_grad()
def check_queue_state(weights: torch.Tensor, labels: torch.Tensor, ptr: torch.Tensor, *, ptr_limit: int,
                      num_classes: int | None = None, what: str = "queue state") -> None:
    """The values a queue may hold (one host sync: for loading, never in a step): finite
    weights, unit rows in every filled slot (label >= 0), labels in [-1, num_classes)
    (-1 = empty), and a write pointer in [0, ptr_limit). Raises ValueError naming the
    first offence."""
    if weights.numel() and not bool(torch.isfinite(weights).all()):
        bad = int((~torch.isfinite(weights)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{what}: weights must be finite, got NaN or infinite values in slot {bad}")
    if labels.numel():
        low = int(labels.min())
        if low < -1:
            raise ValueError(f"{what}: labels must be >= -1 (-1 marks an empty slot), got {low}")
        high = int(labels.max())
        if num_classes is not None and high >= num_classes:
            raise ValueError(f"{what}: labels must be < num_classes = {num_classes}, got {high}")
        filled = labels >= 0
        if bool(filled.any()):
            norms = torch.linalg.vector_norm(weights[filled].double(), dim=1)
            error = (norms - 1).abs()
            tolerance = unit_norm_tolerance(weights.dtype)
            worst = int(error.argmax())
            if float(error[worst]) > tolerance:
                slot = int(filled.nonzero()[worst, 0])
                raise ValueError(f"{what}: every filled slot (label >= 0) must hold a unit-norm row (within "
                                 f"{tolerance:.2g} for {weights.dtype}), got norm {float(norms[worst]):.6g} "
                                 f"in slot {slot}")
    if ptr.numel() != 1:
        raise ValueError(f"{what}: ptr must hold one value, got shape {tuple(ptr.shape)}")
    head = int(ptr.reshape(()))
    if not 0 <= head < ptr_limit:
        raise ValueError(f"{what}: ptr must be in [0, {ptr_limit}), got {head}")


class ClassQueue(nn.Module):
    """K slots of unit-norm class weights [K, D] and their labels [K] (-1 = empty).

    ``enqueue(keys, labels)`` L2-normalises the keys (inside the kernel) and writes
    them first-in-first-out, overwriting the oldest slots and wrapping around.
    The write position ``ptr`` lives on the queue's device: enqueueing never
    synchronises with the host. All three are buffers, so ``state_dict``
    round-trips (``persistent=False`` leaves them out of it).
    """

    def __init__(self, size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 persistent: bool = True):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
            raise ValueError(f"size must be a positive int, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        if dtype not in _QUEUE_DTYPES:
            raise TypeError(f"dtype must be one of {_QUEUE_DTYPES}, got {dtype}")
        self.register_buffer("weights", torch.zeros(size, dim, dtype=dtype, device=device), persistent=persistent)
        self.register_buffer("labels", torch.full((size,), -1, dtype=torch.long, device=device), persistent=persistent)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long, device=device), persistent=persistent)

    @property
    def size(self) -> int:
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        return self.weights.shape[1]

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.dim}, dtype={self.weights.dtype}"

    @torch.no_grad()
    def reset(self) -> None:
        self.weights.zero_()
        self.labels.fill_(-1)
        self.ptr.zero_()

    def batch_limit(self) -> tuple[int, str]:
        """The largest batch one enqueue takes, and what it is (for the error message)."""
        return self.size, "the queue size"

    def check_enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Shape, dtype and device checks (no host sync); raise before anything is written."""
        if not isinstance(keys, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise TypeError(f"keys and labels must be tensors, got {type(keys).__name__} and {type(labels).__name__}")
        if keys.dim() != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [B, {self.dim}], got shape {tuple(keys.shape)}")
        if not keys.is_floating_point():
            raise TypeError(f"keys must be a floating-point tensor, got {keys.dtype}")
        if labels.dim() != 1 or labels.shape[0] != keys.shape[0]:
            raise ValueError(f"labels must be [{keys.shape[0]}] (one per key), got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        limit, what = self.batch_limit()
        if not 1 <= keys.shape[0] <= limit:
            raise ValueError(f"batch size must be between 1 and {what} {limit}, got {keys.shape[0]}")
        for name, t in (("keys", keys), ("labels", labels)):
            if t.device != self.weights.device:
                raise ValueError(f"{name} must be on the queue's device ({self.weights.device}), got {t.device}")

    def ptr_limit(self) -> int:
        """The number of values the write pointer takes (it counts slots modulo this)."""
        return self.size

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint is read before it is loaded: a queue state that training could
        # never produce (NaN rows, rows that are not unit length, a pointer past the
        # end) would otherwise poison every later loss without a word.
        names = [prefix + n for n in ("weights", "labels", "ptr")]
        if all(n in state_dict for n in names):
            weights, labels, ptr = (state_dict[n] for n in names)
            if (tuple(weights.shape) == tuple(self.weights.shape) and tuple(labels.shape) == tuple(self.labels.shape)
                    and weights.is_floating_point()):  # otherwise the shape error below says what is wrong
                check_queue_state(weights, labels, ptr, ptr_limit=self.ptr_limit(),
                                  what=f"loading {type(self).__name__} ({prefix or 'state_dict'})")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor, guard: torch.Tensor | None = None) -> None:
        """Write the batch; with ``guard`` (int64 [1] on the queue's device), only if it is 0
        (decided on the device: a batch found bad there never enters the queue)."""
        self.check_enqueue(keys, labels)
        queue_enqueue_(self.weights, self.labels, self.ptr, keys.detach(), labels.long(), guard)
