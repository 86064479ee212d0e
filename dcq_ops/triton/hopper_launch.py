"""Whether and how the queue pass runs the pipelined sm_90 kernel
(dcq_ops.triton.hopper; under Triton's CPU interpreter its plain-Triton twin,
dcq_ops.triton.hopper_twin) instead of kernels.queue_pass_kernel.

The sm_90 default, behind its probe: DCQ_OPS_SM90_KERNEL is ``pipelined`` unless
set (``classic`` forces kernels.queue_pass_kernel; another value raises
ValueError). Before its first launch of a probe class in a process
(dcq_ops.triton.hopper_probe_class: the control flow of each program), a child
process runs it and judges it (dcq_ops.triton.hopper_probe, its verdict cached on
disk): a hang, a crash, a compile or launch error or wrong numbers there make the
classic kernel run that class, with a warning and a recorded demotion. Under
Triton's interpreter the default is ``classic`` and no probe runs: the twin stands
in for the Gluon kernel where a test asks for it by name (the interpreter is no
sm_90). Where the pipelined kernel does not apply (another architecture or dtype,
a split size that is not a multiple of its BLOCK_K, an empty queue, D not a
multiple of 8 or above 512, an explicit tile configuration other than its own),
the classic kernel runs.
"""

from __future__ import annotations

import os

import torch
import triton

from dcq_ops.triton import hopper, hopper_probe
from dcq_ops.triton.hopper_probe_class import ProbeClass
from dcq_ops.triton.kernels import INTERPRETED

ENV = "DCQ_OPS_SM90_KERNEL"
CHOICES = ("classic", "pipelined")

# Under Triton 3.6 the accumulator's conditional rescale (only when some row's
# max grew) costs 52 B of spills in the gradient kernel (ptxas, sm_90a; 252
# registers and none without it), under 3.8 none (218 registers):
# benchmarks/hopper_sass.py. Both give the same bits.
RESCALE_ON_GROWTH = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8)

# The schedule of the loop (dcq_ops.triton.hopper): False issues each tile's load
# a tile ahead and runs the softmax after both GEMMs; True is FA3's order (the
# softmax of tile i+1 under P_i W_i, the load of tile i+2 exposed). Until a GPU
# times them, the load-ahead order (benchmarks/NOTES.md, "The pipelined sm_90 kernel").
OVERLAP_SOFTMAX = False


def default_kernel() -> str:
    """The sm_90 kernel when DCQ_OPS_SM90_KERNEL is not set: ``pipelined`` (behind its
    probe), ``classic`` under Triton's interpreter (see the module docstring)."""
    return "classic" if INTERPRETED else "pipelined"


def selected_kernel() -> str:
    """The sm_90 queue-pass kernel that DCQ_OPS_SM90_KERNEL asks for (``default_kernel()``
    when it is not set).

    Raises
    ------
    ValueError
        The variable is set to something else than ``classic`` or ``pipelined``.
    """
    value = os.environ.get(ENV, "").strip().lower() or default_kernel()
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def applies(q_gemm: torch.Tensor, queue_weights: torch.Tensor, split_size: int, block_k: int,
            config: dict | None, capability: tuple[int, int] | None, *, compute_grad: bool = True,
            filtering: bool = False) -> bool:
    """Whether the pipelined kernel runs this queue pass (see the module's docstring):
    it applies, and on a GPU its probe cleared the launch's class (``probe_class``).
    ``capability`` is the device's (None under the interpreter); ``block_k`` the
    tile of the plan (under the interpreter the interpreter's); ``compute_grad`` and
    ``filtering`` the kernel's branches (part of the probe class)."""
    if selected_kernel() != "pipelined" or queue_weights.shape[0] == 0 or split_size % block_k:
        return False
    if q_gemm.data_ptr() % 16 or queue_weights.data_ptr() % 16:  # TMA's base alignment
        return False
    dim = q_gemm.shape[1]
    if INTERPRETED:  # the twin, on whatever dtype the interpreter multiplies
        return dim * q_gemm.element_size() % 16 == 0
    if capability != (9, 0) or q_gemm.dtype not in (torch.float16, torch.bfloat16) or not hopper.AVAILABLE:
        return False
    if config is not None and (config["BLOCK_M"], config["BLOCK_K"], config["num_warps"]) != (
            hopper.BLOCK_M, hopper.BLOCK_K, hopper.NUM_WARPS):
        return False
    if not (block_k == hopper.BLOCK_K and dim % 8 == 0 and 64 <= _block_d(dim) <= 512):
        return False
    return hopper_probe.cleared(probe_class(q_gemm, queue_weights, split_size, compute_grad, filtering),
                                q_gemm.device)


