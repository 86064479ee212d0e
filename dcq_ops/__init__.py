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
# Training and evaluation (issue 4).
from dcq_ops.backbones import IResNet, SmallCNN, build_backbone
from dcq_ops.data import ImageFolder, TensorImages, TwoViewBatchSampler, TwoViewDataset
from dcq_ops.synthetic import SyntheticConfig, make_synthetic

# Loaded on first use: importing dcq_ops.train / dcq_ops.eval here would make
# `python -m dcq_ops.train` (and .eval) warn that the module was imported twice.
# (`train`, the function, is not exported: it would shadow the module.)
_LAZY = {"TrainConfig": "train", "Trainer": "train", "evaluate_bin": "eval", "kfold_accuracy": "eval",
         "load_bin": "eval", "tar_at_far": "eval"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f"dcq_ops.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'dcq_ops' has no attribute {name!r}")

__version__ = "0.1.0"

__all__ = [
    "IResNet",
    "ImageFolder",
    "SmallCNN",
    "SyntheticConfig",
    "TensorImages",
    "TrainConfig",
    "Trainer",
    "TwoViewBatchSampler",
    "TwoViewDataset",
    "build_backbone",
    "evaluate_bin",
    "kfold_accuracy",
    "load_bin",
    "make_synthetic",
    "tar_at_far",
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
