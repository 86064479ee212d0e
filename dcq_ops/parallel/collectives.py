"""Small communication helpers of the multi-rank queue strategies: who am I,
padded all-gathers of tensors whose first dimension differs across ranks, and
raising the same error on every rank when one rank's input was bad."""

from __future__ import annotations

import torch
import torch.distributed as dist

_MESSAGE_BYTES = 1024

all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
DTYPE_NAMES = {0: "not a float tensor", 1: "float32", 2: "float16", 3: "bfloat16", 4: "float64"}


class DistributedInputError(ValueError):
    """Raised on every rank whose own input was fine when another rank's was not."""


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size_and_rank(group=None) -> tuple[int, int]:
    """(world size, rank) in ``group`` (default: the default group); (1, 0) without a process group."""
    if not initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def dtype_code(t) -> int:
    return DTYPE_CODES.get(t.dtype, 0) if isinstance(t, torch.Tensor) else 0


def gather_padded(t: torch.Tensor, rows: int, group, world: int, fill=0) -> torch.Tensor:
    """All-gather [n_r, ...] tensors of every rank, each padded to ``rows`` rows: [world * rows, ...]."""
    t = t.contiguous()
    if t.shape[0] < rows:
        t = torch.cat([t, t.new_full((rows - t.shape[0],) + tuple(t.shape[1:]), fill)])
    out = t.new_empty((world * rows,) + tuple(t.shape[1:]))
    all_gather_single(out, t, group=group)
    return out


def trim(padded: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Drop the padding of gather_padded: rank 0's rows, then rank 1's, ..."""
    rows = padded.shape[0] // len(sizes)
    if all(n == rows for n in sizes):
        return padded
    return torch.cat([padded[r * rows:r * rows + n] for r, n in enumerate(sizes)])


def gather_rows(t: torch.Tensor, sizes: list[int], group, fill=0) -> torch.Tensor:
    """Every rank's rows concatenated in rank order (batch sizes may differ)."""
    return trim(gather_padded(t, max(sizes), group, len(sizes), fill), sizes)


def default_device(group) -> torch.device:
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


def raise_collectively(error: BaseException | None, statuses: list[int], what: str, group, world: int,
                       device, note: str = "") -> None:
    """Every rank knows some rank failed: share the messages (one more collective) and raise everywhere:
    the bad rank its own error, the others a DistributedInputError naming the bad ranks."""
    message = "" if error is None else f"{type(error).__name__}: {error}"
    messages = gather_padded(_encode(message, device).view(1, -1), 1, group, world).view(world, -1)
    if error is not None:
        raise error
    bad = [r for r, s in enumerate(statuses) if s]
    details = "; ".join(f"rank {r}: {_decode(messages[r])}" for r in bad)
    raise DistributedInputError(f"{what}: rank(s) {bad} of {world} got bad input, so every rank stops here"
                                f"{note} - {details}")
