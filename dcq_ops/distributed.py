"""DCQLoss on several ranks (torch.distributed): a gathered queue, a sharded queue,
and MoCo's shuffle-BN for the weight generator. See docs/distributed.md.

Modes of ``DCQLoss(distributed=...)``:

- ``"none"``: every rank is on its own (its own queue, its own batch).
- ``"gathered"`` (the paper's): every rank holds the same full queue of K slots.
  Each rank computes the loss of its local batch against the queue, then the class
  weights and labels of every rank are all-gathered (rank 0's rows first) and
  enqueued on every rank, so the queues stay identical. This equals one process
  running the concatenated batch: same queue after every step, same per-row losses
  and per-row gradients. With ``reduction="mean"`` each rank returns
  ``sum(local row losses) * W / N_total`` (the local mean when the batch sizes are
  equal), so that the mean of the W returned losses is the single-process mean and
  DDP's averaging of gradients gives exactly the single-process gradient, even with
  uneven batch sizes. ``"sum"`` and ``"none"`` return the local rows' sum / losses.
- ``"sharded"``: one global FIFO queue of K slots, split in contiguous blocks:
  rank r holds global slots ``[start_r, stop_r)`` (see ``shard_range``; block sizes
  differ by at most one), so the shards concatenated in rank order are the
  unsharded queue. Every rank keeps the same global write pointer ``ptr``
  (``0 <= ptr < K``); an enqueue of the gathered batch of B keys writes global slots
  ``(ptr + t) % K``, ``t = 0..B-1``, each rank only those in its block, then
  ``ptr = (ptr + B) % K`` - exactly what the unsharded queue does. The loss: the
  embeddings (and labels) of all ranks are all-gathered ([N_total, D], small); each
  rank computes, for every row, the partial online log-sum-exp state over its own
  shard (row max, row sum, and the gradient accumulator sum_j exp(z_ij - max) W_j);
  the maxima are combined by an all-reduce(MAX), the rescaled sums and accumulators
  by a reduce-scatter(SUM) that delivers each rank its own rows only. No N x K tensor
  is ever communicated. The row is then finalised exactly as DESIGN.md §2 (and
  csrc/common/margin.h ``finalize_row``), and the gradient with respect to the local
  embeddings is computed in the forward (the backward communicates nothing).

Robustness: before any collective that moves data, all ranks exchange a small
header (status, batch size, embedding size, queue size and pointer, dtypes, training
flag). A rank whose input fails validation still takes part in that exchange, so
every rank raises (the bad rank its own ValueError/TypeError, the others a
``DistributedInputError`` naming the bad rank and its message) instead of hanging,
and no queue is modified. Disagreements between ranks (train/eval, dtypes, queue
state) raise on every rank too. A rank that never calls forward cannot be detected
here: create the process group with a ``timeout``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

from dcq_ops import reference
from dcq_ops.ops.queue import queue_enqueue_
from dcq_ops.queue import ClassQueue

MODES = ("auto", "none", "gathered", "sharded")

# Per-chunk logits budget of the sharded partial pass (same as the chunked backend).
_CHUNK_BYTES_CPU = 8 << 20
_CHUNK_BYTES_CUDA = 64 << 20
_MESSAGE_BYTES = 1024

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
_DTYPE_NAMES = {0: "not a float tensor", 1: "float32", 2: "float16", 3: "bfloat16", 4: "float64"}


class DistributedInputError(ValueError):
    """Raised on every rank whose own input was fine when another rank's was not."""


# --------------------------------------------------------------------------- modes


