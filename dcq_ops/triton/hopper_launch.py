"""Whether and which Gluon sm_90 kernel runs the queue pass instead of
kernels.queue_pass_kernel (the "classic" kernel): the seesaw
(dcq_ops.triton.hopper_seesaw) or the pipelined one (dcq_ops.triton.hopper); under
Triton's CPU interpreter their plain-Triton twin (dcq_ops.triton.hopper_twin), the
algebra of both.

DCQ_OPS_SM90_KERNEL is one of ``CHOICES``: ``classic`` forces the classic kernel,
``seesaw`` or ``pipelined`` that kernel where it applies, behind its probe, else the
classic one; another value raises ValueError. Unset on a GPU it is the ranked chain
(``RANKED``): the seesaw, then the pipelined kernel, then the classic one, each Gluon
kernel used only where it applies and its own probe cleared the launch's class. Before
a kernel's first launch of a probe class in a process (dcq_ops.triton.hopper_probe_class:
the kernel, and the control flow of each program), a child process runs it and judges it
(dcq_ops.triton.hopper_probe, its verdict cached on disk): a hang, a crash, a compile or
launch error or wrong numbers there move that class to the next kernel of the chain (the
seesaw's to the pipelined kernel, probed in turn; the pipelined kernel's, or an explicit
choice's, to the classic one), each time with a warning and a recorded demotion.

Where a kernel applies (``RULES``, one entry per kernel): sm_90, 16-bit operands, its
tile (64 x 64, 8 warps in all; 2 buffers, the seesaw up to 4 where they fit) when a tile configuration is given, a split
size that is a multiple of its BLOCK_K (a tile never straddles two splits), a non-empty
queue, 16-byte aligned operands (TMA), D a multiple of 8 with a padded D from 64 to 512;
the seesaw also BLOCK_M = BLOCK_K. Under the interpreter the default is ``classic`` and
no probe runs: the twin stands in for the kernel that a test asks for by name where that
kernel's structural rules hold on the interpreter's tiles (the split multiple, TMA's
16-byte rows, the seesaw's BLOCK_M = BLOCK_K), the GPU's tile and D range aside.
"""

from __future__ import annotations

import os

import torch
import triton

from typing import Callable, NamedTuple

from dcq_ops.triton import hopper, hopper_probe, hopper_seesaw
from dcq_ops.triton.configs import block_d_of
from dcq_ops.triton.hopper_probe_class import ProbeClass
from dcq_ops.triton.kernels import INTERPRETED

ENV = "DCQ_OPS_SM90_KERNEL"
# The values of DCQ_OPS_SM90_KERNEL.
CHOICES = ("classic", "pipelined", "seesaw")
# What selected_kernel() says where the variable is not set on a GPU: the Gluon kernels
# of CHAIN, best first by the cycle model (benchmarks/NOTES.md, "The pipelined sm_90
# kernel": the seesaw 67-84% of bf16 peak at D = 512, the pipelined 52-53%), then the classic one.
RANKED = "ranked"
CHAIN = ("seesaw", "pipelined")


class Rules(NamedTuple):
    """Where one Gluon kernel applies (see the module docstring); its launch's tile.

    Attributes
    ----------
    block_m, block_k : int
        Its tile (the descriptors' blocks); an explicit configuration must name it.
    num_warps : int
        Its warps in all (an explicit configuration's num_warps).
    stages : callable
        Its queue-tile buffers at a padded D (part of the probe class): 2 for the
        pipelined kernel, ``hopper_seesaw.stages`` for the seesaw.
    min_block_d, max_block_d : int
        The padded D it compiles for.
    square : bool
        Whether it needs BLOCK_M = BLOCK_K (under the interpreter too).
    """

    block_m: int
    block_k: int
    num_warps: int
    stages: Callable[[int], int]
    min_block_d: int
    max_block_d: int
    square: bool


