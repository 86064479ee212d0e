"""Two-view data for DCQ: items ``(image_a, image_b, label)``.

``image_a`` goes to the feature extractor, ``image_b`` to the weight generator.
``image_b`` is another image of the same identity when the identity has one
(drawn uniformly among the others), else a second, independent augmentation of
the same image (a singleton identity still gets a useful class weight).

Sources (:mod:`dcq_ops.training.sources`): :class:`TensorImages` (in-memory
tensors), :class:`ImageFolder` (one folder per identity) and
:class:`~dcq_ops.training.recordio.RecordIOImages` (insightface's ``train.rec`` +
``train.idx``); :class:`TwoViewDataset` takes any of them.

Randomness: every random choice of an item (the partner image, the flip and
the shift of each view) is a pure function of ``(seed, epoch, index)``, computed
with a counter-based hash rather than a stateful generator. So an item is the
same whichever process, worker or batch loads it, and a run resumed from a
checkpoint at step s sees exactly the batches an uninterrupted run sees.
"""

from __future__ import annotations

import os
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from dcq_ops.training.sources import ImageFolder, TensorImages, labels_tensor
from dcq_ops.validation import check_int, check_positive_int

# dcq_ops.training.recordio is imported where it is used, not here: importing the
# application does not import the RecordIO package.


