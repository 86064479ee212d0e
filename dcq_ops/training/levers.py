"""DCQ's levers beyond the loss: the queue at step 0 (``--queue-warmup``: left
empty, filled with random unit vectors under the label of no class as the official
code does, or prefilled with the weight generator's embeddings of training images,
through DCQLoss's public :meth:`~dcq_ops.DCQLoss.prefill`), and the weight
generator's BatchNorm mode (``--generator-bn``) and momentum update
(``--momentum-schedule``)."""

from __future__ import annotations

import contextlib

import torch

from dcq_ops.loss import DCQLoss
from dcq_ops.momentum import MomentumEncoder
from dcq_ops.training.config import TrainConfig
from dcq_ops.training.schedules import generator_momentum


@torch.no_grad()
def warm_queue(loss: DCQLoss, mode: str, *, dataset, generator, batch_size: int, seed: int, device: torch.device,
               autocast=contextlib.nullcontext) -> None:
    """Fill ``loss``'s queue before the first step, as ``mode`` says:
    "empty" leaves it (until it has been filled, K / B steps, only the filled
    slots are negatives, so the loss starts against fewer negatives);
    "random" fills it with random unit vectors under a label no class has
    (the official code initialises its queue so: every slot is a negative
    from the first step); "prefill" fills it with the weight generator's
    embeddings of random training images, under their labels.

    Every rank computes the same keys (same images, same generator, same seed), so a
    queue that every rank holds in full stays the same on all of them. ``autocast``
    returns the mixed-precision context the generator runs under in training."""
    if mode == "empty":
        return
    g = torch.Generator().manual_seed(seed * 1_000_003 + 17)  # not the training streams
    size = loss.queue_size
    if mode == "random":
        loss.prefill(torch.randn(size, loss.embedding_size, generator=g).to(device))
        return
    # Whole batches (BatchNorm in train mode needs more than one image), then the
    # last `size` keys; the generator runs without shuffle-BN so that every rank
    # gets the same keys.
    batches = -(-size // batch_size)
    order = torch.cat([torch.randperm(len(dataset), generator=g)
                       for _ in range(-(-batches * batch_size // len(dataset)))])
    keys, labels = [], []
    for b in range(batches):
        indices = order[b * batch_size:(b + 1) * batch_size].numpy()
        _, images, batch_labels = dataset.get_batch(indices, epoch=0)
        with autocast():
            keys.append(generator(images.to(device)).float())
        labels.append(batch_labels.to(device))
    loss.prefill(torch.cat(keys)[-size:], torch.cat(labels)[-size:])


def set_generator_bn(generator: MomentumEncoder, mode: str) -> None:
    """The weight generator's BatchNorm mode. "train" (default): it normalises with the
    statistics of its own batch, as MoCo's key encoder does. "eval" uses the running
    statistics copied from the feature extractor; early in training they lag the
    weights, every class weight then carries the same offset, and the loss loses its
    signal (measured on the synthetic set: the loss climbs to its chance level and
    verification stays near that of the random initialisation). Under several ranks
    "train" uses shuffle-BN."""
    generator.train(mode == "train")


def update_generator(generator: MomentumEncoder, backbone: torch.nn.Module, step: int, total_steps: int,
                     config: TrainConfig) -> None:
    """g <- mu g + (1 - mu) f after f moved, mu from the momentum schedule."""
    generator.momentum = generator_momentum(step, total_steps, config.momentum, config.momentum_end,
                                            config.momentum_schedule)
    # generator_bn="eval": the generator normalises with the feature extractor's
    # running statistics, which update() copies. "train": it keeps its own, from
    # its own forward passes, as the official code's encoder_k does; they do not
    # affect training (train mode normalises with batch statistics) but are what
    # the generator is evaluated with, and the feature extractor's belong to
    # other weights.
    generator.update(backbone, copy_buffers=config.generator_bn == "eval")
