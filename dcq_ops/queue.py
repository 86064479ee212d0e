"""ClassQueue: the FIFO of the most recent class weights and their labels."""

from __future__ import annotations

import torch
from torch import nn

from dcq_ops.backends import enqueue_function
from dcq_ops.batch_guard import row_norms
from dcq_ops.validation import check_float_tensor, check_label_tensor, check_positive_int, check_same_device

_QUEUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The key of a sharded queue's state that says which block it holds: int64
# [queue_size, start, stop, world_size, rank] (dcq_ops/parallel/queue_state.py).
SHARD_KEY = "shard"


def unit_norm_tolerance(dtype: torch.dtype) -> float:
    """How far from 1 the norm of an enqueued row may be: the rounding of a row normalised
    in fp32 to the queue's dtype moves its norm by at most half an ulp of the dtype
    (relative), plus the fp32 normalisation's own error; 4 ulp leaves a margin."""
    return 4 * torch.finfo(dtype).eps + 64 * torch.finfo(torch.float32).eps


def _is_integer(t: torch.Tensor) -> bool:
    return not (t.is_floating_point() or t.is_complex() or t.dtype == torch.bool)


def check_queue_state_types(weights, labels, ptr, *, shape: tuple[int, int] | None = None,
                            what: str = "queue state", names: tuple[str, str, str] = ("weights", "labels", "ptr")
                            ) -> None:
    """The types and shapes a queue state may have (no tensor value read): weights a floating
    point [K, D] tensor (``shape`` when given), labels an integer [K] tensor, ptr an integer
    tensor of one element. Integer weights would load as zero rows, a float or bool pointer
    and float labels would be truncated: each is refused. TypeError/ValueError naming the key
    (``names``), the expected and the actual."""
    w, l, p = names
    for name, value in zip(names, (weights, labels, ptr)):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(value).__name__}")
    if not weights.is_floating_point():
        raise TypeError(f"{what}: {w} must be a floating point tensor (float32, bfloat16, float16), got {weights.dtype}")
    if weights.dim() != 2 or (shape is not None and tuple(weights.shape) != tuple(shape)):
        expected = f"[{shape[0]}, {shape[1]}]" if shape is not None else "[K, D]"
        raise ValueError(f"{what}: {w} must be {expected}, got shape {tuple(weights.shape)}")
    if not _is_integer(labels):
        raise TypeError(f"{what}: {l} must be an integer tensor (int64), got {labels.dtype}")
    if tuple(labels.shape) != (weights.shape[0],):
        raise ValueError(f"{what}: {l} must be [{weights.shape[0]}] (one per slot), got shape {tuple(labels.shape)}")
    if not _is_integer(ptr):
        raise TypeError(f"{what}: {p} must be an integer tensor (int64), got {ptr.dtype}")
    if ptr.numel() != 1:
        raise ValueError(f"{what}: {p} must hold one value, got shape {tuple(ptr.shape)}")


@torch.no_grad()
def check_queue_state(weights: torch.Tensor, labels: torch.Tensor, ptr: torch.Tensor, *, ptr_limit: int,
                      num_classes: int | None = None, what: str = "queue state",
                      names: tuple[str, str, str] = ("weights", "labels", "ptr")) -> None:
    """The state a queue may hold (one host sync: for loading, never in a step): the types
    of :func:`check_queue_state_types`, finite weights, in every filled slot (label >= 0) a
    unit row (the rows the batch check lets in, :func:`dcq_ops.batch_guard.holdable_rows`,
    normalised), labels in [-1, num_classes) (-1 = empty), and a write pointer in
    [0, ptr_limit). Raises TypeError/ValueError naming the key (``names``) and the first
    offence."""
    check_queue_state_types(weights, labels, ptr, what=what, names=names)
    w, l, p = names
    if weights.numel() and not bool(torch.isfinite(weights).all()):
        bad = int((~torch.isfinite(weights)).any(dim=1).nonzero()[0, 0])
        raise ValueError(f"{what}: {w} must be finite, got NaN or infinite values in slot {bad}")
    if labels.numel():
        low = int(labels.min())
        if low < -1:
            raise ValueError(f"{what}: {l} must be >= -1 (-1 marks an empty slot), got {low}")
        high = int(labels.max())
        if num_classes is not None and high >= num_classes:
            raise ValueError(f"{what}: {l} must be < num_classes = {num_classes}, got {high}")
        filled = labels >= 0
        if bool(filled.any()):
            # The norms as the batch check measures them (row_norms): one rule for both.
            norms = row_norms(weights[filled])
            error = (norms - 1).abs()
            tolerance = unit_norm_tolerance(weights.dtype)
            worst = int(error.argmax())
            if float(error[worst]) > tolerance:
                slot = int(filled.nonzero()[worst, 0])
                raise ValueError(f"{what}: every filled slot (label >= 0) of {w} must hold a unit-norm row (within "
                                 f"{tolerance:.2g} for {weights.dtype}), got norm {float(norms[worst]):.6g} "
                                 f"in slot {slot}")
    head = int(ptr.reshape(()))
    if not 0 <= head < ptr_limit:
        raise ValueError(f"{what}: {p} must be in [0, {ptr_limit}), got {head}")