_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (a bijective 64-bit mix), vectorised; uint64 wraps."""
    x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
    x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
    x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
    return x ^ (x >> np.uint64(31))


def counter_uniform(seed: int, epoch: int, indices, stream: int) -> np.ndarray:
    """Uniform floats in [0, 1), one per index, a pure function of
    (seed, epoch, index, stream): the same numbers in any process or order."""
    idx = np.asarray(indices, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        key = _splitmix64(np.full(idx.shape, np.uint64(seed & 0xFFFFFFFFFFFFFFFF), dtype=np.uint64))
        key = _splitmix64(key ^ np.uint64(epoch & 0xFFFFFFFFFFFFFFFF))
        key = _splitmix64(key ^ np.uint64(stream & 0xFFFFFFFFFFFFFFFF))
        bits = _splitmix64(key ^ idx)
    return (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # 53 random bits


# --------------------------------------------------------------------------- augmentation


class FlipShift:
    """Random horizontal flip (probability ``flip``) and a random shift of up to
    ``max_shift`` pixels each way (reflect padding, then a crop), applied per
    image from uniforms in [0, 1) (three per image: flip, dx, dy)."""

    def __init__(self, flip: float = 0.5, max_shift: int = 2):
        if not 0 <= flip <= 1:
            raise ValueError(f"flip must be a probability in [0, 1], got {flip!r}")
        check_int("max_shift", max_shift, minimum=0)
        self.flip, self.max_shift = flip, max_shift

    def __repr__(self) -> str:
        return f"FlipShift(flip={self.flip}, max_shift={self.max_shift})"

    def __call__(self, images: torch.Tensor, u: np.ndarray) -> torch.Tensor:
        """``images`` [B, C, H, W], ``u`` [3, B] uniforms."""
        B, _, H, W = images.shape
        u = torch.from_numpy(np.asarray(u, dtype=np.float64))
        flip = (u[0] < self.flip).view(-1, 1, 1, 1)
        images = torch.where(flip, images.flip(-1), images)
        p = self.max_shift
        if p == 0:
            return images
        if p >= min(H, W):
            raise ValueError(f"max_shift must be < the image size {min(H, W)} (reflect padding), got {p}")
        padded = F.pad(images, (p, p, p, p), mode="reflect")
        dx = (u[1] * (2 * p + 1)).long().clamp(max=2 * p)  # offsets 0..2p of the crop
        dy = (u[2] * (2 * p + 1)).long().clamp(max=2 * p)
        rows = (dy.view(B, 1) + torch.arange(H)).view(B, 1, H, 1).expand(B, images.shape[1], H, W + 2 * p)
        padded = padded.gather(2, rows)
        cols = (dx.view(B, 1) + torch.arange(W)).view(B, 1, 1, W).expand(B, images.shape[1], H, W)
        return padded.gather(3, cols)


# --------------------------------------------------------------------------- two views

# Counter streams of one item: the partner, then three uniforms per view.
_PARTNER, _VIEW_A, _VIEW_B = 0, 1, 4


class TwoViewDataset(Dataset):
    """``(image_a, image_b, label)`` per index, over a source with ``labels`` and
    ``load(indices)`` (:class:`TensorImages`, :class:`ImageFolder`,
    :class:`~dcq_ops.training.recordio.RecordIOImages`, or tensors / a folder
    path / a ``.rec`` path, wrapped automatically).

    ``dataset[i]`` uses the epoch set by :meth:`set_epoch`; ``dataset[(epoch, i)]``
    names it (what :class:`TwoViewBatchSampler` yields, so DataLoader workers
    need no shared state). :meth:`get_batch` loads a whole batch at once.
    ``augment`` (default :class:`FlipShift`) is applied to both views
    independently; ``None`` turns it off (then a singleton's two views are equal).

    Parameters
    ----------
    source : tensor, str, os.PathLike or image source
        Images [N, C, H, W] (with ``labels``), a folder or ``.rec`` path, or an object
        with ``labels`` and ``load(indices)``.
    labels : array-like, optional
        The labels of an images tensor (only then).
    seed : int
        The seed of the partner choice and the augmentation (with the epoch and index).
    augment : callable, None or "default"
        The augmentation of each view (default :class:`FlipShift`).
    """

    def __init__(self, source, labels=None, *, seed: int = 0, augment: Callable | None | str = "default"):
        if isinstance(source, torch.Tensor):
            source = TensorImages(source, labels)
        elif isinstance(source, (str, os.PathLike)):
            from dcq_ops.training.recordio import RecordIOImages, is_recordio
            source = RecordIOImages(source) if is_recordio(source) else ImageFolder(source)
        elif labels is not None:
            raise ValueError("labels are taken from the source; pass labels only with an images tensor")
        if not hasattr(source, "labels") or not hasattr(source, "load"):
            raise TypeError(f"source must be an images tensor, a folder path, or have .labels and .load(); "
                            f"got {type(source).__name__}")
        self.source = source
        self.seed = int(seed)
        self.augment = FlipShift() if augment == "default" else augment
        self.epoch = 0
        labels = labels_tensor(source.labels).numpy()
        self.labels = torch.from_numpy(labels)
        self.num_classes = int(labels.max()) + 1 if labels.size else 0
        # Identities as CSR: members of identity c are order[offsets[c]:offsets[c+1]].
        self._order = np.argsort(labels, kind="stable")
        counts = np.bincount(labels, minlength=self.num_classes)
        self._offsets = np.concatenate([[0], np.cumsum(counts)])
        self._rank = np.empty(len(labels), dtype=np.int64)  # position of each index in its identity
        self._rank[self._order] = np.arange(len(labels)) - self._offsets[labels[self._order]]
        self.counts = torch.from_numpy(counts)

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        """The epoch that ``dataset[i]`` (an index without one) uses."""
        self.epoch = int(epoch)

    def partner(self, indices, epoch: int | None = None) -> np.ndarray:
        """The index of image_b for each index: uniform among the other images of
        its identity, or itself for a singleton."""
        epoch = self.epoch if epoch is None else epoch
        indices = np.asarray(indices, dtype=np.int64)
        labels = self.labels.numpy()[indices]
        start, count = self._offsets[labels], self._offsets[labels + 1] - self._offsets[labels]
        u = counter_uniform(self.seed, epoch, indices, _PARTNER)
        # Skip 1..count-1 places from the image's own position: never itself when count > 1.
        step = 1 + np.minimum((u * np.maximum(count - 1, 1)).astype(np.int64), np.maximum(count - 2, 0))
        position = np.where(count > 1, (self._rank[indices] + step) % np.maximum(count, 1), self._rank[indices])
        return self._order[start + position]

    def _view(self, images: torch.Tensor, indices: np.ndarray, epoch: int, stream: int) -> torch.Tensor:
        if self.augment is None:
            return images
        u = np.stack([counter_uniform(self.seed, epoch, indices, stream + k) for k in range(3)])
        return self.augment(images, u)

    def get_batch(self, indices, epoch: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(images_a [B, ...], images_b [B, ...], labels [B]) for ``indices`` in ``epoch``."""
        epoch = self.epoch if epoch is None else int(epoch)
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if indices.size and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"indices must be in [0, {len(self)}), got {indices.min()}..{indices.max()}")
        partners = self.partner(indices, epoch)
        a = self._view(self.source.load(indices), indices, epoch, _VIEW_A)
        b = self._view(self.source.load(partners), indices, epoch, _VIEW_B)
        return a, b, self.labels[torch.from_numpy(indices)]

    def __getitem__(self, key):
        if isinstance(key, (list, np.ndarray)) or (isinstance(key, torch.Tensor) and key.dim() == 1):
            keys = [k for k in key]
            if keys and isinstance(keys[0], tuple):  # a batch of (epoch, index) from the batch sampler
                epochs = {int(e) for e, _ in keys}
                if len(epochs) != 1:
                    raise ValueError(f"a batch must come from one epoch, got epochs {sorted(epochs)}")
                return self.get_batch([i for _, i in keys], epochs.pop())
            return self.get_batch(keys)
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        a, b, label = self.get_batch([int(index)], epoch)
        return a[0], b[0], label[0]