def probe_class(q_gemm: torch.Tensor, queue_weights: torch.Tensor, split_size: int, compute_grad: bool,
                filtering: bool) -> ProbeClass:
    """The probe class of a launch of the Gluon kernel (its tile and stages; ``split_size``
    a multiple of its BLOCK_K, a non-empty queue)."""
    return ProbeClass.of_launch(q_gemm.dtype, q_gemm.shape[0], queue_weights.shape[0], q_gemm.shape[1],
                                split_size, compute_grad, filtering, hopper.BLOCK_M, hopper.BLOCK_K, hopper.STAGES)


def _block_d(dim: int) -> int:
    return max(16, 1 << max(0, int(dim) - 1).bit_length())


def gluon_descriptors(q_gemm: torch.Tensor, queue_weights: torch.Tensor):
    """The Gluon kernel's host tensor descriptors (TMA): q [N, D] in blocks of
    [BLOCK_M, BLOCK_D] and the queue [K, D] in blocks of [BLOCK_K, BLOCK_D], both
    NVMMA-swizzled (Triton splits each block into the boxes TMA allows), zero-filled
    outside the tensor. benchmarks/hopper_sass.py compiles the kernel for exactly
    these types (tests/test_triton_hopper.py checks it)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gl_dtype = gl.bfloat16 if q_gemm.dtype == torch.bfloat16 else gl.float16
    block_d = _block_d(q_gemm.shape[1])
    out = []
    for tensor, rows in ((q_gemm, hopper.BLOCK_M), (queue_weights, hopper.BLOCK_K)):
        layout = gl.NVMMASharedLayout.get_default_for([rows, block_d], gl_dtype)
        out.append(TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [rows, block_d], layout))
    return tuple(out)


def launch(grid, q_gemm, labels, queue_weights, queue_labels, workspace, rows, queue_size, dim, num_splits,
           split_size, scale_log2, threshold, compute_grad, block_m, block_k, input_precision) -> None:
    """The pipelined queue pass over ``grid`` into the workspace (the repair kernel
    runs after it as after the classic one)."""
    block_d = _block_d(dim)
    scalars = (rows, queue_size, dim, num_splits, split_size, scale_log2, threshold)
    if INTERPRETED:
        from triton.tools.tensor_descriptor import TensorDescriptor

        from dcq_ops.triton.hopper_twin import hopper_twin_queue_pass_kernel
        q_desc = TensorDescriptor.from_tensor(q_gemm, [block_m, block_d])
        w_desc = TensorDescriptor.from_tensor(queue_weights, [block_k, block_d])
        hopper_twin_queue_pass_kernel[grid](
            q_desc, w_desc, labels, queue_labels, *workspace[:3], *scalars, FILTER=threshold > 0,
            COMPUTE_GRAD=compute_grad, RESCALE_ON_GROWTH=True, INPUT_PRECISION=input_precision,
            BLOCK_M=block_m, BLOCK_K=block_k, BLOCK_D=block_d)
        return
    q_desc, w_desc = gluon_descriptors(q_gemm, queue_weights)
    hopper.hopper_queue_pass_kernel[grid](
        q_desc, w_desc, labels, queue_labels, *workspace[:3], *scalars, FILTER=threshold > 0,
        COMPUTE_GRAD=compute_grad, STAGES=hopper.STAGES, RESCALE_ON_GROWTH=RESCALE_ON_GROWTH,
        OVERLAP_SOFTMAX=OVERLAP_SOFTMAX, num_warps=hopper.NUM_WARPS)