def check_mode(mode) -> str:
    if mode not in MODES:
        raise ValueError(f"distributed must be one of {MODES}, got {mode!r}")
    return mode


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size_and_rank(group=None) -> tuple[int, int]:
    """(world size, rank) in ``group`` (default: the default group); (1, 0) without a process group."""
    if not _initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def resolve_mode(mode: str, group=None) -> str:
    """"none", "gathered" or "sharded": what DCQLoss does now.

    "auto" is "gathered" under an initialised process group of more than one rank,
    else "none". "gathered" and "sharded" on a single rank are "none" (the same
    result, no communication).
    """
    mode = check_mode(mode)
    if mode == "none":
        return "none"
    if not _initialized():
        if mode == "auto":
            return "none"
        raise ValueError(f"distributed={mode!r} needs an initialised torch.distributed process group "
                         "(torch.distributed.init_process_group, e.g. under torchrun), got none; "
                         "use distributed='none' for a single process")
    if dist.get_world_size(group) == 1:
        return "none"
    return "gathered" if mode == "auto" else mode


# --------------------------------------------------------------------------- sharded queue


def shard_range(queue_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """The global slots ``[start, stop)`` that ``rank`` holds of a queue of ``queue_size``
    slots split over ``world_size`` ranks: contiguous blocks in rank order, the first
    ``queue_size % world_size`` blocks one slot larger."""
    for name, value in (("queue_size", queue_size), ("world_size", world_size), ("rank", rank)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {value!r}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    if queue_size < world_size:
        raise ValueError(f"a sharded queue needs at least one slot per rank: queue_size must be >= world_size "
                         f"= {world_size}, got {queue_size}")
    base, extra = divmod(queue_size, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


class ShardedClassQueue(ClassQueue):
    """This rank's block of a global FIFO queue of ``global_size`` slots.

    ``weights``/``labels`` hold global slots ``[start, stop)`` (``shard_range``);
    ``ptr`` is the *global* write pointer, the same on every rank. ``enqueue`` takes
    the global (all-gathered, identical on every rank) batch and writes the keys
    whose slots fall in this block. ``state_dict`` holds this rank's block: save and
    load it per rank (or use ``gather_queue`` / ``load_global_``).
    """

    def __init__(self, global_size: int, dim: int, *, world_size: int, rank: int,
                 dtype: torch.dtype = torch.float32, device=None, persistent: bool = True):
        start, stop = shard_range(global_size, world_size, rank)
        super().__init__(stop - start, dim, dtype=dtype, device=device, persistent=persistent)
        self.global_size = global_size
        self.world_size = world_size
        self.rank = rank
        self.start = start
        self.stop = stop

    def extra_repr(self) -> str:
        return (f"global_size={self.global_size}, slots=[{self.start}, {self.stop}) of rank {self.rank}/"
                f"{self.world_size}, dim={self.dim}, dtype={self.weights.dtype}")

    def check_enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """As ClassQueue.check_enqueue, with the batch bounded by the global queue size."""
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
        if not 1 <= keys.shape[0] <= self.global_size:
            raise ValueError(f"batch size must be between 1 and the global queue size {self.global_size}, "
                             f"got {keys.shape[0]}")
        for name, t in (("keys", keys), ("labels", labels)):
            if t.device != self.weights.device:
                raise ValueError(f"{name} must be on the queue's device ({self.weights.device}), got {t.device}")

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor, *, ptr: int | None = None) -> None:
        """Enqueue the global batch (the same on every rank; no communication here).

        ``ptr``: the global pointer if the caller knows it on the host already;
        otherwise it is read from the device (one host sync)."""
        self.check_enqueue(keys, labels)
        size, batch = self.global_size, keys.shape[0]
        head = int(self.ptr.item()) if ptr is None else ptr
        keys, labels = keys.detach(), labels.long()
        # The global slots written are [head, head + batch) modulo size: at most two
        # runs, [head, min(head + batch, size)) and, on wrap-around, [0, head + batch - size).
        runs = [(head, min(head + batch, size), 0)]
        if head + batch > size:
            runs.append((0, head + batch - size, size - head))
        for first, last, key_offset in runs:
            lo, hi = max(first, self.start), min(last, self.stop)
            if lo >= hi:
                continue
            scratch_ptr = torch.zeros(1, dtype=torch.long, device=self.weights.device)
            src = key_offset + lo - first
            # The same enqueue op as the unsharded queue, on the block's rows [lo, hi).
            queue_enqueue_(self.weights.narrow(0, lo - self.start, hi - lo),
                           self.labels.narrow(0, lo - self.start, hi - lo), scratch_ptr,
                           keys[src:src + hi - lo], labels[src:src + hi - lo])
        self.ptr.add_(batch).remainder_(size)

    @torch.no_grad()
    def load_global_(self, weights: torch.Tensor, labels: torch.Tensor, ptr) -> None:
        """Set this block from a full (unsharded) queue state: weights [K, D], labels [K], ptr."""
        if tuple(weights.shape) != (self.global_size, self.dim):
            raise ValueError(f"weights must be [{self.global_size}, {self.dim}] (the global queue), "
                             f"got {tuple(weights.shape)}")
        if tuple(labels.shape) != (self.global_size,):
            raise ValueError(f"labels must be [{self.global_size}], got {tuple(labels.shape)}")
        self.weights.copy_(weights[self.start:self.stop])
        self.labels.copy_(labels[self.start:self.stop])
        self.ptr.copy_(torch.as_tensor(ptr, dtype=torch.long).reshape(1))


def make_queue(mode: str, group, size: int, dim: int, *, dtype, device, persistent: bool) -> ClassQueue:
    """The queue of a DCQLoss: a full ClassQueue, or this rank's ShardedClassQueue block."""
    if check_mode(mode) != "sharded":
        return ClassQueue(size, dim, dtype=dtype, device=device, persistent=persistent)
    if not _initialized():
        raise ValueError("distributed='sharded' needs an initialised torch.distributed process group when DCQLoss "
                         "is created (the block of the queue a rank holds depends on its rank and the world "
                         "size), got none; call torch.distributed.init_process_group first")
    world, rank = world_size_and_rank(group)
    return ShardedClassQueue(size, dim, world_size=world, rank=rank, dtype=dtype, device=device,
                             persistent=persistent)


@torch.no_grad()
def gather_queue(queue: ShardedClassQueue, group=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The full queue (weights [K, D], labels [K], ptr [1]) on every rank (a collective)."""
    world, _ = world_size_and_rank(group)
    if world != queue.world_size:
        raise ValueError(f"group has {world} ranks, but the queue was sharded over {queue.world_size}")
    sizes = [b - a for a, b in (shard_range(queue.global_size, world, r) for r in range(world))]
    weights = _trim(_gather_padded(queue.weights, max(sizes), group, world), sizes)
    labels = _trim(_gather_padded(queue.labels, max(sizes), group, world, fill=-1), sizes)
    return weights, labels, queue.ptr.clone()


# --------------------------------------------------------------------------- communication helpers


def _gather_padded(t: torch.Tensor, rows: int, group, world: int, fill=0) -> torch.Tensor:
    """All-gather [n_r, ...] tensors of every rank, each padded to ``rows`` rows: [world * rows, ...]."""
    t = t.contiguous()
    if t.shape[0] < rows:
        t = torch.cat([t, t.new_full((rows - t.shape[0],) + tuple(t.shape[1:]), fill)])
    out = t.new_empty((world * rows,) + tuple(t.shape[1:]))
    _all_gather_single(out, t, group=group)
    return out


def _trim(padded: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Drop the padding of _gather_padded: rank 0's rows, then rank 1's, ..."""
    rows = padded.shape[0] // len(sizes)
    if all(n == rows for n in sizes):
        return padded
    return torch.cat([padded[r * rows:r * rows + n] for r, n in enumerate(sizes)])


def _default_device(group) -> torch.device:
    """Where a collective's tensors must live when no input tells: the GPU for NCCL."""
    backend = str(dist.get_backend(group))
    if "nccl" in backend and "gloo" not in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _encode(message: str, device) -> torch.Tensor:
    data = message.encode("utf-8")[:_MESSAGE_BYTES]
    out = torch.zeros(_MESSAGE_BYTES, dtype=torch.uint8)
    out[:len(data)] = torch.tensor(list(data), dtype=torch.uint8)
    return out.to(device)


def _decode(t: torch.Tensor) -> str:
    data = bytes(t.cpu().tolist()).rstrip(b"\0")
    return data.decode("utf-8", errors="replace")


def _raise_collectively(error: BaseException | None, statuses: list[int], what: str, group, world: int,
                        device, note: str = "") -> None:
    """Every rank knows some rank failed: share the messages (one more collective) and raise everywhere."""
    message = "" if error is None else f"{type(error).__name__}: {error}"
    messages = _gather_padded(_encode(message, device).view(1, -1), 1, group, world).view(world, -1)
    if error is not None:
        raise error
    bad = [r for r, s in enumerate(statuses) if s]
    details = "; ".join(f"rank {r}: {_decode(messages[r])}" for r in bad)
    raise DistributedInputError(f"{what}: rank(s) {bad} of {world} got bad input, so every rank stops here"
                                f"{note} - {details}")


@dataclass
class _Step:
    """What the header exchange told every rank about this step."""

    group: object
    world: int
    rank: int
    sizes: list[int]
    ptr: int
    need_grad: bool

    @property
    def total(self) -> int:
        return sum(self.sizes)

    @property
    def rows(self) -> int:
        return max(self.sizes)

    @property
    def even(self) -> bool:
        return all(n == self.sizes[0] for n in self.sizes)


_FIELDS = ("status", "mode", "training", "rows", "dim", "queue_size", "ptr", "need_grad",
           "embeddings_dtype", "class_weights_dtype", "queue_dtype")


def _dtype_code(t) -> int:
    return _DTYPE_CODES.get(t.dtype, 0) if isinstance(t, torch.Tensor) else 0


def _exchange_header(module, mode: str, embeddings, labels, class_weights, group):
    """Validate locally, exchange one small header with every rank, and agree.

    Returns (labels, class_weights, step) or raises on every rank."""
    world, rank = world_size_and_rank(group)
    queue = module.queue
    device = queue.weights.device
    error = None
    try:
        labels, class_weights = module._prepare(embeddings, labels, class_weights)
    except Exception as exc:  # noqa: BLE001 - any local failure must reach the other ranks before they block
        error = exc
    ok = error is None
    global_size = queue.global_size if isinstance(queue, ShardedClassQueue) else queue.size
    header = torch.tensor([
        0 if ok else 1,
        MODES.index(mode),
        int(module.training),
        embeddings.shape[0] if ok else 0,
        embeddings.shape[1] if ok else 0,
        global_size,
        0,  # ptr, copied from the device below (no extra sync: the header is read once)
        int(ok and embeddings.requires_grad and torch.is_grad_enabled()),
        _dtype_code(embeddings),
        _dtype_code(class_weights),
        _dtype_code(queue.weights),
    ], dtype=torch.long, device=device)
    header[6:7].copy_(queue.ptr.view(1))
    table = _gather_padded(header.view(1, -1), 1, group, world).view(world, -1).tolist()  # the one host sync
    columns = {name: [row[i] for row in table] for i, name in enumerate(_FIELDS)}
    what = f"DCQLoss(distributed={mode!r})"
    if any(columns["status"]):
        _raise_collectively(error, columns["status"], what, group, world, device,
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
    agree("queue_dtype", "queue dtype", _DTYPE_NAMES.get)
    if module.training:
        agree("class_weights_dtype", "class_weights dtype (they are all-gathered)", _DTYPE_NAMES.get)
    if mode == "sharded":
        agree("embeddings_dtype", "embeddings dtype (they are all-gathered)", _DTYPE_NAMES.get)
    sizes = columns["rows"]
    if module.training and sum(sizes) > global_size:
        raise ValueError(f"{what}: the gathered batch (batch sizes {sizes} on ranks 0..{world - 1}, "
                         f"{sum(sizes)} in all) must fit the queue of {global_size} slots")
    step = _Step(group=group, world=world, rank=rank, sizes=sizes, ptr=columns["ptr"][0],
                 need_grad=any(columns["need_grad"]))
    return labels, class_weights, step


def _reduce(loss_rows: torch.Tensor, reduction: str, step: _Step) -> torch.Tensor:
    """As a single process on the concatenated batch, given that DDP averages over ranks:
    "mean" -> sum of local rows * W / N_total (the local mean for equal batch sizes)."""
    if reduction == "none":
        return loss_rows
    if reduction == "sum":
        return loss_rows.sum()
    if step.even:
        return loss_rows.mean()
    return loss_rows.sum() * (step.world / step.total)


# --------------------------------------------------------------------------- forward


def distributed_forward(module, mode: str, embeddings, labels, class_weights) -> torch.Tensor:
    """DCQLoss.forward on several ranks; ``mode`` is "gathered" or "sharded" (see resolve_mode).
    Every rank of the group must call it, with the same module configuration."""
    group = module.process_group
    labels, class_weights, step = _exchange_header(module, mode, embeddings, labels, class_weights, group)
    if mode == "gathered":
        loss_rows = module._loss(embeddings, labels, class_weights, "none")
        loss = _reduce(loss_rows, module.reduction, step)
        if module.training:
            keys = _trim(_gather_padded(class_weights, step.rows, group, step.world), step.sizes)
            key_labels = _trim(_gather_padded(labels, step.rows, group, step.world, fill=-1), step.sizes)
            module.queue.enqueue(keys, key_labels)
        return loss
    if mode == "sharded":
        loss_rows, keys, key_labels = _sharded_loss_rows(module, embeddings, labels, class_weights, step)
        loss = _reduce(loss_rows, module.reduction, step)
        if module.training:
            module.queue.enqueue(keys, key_labels, ptr=step.ptr)
        return loss
    raise ValueError(f"mode must be 'gathered' or 'sharded', got {mode!r}")


class _RowsWithGradient(torch.autograd.Function):
    """Per-row losses whose gradient with respect to the embeddings was computed in the
    forward (as the fused backends do): the backward only scales it, communicates
    nothing and never reads the queue."""

    @staticmethod
    def forward(ctx, embeddings, loss_rows, grad_rows):
        ctx.save_for_backward(grad_rows)
        ctx.embeddings_dtype = embeddings.dtype
        return loss_rows.clone()

    @staticmethod
    def backward(ctx, grad_loss_rows):
        (grad_rows,) = ctx.saved_tensors
        if grad_rows.shape[0] != grad_loss_rows.shape[0]:
            raise RuntimeError("the sharded DCQ loss ran its forward without computing the gradient "
                               "(embeddings did not require grad, or grad mode was off), so it cannot backpropagate")
        grad = grad_rows * grad_loss_rows.unsqueeze(1).to(grad_rows.dtype)
        return grad.to(ctx.embeddings_dtype), None, None


def _chunk_size(rows: int, device: torch.device) -> int:
    budget = _CHUNK_BYTES_CUDA if device.type == "cuda" else _CHUNK_BYTES_CPU
    return max(256, budget // (8 * max(rows, 1)))


def shard_partials(q: torch.Tensor, labels: torch.Tensor, shard_weights: torch.Tensor, shard_labels: torch.Tensor,
                   *, scale: float, interclass_filtering_threshold: float = 0.0, need_grad: bool = True,
                   chunk_size: int | None = None):
    """Online log-sum-exp of each row's negative logits over one shard of the queue.

    q: unit-norm rows [N, D] in the accumulation dtype (fp32 or fp64); labels [N].
    Returns (row_max [N], row_sum [N], accumulator [N, D] or None) with
    ``row_sum = sum_j exp(z_ij - row_max)`` over the kept entries (filtered entries
    count with z = 0) and ``accumulator = sum_j exp(z_ij - row_max) W_j`` over the kept,
    unfiltered entries; ``row_max = -inf`` and ``row_sum = 0`` where nothing is kept.
    The queue is read in chunks: memory O(N * chunk + N * D), never O(N * K).
    """
    acc = q.dtype
    rows = q.shape[0]
    row_max = torch.full((rows,), float("-inf"), dtype=acc, device=q.device)
    row_sum = torch.zeros(rows, dtype=acc, device=q.device)
    accumulator = torch.zeros_like(q) if need_grad else None
    chunk = chunk_size or _chunk_size(rows, q.device)
    labels = labels.view(-1, 1)
    for start in range(0, shard_weights.shape[0], chunk):
        w = shard_weights[start:start + chunk].to(acc)
        wl = shard_labels[start:start + chunk].view(1, -1)
        cos = q @ w.t()
        excluded = (wl < 0) | (wl == labels)
        logits = scale * cos
        filtered = None
        if interclass_filtering_threshold > 0:
            filtered = (cos > interclass_filtering_threshold) & ~excluded
            logits = logits.masked_fill(filtered, 0.0)
        logits = logits.masked_fill(excluded, float("-inf"))
        new_max = torch.maximum(row_max, logits.amax(dim=1))
        safe_max = torch.where(torch.isinf(new_max), torch.zeros_like(new_max), new_max)
        rescale = torch.exp(row_max - safe_max)  # 0 while nothing was kept before
        p = torch.exp(logits - safe_max.unsqueeze(1))  # excluded entries: exactly 0
        row_sum = row_sum * rescale + p.sum(dim=1)
        if need_grad:
            if filtered is not None:
                p = p.masked_fill(filtered, 0.0)  # a filtered entry has no gradient
            accumulator = accumulator * rescale.unsqueeze(1) + p @ w
        row_max = new_max
    return row_max, row_sum, accumulator


def finalize_rows(positive_cos: torch.Tensor, row_max: torch.Tensor, row_sum: torch.Tensor, *, scale: float,
                  m1: float, m2: float, m3: float, straight_through_margin: bool):
    """Per-row loss and gradient coefficients from the combined log-sum-exp state, as
    csrc/common/margin.h ``finalize_row``: loss = softplus(lse_neg - z_pos); the
    positive's factor is -sigmoid(lse_neg - z_pos) * dz/dc (never 1 - p); the
    accumulator's factor is s * exp(row_max - lse_all). Rows with nothing kept: 0."""
    has = row_sum > 0
    z_pos = scale * reference.margin_value(positive_cos, m1, m2, m3)
    lse_neg = row_max + torch.log(torch.where(has, row_sum, torch.ones_like(row_sum)))
    d = torch.where(has, lse_neg - z_pos, torch.zeros_like(z_pos))
    if straight_through_margin:
        dz_dc = torch.full_like(positive_cos, scale)
    else:
        dz_dc = scale * reference.margin_derivative(positive_cos, m1, m2)
    loss = torch.where(has, F.softplus(d), torch.zeros_like(d))
    coef_positive = torch.where(has, -torch.sigmoid(d) * dz_dc, torch.zeros_like(d))
    lse_all = torch.maximum(z_pos, lse_neg) + torch.log1p(torch.exp(-d.abs()))
    coef_negative = torch.where(has, scale * torch.exp(row_max - lse_all), torch.zeros_like(d))
    return loss, coef_positive, coef_negative


def _sharded_loss_rows(module, embeddings, labels, class_weights, step: _Step):
    """The loss rows of the local batch against the union of every rank's shard.

    Returns (loss_rows [n_local], gathered keys, gathered key labels (or None, None in eval))."""
    group, world, rows = step.group, step.world, step.rows
    margin = module.margin
    queue = module.queue
    acc = reference._accumulation_dtype(embeddings, class_weights, queue.weights)
    # 1. All-gather the embeddings and labels (padded to the largest batch).
    all_x = _gather_padded(embeddings.detach(), rows, group, world)
    all_labels = _gather_padded(labels, rows, group, world, fill=-1)
    keys = key_labels = None
    if module.training:
        keys = _trim(_gather_padded(class_weights, rows, group, world), step.sizes)
        key_labels = _trim(all_labels, step.sizes)
    x = all_x.to(acc)
    x_norm = x.norm(dim=1, keepdim=True).clamp_min(1e-12)
    q = x / x_norm  # padding rows are 0 and harmless
    # 2. Partial log-sum-exp over this rank's shard, for every row of every rank.
    row_max, row_sum, accumulator = shard_partials(
        q, all_labels, queue.weights, queue.labels, scale=margin.scale,
        interclass_filtering_threshold=margin.interclass_filtering_threshold, need_grad=step.need_grad)
    # 3. Combine: all-reduce the maxima; rescale; reduce-scatter the sums (and
    #    accumulators) so that each rank receives its own rows only.
    global_max = row_max.clone()
    dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
    safe_max = torch.where(torch.isinf(global_max), torch.zeros_like(global_max), global_max)
    rescale = torch.exp(row_max - safe_max)
    parts = [(row_sum * rescale).unsqueeze(1)]
    if step.need_grad:
        parts.append(accumulator * rescale.unsqueeze(1))
    combined = torch.cat(parts, dim=1)
    mine = combined.new_empty((rows, combined.shape[1]))
    _reduce_scatter_single(mine, combined, op=dist.ReduceOp.SUM, group=group)
    n = step.sizes[step.rank]
    own = slice(step.rank * rows, step.rank * rows + n)
    own_sum = mine[:n, 0]
    own_max = global_max[own]
    # 4. Finalise the local rows.
    own_q, own_norm = q[own], x_norm[own]
    w = F.normalize(class_weights.to(acc), dim=1)
    positive_cos = (own_q * w).sum(dim=1)
    loss_rows, coef_positive, coef_negative = finalize_rows(
        positive_cos, own_max, own_sum, scale=margin.scale, m1=margin.m1, m2=margin.m2, m3=margin.m3,
        straight_through_margin=margin.straight_through)
    compute_grad = embeddings.requires_grad and torch.is_grad_enabled()
    if not compute_grad:
        return loss_rows, keys, key_labels
    grad_q = coef_positive.unsqueeze(1) * w + coef_negative.unsqueeze(1) * mine[:n, 1:]
    grad_rows = (grad_q - own_q * (own_q * grad_q).sum(dim=1, keepdim=True)) / own_norm
    return _RowsWithGradient.apply(embeddings, loss_rows, grad_rows), keys, key_labels


# --------------------------------------------------------------------------- shuffle-BN


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
        error, device = exc, _default_device(group)
    shape = list(images.shape) if error is None else []
    header = torch.tensor([0 if error is None else 1, _dtype_code(images) if error is None else 0,
                           len(shape)] + shape + [0] * (max_dims - len(shape)), dtype=torch.long, device=device)
    table = _gather_padded(header.view(1, -1), 1, group, world).view(world, -1).tolist()
    statuses = [row[0] for row in table]
    if any(statuses):
        _raise_collectively(error, statuses, "shuffled_forward", group, world, device)
    trailing = [tuple(row[4:3 + row[2]]) + (row[1],) for row in table]
    if any(t != trailing[0] for t in trailing):
        raise ValueError(f"shuffled_forward: images must have the same shape after the batch dimension and the "
                         f"same dtype on every rank, got (shape[1:], dtype code) {trailing} on ranks 0..{world - 1}")
    sizes = [row[3] for row in table]
    rows, total, offset, n = max(sizes), sum(sizes), sum(sizes[:rank]), sizes[rank]
    all_images = _trim(_gather_padded(images, rows, group, world), sizes)
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
    all_out = _trim(_gather_padded(out, rows, group, world), sizes)  # all_out[p] = f(images[permutation[p]])
    inverse = torch.empty_like(permutation)
    inverse[permutation] = torch.arange(total, device=device)
    return all_out[inverse[offset:offset + n]]
