"""dcq_ops: fused kernels for face-recognition training with a Dynamic Class Queue.

Public API (DESIGN.md): dcq_cross_entropy, ClassQueue, DCQLoss, backends().
"""

from dcq_ops import reference
from dcq_ops._extension import EXTENSION_ERROR, extension_loaded, has_cuda_kernels
from dcq_ops.backends import backends, select_backend
from dcq_ops.distributed import DistributedInputError, ShardedClassQueue, shuffled_forward
from dcq_ops.loss import DCQLoss
from dcq_ops.heads import DCQHead, FullSoftmaxHead, PartialFCHead, build_head
from dcq_ops.margin import MarginConfig, margin_from
from dcq_ops.momentum import MomentumEncoder
from dcq_ops.ops.margin_ce import dcq_cross_entropy
from dcq_ops.queue import ClassQueue

__version__ = "0.1.0"

__all__ = [
    "ClassQueue",
    "DistributedInputError",
    "ShardedClassQueue",
    "shuffled_forward",
    "DCQHead",
    "DCQLoss",
    "FullSoftmaxHead",
    "MomentumEncoder",
    "PartialFCHead",
    "build_head",
    "EXTENSION_ERROR",
    "MarginConfig",
    "backends",
    "dcq_cross_entropy",
    "extension_loaded",
    "has_cuda_kernels",
    "margin_from",
    "reference",
    "select_backend",
]