RULES = {
    "pipelined": Rules(hopper.BLOCK_M, hopper.BLOCK_K, hopper.NUM_WARPS, lambda block_d: hopper.STAGES, 64, 512,
                       False),
    # Two consumer warpgroups: the default partition's NUM_WARPS and the worker's 4.
    "seesaw": Rules(hopper_seesaw.BLOCK_M, hopper_seesaw.BLOCK_K, 2 * hopper_seesaw.NUM_WARPS, hopper_seesaw.stages,
                    hopper_seesaw.MIN_BLOCK_D, hopper_seesaw.MAX_BLOCK_D, True),
}

# Under Triton 3.6 the accumulator's conditional rescale (only when some row's
# max grew) costs 52 B of spills in the gradient kernel (ptxas, sm_90a; 252
# registers and none without it), under 3.8 none (218 registers):
# benchmarks/hopper_sass.py. Both give the same bits.
RESCALE_ON_GROWTH = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 8)
# The seesaw rescales only on growth under both Tritons: 0 spills either way (255
# registers; benchmarks/hopper_sass.py), and a tile whose rows' maxima did not grow
# skips the 128 FMULs of each consumer's half of the accumulator.
SEESAW_RESCALE_ON_GROWTH = True

# The schedule of the loop (dcq_ops.triton.hopper): False issues each tile's load
# a tile ahead and runs the softmax after both GEMMs; True is FA3's order (the
# softmax of tile i+1 under P_i W_i, the load of tile i+2 exposed). Until a GPU
# times them, the load-ahead order (benchmarks/NOTES.md, "The pipelined sm_90 kernel").
OVERLAP_SOFTMAX = False


def default_kernel() -> str:
    """What DCQ_OPS_SM90_KERNEL is when not set: ``RANKED`` (the chain, each kernel behind
    its probe), ``classic`` under Triton's interpreter (see the module docstring)."""
    return "classic" if INTERPRETED else RANKED


def selected_kernel() -> str:
    """What DCQ_OPS_SM90_KERNEL asks for: one of ``CHOICES``, or ``default_kernel()`` when
    it is not set.

    Raises
    ------
    ValueError
        The variable is set to something else than ``classic``, ``pipelined`` or ``seesaw``.
    """
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return default_kernel()
    if value not in CHOICES:
        raise ValueError(f"{ENV} must be one of {', '.join(CHOICES)}, got {value!r}")
    return value


def chain() -> tuple[str, ...]:
    """The Gluon kernels to try, in order, for what DCQ_OPS_SM90_KERNEL asks for: ``CHAIN``
    for ``RANKED``, the one kernel asked for (no chain through the other), none for
    ``classic``."""
    choice = selected_kernel()
    return CHAIN if choice == RANKED else () if choice == "classic" else (choice,)


def applies(kernel: str, q_gemm: torch.Tensor, queue_weights: torch.Tensor, split_size: int, block_m: int,
            block_k: int, config: dict | None, capability: tuple[int, int] | None) -> bool:
    """Whether ``kernel`` can run this queue pass (``RULES[kernel]``; see the module
    docstring), its probe aside. ``block_m`` and ``block_k`` are the plan's tile (under
    the interpreter the interpreter's), ``config`` an explicit configuration or None,
    ``capability`` the device's (None under the interpreter)."""
    rules = RULES[kernel]
    if queue_weights.shape[0] == 0 or split_size % block_k or (rules.square and block_m != block_k):
        return False
    if q_gemm.data_ptr() % 16 or queue_weights.data_ptr() % 16:  # TMA's base alignment
        return False
    dim = q_gemm.shape[1]
    if INTERPRETED:  # the twin, on whatever dtype the interpreter multiplies
        return dim * q_gemm.element_size() % 16 == 0
    if capability != (9, 0) or q_gemm.dtype not in (torch.float16, torch.bfloat16) or not hopper.AVAILABLE:
        return False
    if config is not None and (config["BLOCK_M"], config["BLOCK_K"], config["num_warps"]) != (
            rules.block_m, rules.block_k, rules.num_warps):
        return False
    return ((block_m, block_k) == (rules.block_m, rules.block_k) and dim % 8 == 0
            and rules.min_block_d <= block_d_of(dim) <= rules.max_block_d)


