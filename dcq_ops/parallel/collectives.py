"""Small communication helpers of the multi-rank queue strategies: who am I,
padded all-gathers of tensors whose first dimension differs across ranks,
raising the same error on every rank when one rank's input was bad, and a
count of the bytes this package's collectives send.

Every collective of ``dcq_ops.parallel`` goes through ``all_gather_single``,
``all_reduce``, ``reduce_scatter_single`` or ``broadcast`` below, so that
``traffic()`` sees all of them. The count is computed from the tensors' shapes
and dtypes, which the host knows: counting never reads the device.

Cost model (bytes *sent by this rank* per collective, the ring algorithms of
NCCL and gloo; W = world size of the group):

- all-gather of an input of b bytes (output W*b): ``(W - 1) * b``, i.e. (W-1)/W of
  the output;
- all-reduce of a tensor of b bytes: ``2 * (W - 1) / W * b`` (reduce-scatter, then
  all-gather);
- reduce-scatter of an input of b bytes (output b/W): ``(W - 1) / W * b``;
- broadcast of b bytes: ``b`` (a pipelined ring/chain: every rank but the last
  forwards the tensor once; counted as b on every rank, an upper bound).

A tree or NVLS algorithm sends other amounts; the model is what a scaling
estimate divides by the link bandwidth.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_MESSAGE_BYTES = 1024

_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}
DTYPE_NAMES = {0: "not a float tensor", 1: "float32", 2: "float16", 3: "bfloat16", 4: "float64"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class DistributedInputError(ValueError):
    """Raised on every rank whose own input was fine when another rank's was not."""


# --------------------------------------------------------------------------- traffic


@dataclass
class Traffic:
    """Bytes sent by this rank through this package's collectives (see the module
    docstring for the cost model), in all and per kind of collective."""

    bytes: float = 0.0
    calls: int = 0
    by_kind: dict = field(default_factory=dict)  # kind -> [calls, bytes]

    def add(self, kind: str, sent: float) -> None:
        self.bytes += sent
        self.calls += 1
        entry = self.by_kind.setdefault(kind, [0, 0.0])
        entry[0] += 1
        entry[1] += sent


_TOTAL = Traffic()
_OPEN: list[Traffic] = []


def traffic_total() -> Traffic:
    """The running count since the process started (or ``reset_traffic``)."""
    return _TOTAL


def reset_traffic() -> None:
    """Start the running count (``traffic_total``) again from zero."""
    global _TOTAL
    _TOTAL = Traffic()


@contextlib.contextmanager
def traffic():
    """Count the bytes this rank sends in the collectives issued inside the block::

        with collectives.traffic() as sent:
            loss = module(x, y, k)
        sent.bytes, sent.by_kind  # e.g. {"all_gather": [3, 4096.0], ...}

    Blocks may be nested; each sees what was issued while it was open."""
    count = Traffic()
    _OPEN.append(count)
    try:
        yield count
    finally:
        _OPEN.remove(count)


def _count(kind: str, sent: float) -> None:
    _TOTAL.add(kind, sent)
    for count in _OPEN:
        count.add(kind, sent)


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _world(group) -> int:
    return dist.get_world_size(group)


def all_gather_single(out: torch.Tensor, t: torch.Tensor, group=None, **kwargs):
    """``dist.all_gather_into_tensor``, counted: (W - 1) * bytes of ``t``."""
    _count("all_gather", (_world(group) - 1) * _nbytes(t))
    return _all_gather_into(out, t, group=group, **kwargs)


def all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM, group=None, **kwargs):
    """``dist.all_reduce``, counted: 2 (W - 1) / W * bytes of ``t``."""
    world = _world(group)
    _count("all_reduce", 2 * (world - 1) / world * _nbytes(t))
    return dist.all_reduce(t, op=op, group=group, **kwargs)


def reduce_scatter_single(out: torch.Tensor, t: torch.Tensor, op=dist.ReduceOp.SUM, group=None, **kwargs):
    """``dist.reduce_scatter_tensor``, counted: (W - 1) / W * bytes of the input ``t``."""
    world = _world(group)
    _count("reduce_scatter", (world - 1) / world * _nbytes(t))
    return _reduce_scatter_into(out, t, op=op, group=group, **kwargs)


def broadcast(t: torch.Tensor, group=None, **kwargs):
    """``dist.broadcast``, counted: the bytes of ``t`` (an upper bound, see the module docstring)."""
    _count("broadcast", _nbytes(t))
    return dist.broadcast(t, group=group, **kwargs)


# --------------------------------------------------------------------------- helpers


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size_and_rank(group=None) -> tuple[int, int]:
    """(world size, rank) in ``group`` (default: the default group); (1, 0) without a process group."""
    if not initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def dtype_code(t) -> int:
    return DTYPE_CODES.get(t.dtype, 0) if isinstance(t, torch.Tensor) else 0


def pad_rows(t: torch.Tensor, rows: int, fill=0) -> torch.Tensor:
    """``t`` [n, ...] with rows of ``fill`` appended up to ``rows`` (n <= rows)."""
    t = t.contiguous()
    if t.shape[0] < rows:
        t = torch.cat([t, t.new_full((rows - t.shape[0],) + tuple(t.shape[1:]), fill)])
    return t


def gather_padded(t: torch.Tensor, rows: int, group, world: int, fill=0) -> torch.Tensor:
    """All-gather [n_r, ...] tensors of every rank, each padded to ``rows`` rows: [world * rows, ...]."""
    t = pad_rows(t, rows, fill)
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
    """Every rank's rows concatenated in rank order (batch sizes may differ; ``sizes`` known on the host)."""
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
