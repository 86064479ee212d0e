"""The probe class of a launch of a Gluon sm_90 queue pass (``kernel``: "pipelined",
dcq_ops.triton.hopper, or "seesaw", dcq_ops.triton.hopper_seesaw): which kernel, what of
a launch matters to each program's control flow, and the small launch that reproduces it
(dcq_ops.triton.hopper_probe runs it in a child process before the kernel's first launch
of the class in a process). The kernel is part of the class: one kernel's verdict never
clears the other.

Each program of a Gluon kernel runs ``num_tiles = cdiv(k_end - k_begin, BLOCK_K)`` queue
tiles: its loop, its mbarrier phases and its TMA refills depend on that count only
through ``num_tiles`` below twice a period (no loop, no refill, the first phases) and
its residue modulo the period past it. The period (``period``) is that of the states:
each stage's barrier completes once every STAGES tiles, so its phase bit repeats every
2 * STAGES tiles; the seesaw's consumers take the tiles in turn and each one's hand-over
barrier completes once every 2 tiles, its phase bit repeating every 4; so lcm(2 *
STAGES, 4) (4 at 2 stages, 12 at 3, 8 at 4), and a count past twice it runs the
states of a representative count with the same residue, only more often. So a
class holds a representative count (``representative_tiles``) of the full splits and of
the queue's last split; whether the last tile is partial (TMA's zero fill past the
queue's end) and whether the last row block is (q's zero fill, masked stores); one or
several row blocks and splits (the program's offsets); the gradient and filtering (other
compiled branches); the operands' dtype and D (other descriptors, another BLOCK_D).
"""

from __future__ import annotations

import json
import math
from typing import NamedTuple


# The Gluon kernels a class can be of (dcq_ops.triton.hopper_launch ranks them).
KERNELS = ("pipelined", "seesaw")


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def period(stages: int) -> int:
    """The tiles after which a program's barrier phases repeat: lcm(2 * stages, 4)
    (see the module docstring)."""
    return math.lcm(2 * stages, 4)


def representative_tiles(tiles: int, stages: int) -> int:
    """A tile count with the same per-program control flow as ``tiles``: itself below
    twice the period, else the count in ``[2 * period, 3 * period)`` with the same
    residue modulo the period (see the module docstring)."""
    cycle = period(stages)
    cap = 2 * cycle
    return tiles if tiles < cap else cap + (tiles - cap) % cycle


class ProbeClass(NamedTuple):
    """One probe class (see the module docstring).

    Attributes
    ----------
    kernel : str
        The Gluon kernel probed, one of ``KERNELS``: "pipelined" or "seesaw".
    dtype : str
        The GEMM operands' dtype: "bfloat16", "float16" (or "float32" under the
        interpreter).
    dim : int
        D.
    compute_grad, filtering : bool
        Whether the kernel computes the accumulator; whether inter-class filtering is on.
    block_m, block_k, stages : int
        The kernel's tile and its number of queue-tile buffers.
    row_blocks : int
        1, or 2 for a launch of several row blocks.
    row_tail : bool
        Whether the last row block is partial.
    splits : int
        1, or 2 for a launch of several splits.
    tiles_full : int
        Representative tiles of a full split (0 with one split).
    tiles_last : int
        Representative tiles of the last split.
    tail_tile : bool
        Whether the last split's last tile is partial.
    """

    kernel: str
    dtype: str
    dim: int
    compute_grad: bool
    filtering: bool
    block_m: int
    block_k: int
    stages: int
    row_blocks: int
    row_tail: bool
    splits: int
    tiles_full: int
    tiles_last: int
    tail_tile: bool

    @classmethod
    def of_launch(cls, kernel: str, dtype, rows: int, queue_size: int, dim: int, split_size: int, compute_grad: bool,
                  filtering: bool, block_m: int, block_k: int, stages: int) -> "ProbeClass":
        """The class of a launch of ``kernel`` on ``rows`` rows over a queue of ``queue_size`` entries in
        splits of ``split_size`` (a multiple of ``block_k``; ``queue_size`` > 0).

        Raises
        ------
        ValueError
            ``kernel`` is not one of ``KERNELS``.
        """
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}, got {kernel!r}")
        num_splits = max(1, cdiv(queue_size, split_size))
        last_split = queue_size - (num_splits - 1) * split_size
        tiles_last = representative_tiles(cdiv(last_split, block_k), stages)
        tiles_full = representative_tiles(split_size // block_k, stages) if num_splits > 1 else 0
        if num_splits > 1 and tiles_last > tiles_full:
            # Both counts past twice the period: a full split a period longer keeps its
            # residue and stays at least as long as the last one (as in the launch).
            tiles_full += period(stages)
        return cls(str(kernel), str(dtype).replace("torch.", ""), int(dim), bool(compute_grad), bool(filtering),
                   int(block_m),
                   int(block_k), int(stages), 1 if rows <= block_m else 2, rows % block_m != 0,
                   1 if num_splits == 1 else 2, tiles_full, tiles_last, last_split % block_k != 0)

    def launch_shape(self) -> tuple[int, int, int]:
        """(rows, queue size, split size) of the small launch that reproduces the class."""
        rows = (self.row_blocks - 1) * self.block_m + (self.block_m // 2 + 1 if self.row_tail else self.block_m)
        last = (self.tiles_last - 1) * self.block_k + (self.block_k // 2 + 5 if self.tail_tile else self.block_k)
        split_size = self.tiles_full * self.block_k if self.splits > 1 else self.tiles_last * self.block_k
        return rows, (self.splits - 1) * split_size + last, split_size

    def words(self) -> str:
        """The class in words, for warnings and reports."""
        return (f"the {self.kernel} kernel, {self.dtype} operands, D={self.dim}, "
                f"{'with' if self.compute_grad else 'without'} gradient"
                f"{', filtering' if self.filtering else ''}, {self.row_blocks} row block(s)"
                f"{' (the last partial)' if self.row_tail else ''}, {self.splits} split(s) of "
                f"{self.tiles_full or self.tiles_last} tile(s) (representative), the last split "
                f"{self.tiles_last} tile(s){' (the last partial)' if self.tail_tile else ''}, "
                f"{self.block_m}x{self.block_k} tiles, {self.stages} stages")

    def to_json(self) -> str:
        return json.dumps(self._asdict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "ProbeClass":
        """The class written by ``to_json``; ValueError naming what is missing or wrong."""
        data = json.loads(text)
        if not isinstance(data, dict) or set(data) != set(cls._fields):
            raise ValueError(f"a probe class needs the fields {sorted(cls._fields)}, got {data!r}")
        types = {"kernel": str, "dtype": str, "compute_grad": bool, "filtering": bool, "row_tail": bool,
                 "tail_tile": bool}
        for name in cls._fields:
            expected = types.get(name, int)
            if type(data[name]) is not expected:
                raise ValueError(f"probe class field {name!r} must be {expected.__name__}, got {data[name]!r}")
        if data["kernel"] not in KERNELS:
            raise ValueError(f"probe class field 'kernel' must be one of {', '.join(KERNELS)}, got {data['kernel']!r}")
        return cls(**{name: data[name] for name in cls._fields})