def choose_kernel(q_gemm: torch.Tensor, queue_weights: torch.Tensor, split_size: int, block_m: int, block_k: int,
                  config: dict | None, capability: tuple[int, int] | None, *, compute_grad: bool = True,
                  filtering: bool = False) -> str | None:
    """The Gluon kernel that runs this queue pass ("seesaw" or "pipelined"), or None for the
    classic kernel: the first of ``chain()`` that ``applies`` and, on a GPU, whose probe
    cleared the launch's class (``probe_class``; a failed probe warns once, records the
    demotion and goes on down the chain). ``compute_grad`` and ``filtering`` are the
    kernel's branches (part of the probe class)."""
    kernels = [kernel for kernel in chain()
               if applies(kernel, q_gemm, queue_weights, split_size, block_m, block_k, config, capability)]
    for i, kernel in enumerate(kernels):
        if INTERPRETED:  # the twin: no probe
            return kernel
        fallback = hopper_probe.FALLBACK_PIPELINED if "pipelined" in kernels[i + 1:] else hopper_probe.FALLBACK
        if hopper_probe.cleared(probe_class(kernel, q_gemm, queue_weights, split_size, compute_grad, filtering),
                                q_gemm.device, fallback):
            return kernel
    return None


def probe_class(kernel: str, q_gemm: torch.Tensor, queue_weights: torch.Tensor, split_size: int, compute_grad: bool,
                filtering: bool) -> ProbeClass:
    """The probe class of a launch of ``kernel`` (its tile and stages, ``RULES``;
    ``split_size`` a multiple of its BLOCK_K, a non-empty queue)."""
    rules = RULES[kernel]
    return ProbeClass.of_launch(kernel, q_gemm.dtype, q_gemm.shape[0], queue_weights.shape[0], q_gemm.shape[1],
                                split_size, compute_grad, filtering, rules.block_m, rules.block_k,
                                rules.stages(block_d_of(q_gemm.shape[1])))


def gluon_descriptors(q_gemm: torch.Tensor, queue_weights: torch.Tensor):
    """The Gluon kernel's host tensor descriptors (TMA): q [N, D] in blocks of
    [BLOCK_M, BLOCK_D] and the queue [K, D] in blocks of [BLOCK_K, BLOCK_D], both
    NVMMA-swizzled (Triton splits each block into the boxes TMA allows), zero-filled
    outside the tensor. benchmarks/hopper_sass.py compiles the kernel for exactly
    these types (tests/test_triton_hopper.py checks it)."""
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    gl_dtype = gl.bfloat16 if q_gemm.dtype == torch.bfloat16 else gl.float16
    block_d = block_d_of(q_gemm.shape[1])
    out = []
    for tensor, rows in ((q_gemm, hopper.BLOCK_M), (queue_weights, hopper.BLOCK_K)):
        layout = gl.NVMMASharedLayout.get_default_for([rows, block_d], gl_dtype)
        out.append(TensorDescriptor(tensor, list(tensor.shape), list(tensor.stride()), [rows, block_d], layout))
    return tuple(out)


def launch(grid, q_gemm, labels, queue_weights, queue_labels, workspace, rows, queue_size, dim, num_splits,
           split_size, scale_log2, threshold, compute_grad, block_m, block_k, input_precision, *, kernel: str) -> None:
    """``kernel``'s queue pass ("seesaw" or "pipelined", as ``choose_kernel`` said) over
    ``grid`` into the workspace (the repair kernel runs after it as after the classic
    one); under the interpreter the twin for either."""
    block_d = block_d_of(dim)
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
    if kernel == "seesaw":
        hopper_seesaw.launch(grid, q_desc, w_desc, labels, queue_labels, workspace[:3], scalars,
                             filtering=threshold > 0, compute_grad=compute_grad,
                             rescale_on_growth=SEESAW_RESCALE_ON_GROWTH)
        return
    hopper.hopper_queue_pass_kernel[grid](
        q_desc, w_desc, labels, queue_labels, *workspace[:3], *scalars, FILTER=threshold > 0,
        COMPUTE_GRAD=compute_grad, STAGES=hopper.STAGES, RESCALE_ON_GROWTH=RESCALE_ON_GROWTH,
        OVERLAP_SOFTMAX=OVERLAP_SOFTMAX, num_warps=hopper.NUM_WARPS)
