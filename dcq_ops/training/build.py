"""The parts of a run that its config determines, built from it: the training data
and the verification sets, the backbone and the head, the optimizer and the
learning-rate schedule."""

from __future__ import annotations

import functools

import torch
from torch import nn

from dcq_ops.training.backbones import build_backbone
from dcq_ops.training.config import ConfigError, TrainConfig
from dcq_ops.training.data import TwoViewDataset
from dcq_ops.training.heads import build_head
from dcq_ops.training.sources import ImageFolder
from dcq_ops.training.schedules import lr_factor
from dcq_ops.training.synthetic import load_synthetic


def build_data(config: TrainConfig):
    """(two-view training dataset, number of classes, input channels, verification sets
    {name: (images, labels)})."""
    augment = "default" if config.augment else None
    if config.data == "synthetic":
        data = load_synthetic(config.synthetic_identities, config.synthetic_eval_identities, config.image_size,
                              config.synthetic_seed, config.synthetic_median_images, config.synthetic_max_images)
        dataset = TwoViewDataset(data.train_images, data.train_labels, seed=config.seed, augment=augment)
        return dataset, data.num_classes, data.train_images.shape[1], data.verification_sets()
    # Imported here: importing the application does not import the RecordIO package.
    from dcq_ops.training.recordio import RecordIOImages, is_recordio
    if is_recordio(config.data):  # insightface's train.rec + train.idx (a .rec, or a folder holding them)
        source = RecordIOImages(config.data, image_size=config.image_size)
        num_classes = source.num_classes
    else:
        source = ImageFolder(config.data, image_size=config.image_size)
        num_classes = len(source.classes)
    dataset = TwoViewDataset(source, seed=config.seed, augment=augment)
    return dataset, num_classes, 3, {}


def build_models(config: TrainConfig, num_classes: int, channels: int, world_size: int,
                 device: torch.device) -> tuple[nn.Module, nn.Module]:
    """(backbone, head) on ``device``, in this order (both draw their initial weights);
    ConfigError when the DCQ queue cannot hold one global batch."""
    backbone = build_backbone(config.backbone, in_channels=channels, embedding_size=config.embedding_size,
                              image_size=config.image_size, width=config.width, dropout=config.dropout).to(device)
    head_kwargs = {}
    if config.head == "dcq":
        # One process: no process group, the queue is its own whatever --queue-mode says.
        head_kwargs = dict(queue_size=config.queue_size, backend=config.backend, validate=config.validate,
                           distributed="none" if world_size == 1 else config.queue_mode)
    head = build_head(config.head, num_classes, config.embedding_size, config.margin_config(), config.sample_rate,
                      **head_kwargs).to(device)
    if config.head == "dcq":
        slots = head.loss.queue_size  # of the global queue
        if slots < config.batch_size * world_size:
            # Say where the size came from: --queue-size when given, else the sample rate.
            origin = (f"--queue-size {config.queue_size}" if config.queue_size is not None else
                      f"ceil(--sample-rate {config.sample_rate:g} x {num_classes} classes)")
            raise ConfigError(f"the DCQ queue ({slots} slots = {origin}) must hold one global batch "
                              f"(--batch-size {config.batch_size} x {world_size} processes): "
                              f"raise --queue-size or --sample-rate, or lower --batch-size")
    return backbone, head


def build_optimizer(params: list, config: TrainConfig) -> torch.optim.Optimizer:
    """SGD (with momentum) or AdamW over ``params``, as ``config.optimizer`` says; fused
    where the device has the kernels (CPU and CUDA do): one kernel per step, and a fused
    optimizer skips a bad step's update itself (the bad-step guard's ``found_inf``)."""
    for fused in (True, False):
        try:
            if config.optimizer == "sgd":
                return torch.optim.SGD(params, lr=config.lr, momentum=config.sgd_momentum,
                                       weight_decay=config.weight_decay, fused=fused)
            return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused)
        except RuntimeError:  # no fused kernels for these parameters' device or dtype
            if not fused:
                raise


def build_scheduler(optimizer: torch.optim.Optimizer, config: TrainConfig, total_steps: int,
                    warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The per-step learning-rate schedule (:func:`~dcq_ops.training.schedules.lr_factor`)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(
        lr_factor, total=total_steps, warmup=warmup_steps, schedule=config.schedule,
        decay_at=tuple(config.decay_at), gamma=config.decay_gamma))
