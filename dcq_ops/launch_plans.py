"""The launch plan of a fused call: what changes the kernels a call of "triton" or "chunked"
runs, read without running them. The first-contact check (dcq_ops.first_contact) keys on it,
so that a batch size with another split plan or another tail block is checked on its own,
and compares all the rows of the launch's last row block.

- **triton**: ``dcq_ops.triton.launch.launch_plan``: the tile (BLOCK_M, BLOCK_K), the split of
  the queue, the rows of the last row block, the entries of the last split past its last
  full ``align`` (a multiple of every candidate BLOCK_K), and the autotuner's buckets.
- **chunked on the CPU**: ``csrc/cpu/queue_pass.cpp`` (``make_plan``): row blocks of at most
  256 rows of equal size, split into register blocks of 6 rows by the AVX-512 tile GEMM;
  queue splits so that the tasks are a multiple of the thread count; chunks of the queue
  whose width (from the L2 cache) is a multiple of 64. The plan keys on the register tails
  of the full and the last row block, the number of splits and the split lengths modulo 64.
- **chunked on CUDA**: ``csrc/cuda/queue_pass.cu`` (``chunk_size``): one epilogue block per
  row, the queue in chunks of a multiple of 256 entries (from the L2 cache and the rows);
  the plan keys on the chunk and the last chunk's length.

Each plan is a tuple of ints ``(last_row_block, ...)``: its first element is the number of
rows of the last row block (the rows the check always compares).
"""

from __future__ import annotations

import functools
import math

import torch

# csrc/cpu/queue_pass.cpp: kMaxBlockRows; csrc/cpu/tile_gemm_avx512.cpp: kRowBlock and the
# panel width every chunk is a multiple of.
CPU_MAX_BLOCK_ROWS = 256
CPU_REGISTER_ROWS = 6
CPU_PANEL = 64
# csrc/cuda/queue_pass.cu: chunks are a multiple of 256 entries, at most 256 x 32, and their
# logits within 256 MiB.
CUDA_CHUNK_ALIGN = 256
CUDA_MAX_CHUNK = 256 * 32
CUDA_LOGITS_BUDGET = 256 << 20


def _cpu_chunked_plan(rows: int, queue_size: int, threads: int) -> tuple:
    blocks = -(-rows // CPU_MAX_BLOCK_ROWS)
    block_rows = -(-rows // blocks)
    row_blocks = -(-rows // block_rows)
    last_rows = rows - (row_blocks - 1) * block_rows
    splits = 1 if row_blocks % threads == 0 else threads // math.gcd(row_blocks, threads)
    split_size = -(-queue_size // splits)
    last_split = queue_size - (splits - 1) * split_size
    tail = last_rows % CPU_REGISTER_ROWS or min(last_rows, CPU_REGISTER_ROWS)
    return (tail, block_rows % CPU_REGISTER_ROWS, min(block_rows, CPU_REGISTER_ROWS), row_blocks > 1, splits,
            split_size % CPU_PANEL, last_split % CPU_PANEL)


@functools.lru_cache(maxsize=64)
def _cuda_l2_bytes(index: int) -> int:
    return int(getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 0) or (40 << 20))


def _cuda_chunked_plan(rows: int, queue_size: int, dim: int, element_size: int, device: torch.device) -> tuple:
    l2 = _cuda_l2_bytes(device.index if device.index is not None else torch.cuda.current_device())
    chunk = max(l2 // 4 // (dim * element_size), CUDA_CHUNK_ALIGN)
    chunk = min(chunk, CUDA_LOGITS_BUDGET // (4 * max(rows, 1)))
    chunk = max(CUDA_CHUNK_ALIGN, chunk // CUDA_CHUNK_ALIGN * CUDA_CHUNK_ALIGN)
    chunk = min(chunk, CUDA_MAX_CHUNK, max(queue_size, 1))
    return (1, chunk, queue_size % chunk)


def gemm_dtype(embeddings_dtype: torch.dtype, queue_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the GEMM operands: the queue's (float64 when an input is)."""
    return torch.float64 if torch.float64 in (embeddings_dtype, queue_dtype) else queue_dtype


def launch_plan(backend: str, rows: int, queue_size: int, dim: int, embeddings_dtype: torch.dtype,
                queue_dtype: torch.dtype, compute_grad: bool, device: torch.device) -> tuple:
    """The launch plan of a call of ``backend`` (see the module docstring).

    Parameters
    ----------
    backend : str
        "triton" or "chunked".
    rows, queue_size, dim : int
        N, K and D of the call.
    embeddings_dtype, queue_dtype : torch.dtype
    compute_grad : bool
    device : torch.device

    Returns
    -------
    tuple
        Ints, bools and (triton) the sm_90 kernel's name; the first element is the number of rows of the launch's last row
        block.
    """
    device = torch.device(device)
    if rows == 0 or queue_size == 0:
        return (0,)
    if backend == "triton":
        from dcq_ops.triton import launch

        plan = launch.launch_plan(rows, queue_size, dim, gemm_dtype(embeddings_dtype, queue_dtype), compute_grad,
                                  device)
        return (plan.last_row_block, plan.block_m, plan.block_k, plan.autotuned, plan.split_size, plan.num_splits,
                plan.queue_tail, plan.row_bucket, plan.split_bucket, plan.sm90_kernel)
    if device.type == "cuda":
        return _cuda_chunked_plan(rows, queue_size, dim, gemm_dtype(embeddings_dtype, queue_dtype).itemsize, device)
    return _cpu_chunked_plan(rows, queue_size, max(1, torch.get_num_threads()))