class ClassQueue(nn.Module):
    """K slots of unit-norm class weights [K, D] and their labels [K] (-1 = empty).

    ``enqueue(class_weights, labels)`` L2-normalises the class weights (inside the
    kernel) and writes them first-in-first-out, overwriting the oldest slots and
    wrapping around. The write position ``ptr`` lives on the queue's device:
    enqueueing never synchronises with the host. All three are buffers, so
    ``state_dict`` round-trips (``persistent=False`` leaves them out of it), and a
    state is checked before it is loaded (``check_queue_state``).

    Parameters
    ----------
    queue_size : int
        K, the number of slots.
    dim : int
        D, the width of a class weight.
    dtype : torch.dtype
        float32, bfloat16 or float16: the queue's (and the loss's GEMM operands') dtype.
    device : torch.device or str, optional
    persistent : bool
        Whether the queue is part of ``state_dict``.
    """

    def __init__(self, queue_size: int, dim: int, *, dtype: torch.dtype = torch.float32, device=None,
                 persistent: bool = True):
        super().__init__()
        check_positive_int("queue_size", queue_size)
        check_positive_int("dim", dim)
        if dtype not in _QUEUE_DTYPES:
            raise TypeError(f"dtype must be one of {_QUEUE_DTYPES}, got {dtype}")
        slots = self._local_slots(queue_size)
        self.register_buffer("weights", torch.zeros(slots, dim, dtype=dtype, device=device), persistent=persistent)
        self.register_buffer("labels", torch.full((slots,), -1, dtype=torch.long, device=device), persistent=persistent)
        self.register_buffer("ptr", torch.zeros(1, dtype=torch.long, device=device), persistent=persistent)

    _size_words = "the queue size"  # for messages

    def _local_slots(self, queue_size: int) -> int:
        """How many of the queue's slots this module holds (all of them; a shard holds a block)."""
        return queue_size

    @property
    def queue_size(self) -> int:
        """K, the number of slots of the queue (the write pointer counts modulo K)."""
        return self.weights.shape[0]

    @property
    def dim(self) -> int:
        """D, the width of a class weight."""
        return self.weights.shape[1]

    def extra_repr(self) -> str:
        return f"queue_size={self.queue_size}, dim={self.dim}, dtype={self.weights.dtype}"

    @torch.no_grad()
    def reset(self) -> None:
        """Empty every slot (label -1, zero weights) and rewind the pointer."""
        self.weights.zero_()
        self.labels.fill_(-1)
        self.ptr.zero_()

    def check_enqueue(self, class_weights: torch.Tensor, labels: torch.Tensor) -> None:
        """Shape, dtype and device checks of a batch to enqueue (no host sync); they raise
        before anything is written.

        Parameters
        ----------
        class_weights : torch.Tensor
            [B, D] floating point, 1 <= B <= queue_size.
        labels : torch.Tensor
            [B] integer.
        """
        check_float_tensor("class_weights", class_weights, dim=2)
        if class_weights.shape[1] != self.dim:
            raise ValueError(f"class_weights must be [B, {self.dim}], got shape {tuple(class_weights.shape)}")
        check_label_tensor("labels", labels)
        if labels.shape[0] != class_weights.shape[0]:
            raise ValueError(f"labels must be [{class_weights.shape[0]}] (one per class weight), "
                             f"got shape {tuple(labels.shape)}")
        if not 1 <= class_weights.shape[0] <= self.queue_size:
            raise ValueError(f"batch size must be between 1 and {self._size_words} {self.queue_size}, "
                             f"got {class_weights.shape[0]}")
        check_same_device("the queue", self.weights, class_weights=class_weights, labels=labels)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # All or nothing: the whole queue state (its keys, types, shapes and values) is
        # checked before anything is copied, in strict and non-strict loads alike. torch
        # copies key by key and raises at the end, which would leave labels and a pointer
        # of one state beside the weights of another; and a state that training could
        # never produce (NaN rows, rows not of unit length, a pointer past the end) would
        # poison every later loss without a word.
        what = f"loading {type(self).__name__} ({prefix or 'state_dict'})"
        meta = state_dict.get(prefix + SHARD_KEY)
        if meta is not None:  # a sharded queue's block form (ShardedClassQueue takes it itself)
            size, start, stop, world, rank = (int(v) for v in torch.as_tensor(meta).reshape(-1).tolist()[:5])
            if (start, stop) != (0, size):
                raise ValueError(
                    f"{what}: the state holds rank {rank}'s block, global slots [{start}, {stop}) of a queue of "
                    f"{size} slots sharded over {world} ranks, not the whole queue: save the global form with "
                    "DCQLoss.global_state_dict() (a collective of the sharded run), or make it from every rank's "
                    "state dict with dcq_ops.parallel.assemble_queue_state")
            state_dict = {k: v for k, v in state_dict.items() if k != prefix + SHARD_KEY}
        own = [n for n in ("weights", "labels", "ptr") if n not in self._non_persistent_buffers_set]
        present = [n for n in own if prefix + n in state_dict]
        if present:
            missing = [prefix + n for n in own if n not in present]
            if missing:
                raise ValueError(f"{what}: a queue state is weights, labels and ptr together, got "
                                 f"{[prefix + n for n in present]} without {missing} (a partial state would leave "
                                 "the slots, their labels and the pointer out of step)")
            # A key of no buffer under the queue's prefix: refused here, in non-strict loads too
            # (torch passes every module strict=True and applies strict=False only after the
            # copies, when it would be too late to refuse without having changed the queue).
            extra = sorted(k for k in state_dict if k.startswith(prefix) and k[len(prefix):] not in
                           ("weights", "labels", "ptr", SHARD_KEY) and "." not in k[len(prefix):])
            if extra:
                raise ValueError(f"{what}: unexpected key(s) {extra}: a queue state holds "
                                 f"{[prefix + n for n in own]} only")
            self._check_state_to_load(state_dict, prefix, what)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _check_state_to_load(self, state_dict, prefix: str, what: str) -> None:
        """Every check of a state about to be loaded, before anything is copied."""
        names = tuple(prefix + n for n in ("weights", "labels", "ptr"))
        weights, labels, ptr = (state_dict[n] for n in names)
        rows = self.weights.shape[0]
        if (isinstance(weights, torch.Tensor) and weights.dim() == 2 and weights.shape[1] == self.dim
                and weights.shape[0] != rows):
            raise ValueError(
                f"{what}: {names[0]} must be [{rows}, {self.dim}] ({self._size_words} "
                f"{self.queue_size}), got {tuple(weights.shape)}: a queue of another size, or one rank's block "
                "of a sharded queue (an older per-rank checkpoint: make the global queue from every rank's "
                "state dict with dcq_ops.parallel.assemble_queue_state)")
        check_queue_state_types(weights, labels, ptr, shape=(rows, self.dim), what=what, names=names)
        if tuple(ptr.shape) != tuple(self.ptr.shape):
            raise ValueError(f"{what}: {names[2]} must be of shape {tuple(self.ptr.shape)}, got {tuple(ptr.shape)}")
        check_queue_state(weights, labels, ptr, ptr_limit=self.queue_size, what=what, names=names)

    @torch.no_grad()
    def enqueue(self, class_weights: torch.Tensor, labels: torch.Tensor,
                bad_reasons: torch.Tensor | None = None) -> None:
        """Write a batch into the oldest slots.

        Parameters
        ----------
        class_weights : torch.Tensor
            [B, D]; normalised on the way in.
        labels : torch.Tensor
            [B] integer.
        bad_reasons : torch.Tensor, optional
            int64 [1] on the queue's device: the batch is written only if it is 0
            (decided on the device: a batch found bad there never enters the queue).
        """
        self.check_enqueue(class_weights, labels)
        enqueue_function(self.weights.device)(self.weights, self.labels, self.ptr, class_weights.detach(),
                                              labels.long(), bad_reasons)
