"""ClassQueue: the FIFO of the most recent class weights and their labels."""

from __future__ import annotations

import torch
from torch import nn

from dcq_ops.ops.queue import queue_enqueue_

_QUEUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor, guard: torch.Tensor | None = None) -> None:
        """Write the batch; with ``guard`` (int64 [1] on the queue's device), only if it is 0
        (decided on the device: a batch found bad there never enters the queue)."""
        self.check_enqueue(keys, labels)
        queue_enqueue_(self.weights, self.labels, self.ptr, keys.detach(), labels.long(), guard)
