"""The thin training application built on the dcq_ops library: backbones, data
sources (synthetic long-tailed identities, image folders, insightface RecordIO,
two-view pairs), heads (DCQ, full softmax, Partial FC), verification, the loop
and its command lines (``python -m dcq_ops.train``, ``dcq-train``; ``python -m
dcq_ops.eval``, in :mod:`dcq_ops.training.evaluate`; ``python -m
dcq_ops.training.recordio``).

Nothing in the library (``dcq_ops`` outside this folder) imports it. Nor does
this package import ``recordio`` or ``evaluate``, the modules run with
``python -m``: runpy warns when the module it runs was imported first.
"""

from dcq_ops.training.backbones import IResNet, SmallCNN, build_backbone
from dcq_ops.training.data import ImageFolder, TensorImages, TwoViewBatchSampler, TwoViewDataset, check_data_path
from dcq_ops.training.heads import DCQHead, FullSoftmaxHead, PartialFCHead, build_head
from dcq_ops.training.images import ImageDecodeError
from dcq_ops.training.loop import TrainConfig, Trainer, load_backbone, train
from dcq_ops.training.synthetic import SyntheticConfig, make_synthetic
from dcq_ops.training.verification import evaluate_bin, kfold_accuracy, load_bin, tar_at_far

__all__ = [
    "DCQHead", "FullSoftmaxHead", "IResNet", "ImageDecodeError", "ImageFolder", "PartialFCHead", "RecordIOImages",
    "SmallCNN", "SyntheticConfig", "TensorImages", "TrainConfig", "Trainer", "TwoViewBatchSampler", "TwoViewDataset",
    "build_backbone", "build_head", "check_data_path", "evaluate_bin", "kfold_accuracy", "load_backbone", "load_bin",
    "make_synthetic", "pack_folder", "tar_at_far", "train",
]


def __getattr__(name):
    # The RecordIO names load on first use, so that `python -m dcq_ops.training.recordio`
    # runs a module that importing this package has not already imported.
    if name in ("RecordIOImages", "pack_folder"):
        from dcq_ops.training import recordio
        return getattr(recordio, name)
    raise AttributeError(f"module 'dcq_ops.training' has no attribute {name!r}")
