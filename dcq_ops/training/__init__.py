"""The thin training application built on the dcq_ops library: backbones, data
sources (synthetic long-tailed identities, image folders, insightface RecordIO,
two-view pairs), heads (DCQ, full softmax, Partial FC), verification, the
trainer (:mod:`dcq_ops.training.trainer`, with its parts in ``config``,
``schedules``, ``run_log``, ``checkpoint``, ``step_guard``, ``runtime``,
``levers``, ``build``, ``periodic_eval``) and its command lines (``python -m dcq_ops.train``, ``dcq-train``; ``python -m
dcq_ops.eval``, in :mod:`dcq_ops.training.evaluate`; ``python -m
dcq_ops.training.recordio``).

Nothing in the library (``dcq_ops`` outside this folder) imports it. Nor does
this package import ``recordio`` or ``evaluate``, the modules run with
``python -m``: runpy warns when the module it runs was imported first (and
the RecordIO package loads only for a RecordIO set).
"""

from dcq_ops.training.backbones import IResNet, SmallCNN, build_backbone
from dcq_ops.training.checkpoint import load_backbone
from dcq_ops.training.config import ConfigError, TrainConfig
from dcq_ops.training.data import TwoViewBatchSampler, TwoViewDataset
from dcq_ops.training.heads import DCQHead, FullSoftmaxHead, PartialFCHead, build_head
from dcq_ops.training.images import ImageDecodeError
from dcq_ops.training.sources import ImageFolder, TensorImages, check_data_path
from dcq_ops.training.step_guard import TrainingError
from dcq_ops.training.synthetic import SyntheticConfig, make_synthetic
from dcq_ops.training.trainer import Trainer, train
from dcq_ops.training.verification import evaluate_bin, kfold_accuracy, load_bin, tar_at_far

__all__ = [
    "ConfigError", "DCQHead", "FullSoftmaxHead", "IResNet", "ImageDecodeError", "ImageFolder", "PartialFCHead",
    "RecordIOImages", "SmallCNN", "SyntheticConfig", "TensorImages", "TrainConfig", "Trainer", "TrainingError",
    "TwoViewBatchSampler", "TwoViewDataset", "build_backbone", "build_head", "check_data_path", "evaluate_bin",
    "kfold_accuracy", "load_backbone", "load_bin", "make_synthetic", "pack_folder", "tar_at_far", "train",
]


def __getattr__(name):
    # The RecordIO names load on first use: importing the application does not import
    # the RecordIO package (`python -m dcq_ops.training.recordio` runs it).
    if name in ("RecordIOImages", "pack_folder"):
        from dcq_ops.training import recordio
        return getattr(recordio, name)
    raise AttributeError(f"module 'dcq_ops.training' has no attribute {name!r}")