class TwoViewBatchSampler:
    """Batches of ``(epoch, index)`` over ``num_samples`` items: a permutation per
    epoch from ``(seed, epoch)`` (the same on every rank), sharded across
    ``world_size`` ranks like DistributedSampler (rank r takes every
    ``world_size``-th index), cut into batches. With ``drop_last`` (the default
    for training) every rank gets the same number of full batches.

    ``iter_epoch(epoch, start_batch)`` resumes in the middle of an epoch.

    Parameters
    ----------
    num_samples : int
        The items to draw from.
    batch_size : int
        Items per batch (per rank).
    seed : int
        The seed of the permutations.
    shuffle : bool
        Permute each epoch (False: in order).
    drop_last : bool
        Drop the last partial batch (and the items that do not share evenly across ranks).
    rank, world_size : int
        This rank and the number of ranks.
    """

    def __init__(self, num_samples: int, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = True, rank: int = 0, world_size: int = 1):
        for name, value in (("num_samples", num_samples), ("batch_size", batch_size), ("world_size", world_size)):
            check_positive_int(name, value)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank!r}")
        if drop_last and num_samples < batch_size * world_size:
            raise ValueError(f"num_samples ({num_samples}) must be >= batch_size * world_size "
                             f"({batch_size} * {world_size}) with drop_last=True")
        self.num_samples, self.batch_size, self.seed = num_samples, batch_size, int(seed)
        self.shuffle, self.drop_last, self.rank, self.world_size = shuffle, drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """The epoch that iterating the sampler yields."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        per_rank = self.num_samples // self.world_size if self.drop_last else -(-self.num_samples // self.world_size)
        return per_rank // self.batch_size if self.drop_last else -(-per_rank // self.batch_size)

    def indices(self, epoch: int) -> np.ndarray:
        """This rank's indices of ``epoch``, in order."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.num_samples, generator=g).numpy()
        else:
            order = np.arange(self.num_samples)
        if self.drop_last:
            order = order[: len(self) * self.batch_size * self.world_size]
        return order[self.rank::self.world_size]

    def iter_epoch(self, epoch: int, start_batch: int = 0) -> Iterator[list]:
        """This rank's batches of ``epoch`` from batch ``start_batch`` on, each a list of (epoch, index)."""
        mine = self.indices(epoch)
        for b in range(start_batch, len(self)):
            yield [(epoch, int(i)) for i in mine[b * self.batch_size:(b + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[list]:
        return self.iter_epoch(self.epoch)


def _as_batch(batch):
    return batch  # the dataset returns whole batches: nothing to collate


def batch_loader(dataset: TwoViewDataset, sampler: TwoViewBatchSampler, epoch: int, start_batch: int = 0,
                 num_workers: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The batches of one epoch (from ``start_batch``): loaded in this process,
    or by a DataLoader with ``num_workers`` workers (each batch is one item)."""
    batches = sampler.iter_epoch(epoch, start_batch)
    if num_workers == 0:
        for keys in batches:
            yield dataset[keys]
        return
    loader = torch.utils.data.DataLoader(dataset, sampler=list(batches), batch_size=None,
                                         num_workers=num_workers, collate_fn=_as_batch)
    yield from loader
