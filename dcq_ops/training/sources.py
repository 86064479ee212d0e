"""The image sources of the application's two-view data: :class:`TensorImages`
(in-memory tensors) and :class:`ImageFolder` (one folder per identity, the usual
layout of extracted face data sets; read with Pillow), each with ``labels`` and
``load(indices)``, as :class:`~dcq_ops.training.recordio.RecordIOImages` has; and
:func:`check_data_path`, which says before anything is built whether a path is a
training set one of them opens."""

from __future__ import annotations

import os
from typing import Callable, Sequence

import numpy as np
import torch

from dcq_ops.training.images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_failure, pil_to_tensor, require_pil

# dcq_ops.training.recordio is imported where it is used, not here: importing the
# application does not import the RecordIO package.


def labels_tensor(labels) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    labels = labels.long()
    if labels.numel() and int(labels.min()) < 0:
        raise ValueError(f"labels must be >= 0, got a label of {int(labels.min())}")
    return labels


_EXPECTED_DATA = ("an image folder (one sub-folder of images per identity), a .rec file with its .idx beside "
                  "it, or a folder holding train.rec and train.idx")


def check_data_path(path: str | os.PathLike) -> None:
    """Raise ValueError, naming ``path`` and what is expected there, unless it
    is a training set that :class:`ImageFolder` or
    :class:`~dcq_ops.training.recordio.RecordIOImages` opens: a ``.rec`` file
    with its ``.idx`` beside it (same stem), a folder holding ``train.rec`` and
    ``train.idx``, or a folder with at least one identity sub-folder holding an
    image. Cheap (it stops at the first image found, reads no image), so an
    argument check can call it before anything is built. The keyword
    "synthetic" (the trainer's default data) is not a path: callers skip it.

    Parameters
    ----------
    path : str or os.PathLike
        The training set's path.
    """
    shown = os.fspath(path)
    if not os.path.exists(shown):
        hint = ""
        if shown.endswith(".idx") and os.path.exists(shown[:-4] + ".rec"):
            hint = f"; did you mean {shown[:-4] + '.rec'}?"
        raise ValueError(f"data path {shown!r} does not exist: expected {_EXPECTED_DATA}{hint}")
    if os.path.isfile(shown):
        if not shown.endswith(".rec"):
            hint = ""
            if shown.endswith(".idx") and os.path.exists(shown[:-4] + ".rec"):
                hint = f" (an .idx is read through its .rec: pass {shown[:-4] + '.rec'})"
            raise ValueError(f"data path {shown!r} is a file but not a .rec{hint}: expected {_EXPECTED_DATA}")
        _check_index_beside(shown)
        return
    if not os.path.isdir(shown):
        raise ValueError(f"data path {shown!r} is neither a file nor a folder: expected {_EXPECTED_DATA}")
    rec = os.path.join(shown, "train.rec")
    if os.path.exists(rec):
        _check_index_beside(rec)
        return
    extensions = tuple(e.lower() for e in IMAGE_EXTENSIONS)
    folders = 0
    try:
        with os.scandir(shown) as entries:
            for entry in entries:
                if not entry.is_dir():
                    continue
                folders += 1
                with os.scandir(entry.path) as files:
                    if any(f.name.lower().endswith(extensions) and f.is_file() for f in files):
                        return  # one identity folder with an image: ImageFolder reads the rest
    except OSError as exc:
        raise ValueError(f"data path {shown!r} cannot be listed ({exc}): expected {_EXPECTED_DATA}") from exc
    recs = sorted(f for f in os.listdir(shown) if f.endswith(".rec"))
    if recs:
        raise ValueError(f"data path {shown!r} holds {', '.join(recs)} but no train.rec: pass the .rec file "
                         f"itself, or name it train.rec")
    found = f"{folders} sub-folders, none holding an image" if folders else "no sub-folders"
    raise ValueError(f"data path {shown!r} is a folder with {found} (extensions {', '.join(extensions)}): "
                     f"expected {_EXPECTED_DATA}")


def _check_index_beside(rec: str) -> None:
    idx = os.path.splitext(rec)[0] + ".idx"
    if not os.path.exists(idx):
        raise ValueError(f"data path {rec!r}: found {rec} but not {idx} beside it (a .rec is read through its "
                         f"index); create it with `python -m dcq_ops.training.recordio index {rec}`")


class TensorImages:
    """In-memory images [N, C, H, W] and labels [N]. uint8 images are mapped to
    [-1, 1] as arcface_torch does ((x / 255 - 0.5) / 0.5); float images are used as they are.

    Parameters
    ----------
    images : torch.Tensor
        [N, C, H, W], floating point or uint8.
    labels : array-like
        [N] integer labels >= 0.
    """

    def __init__(self, images: torch.Tensor, labels):
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a tensor, got {type(images).__name__}")
        if images.dim() != 4:
            raise ValueError(f"images must be [N, C, H, W], got shape {tuple(images.shape)}")
        if not (images.is_floating_point() or images.dtype == torch.uint8):
            raise TypeError(f"images must be floating point or uint8, got {images.dtype}")
        self.images = images
        self.labels = labels_tensor(labels)
        if self.labels.numel() != images.shape[0]:
            raise ValueError(f"labels must have one entry per image ({images.shape[0]}), got {self.labels.numel()}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices``, float [B, C, H, W] (uint8 mapped to [-1, 1])."""
        batch = self.images[torch.as_tensor(indices, dtype=torch.long)]
        if batch.dtype == torch.uint8:
            batch = (batch.float() / 255 - 0.5) / 0.5
        return batch


class ImageFolder:
    """``root/<identity>/<image>``: one folder per identity (sorted names -> labels 0..C-1).

    ``image_size`` (H, W) resizes images that differ (all images of a batch must
    have one size). ``transform``, if given, maps a PIL image to a tensor and
    replaces the default conversion (its randomness is then not counter-based,
    so resumed runs are no longer exact; give the TwoViewDataset ``augment=None``
    if the transform already augments).

    Parameters
    ----------
    root : str or os.PathLike
        The folder of identity folders.
    image_size : int or (int, int), optional
        Resize to this (H, W); None keeps each image's size.
    transform : callable, optional
        PIL image -> tensor, instead of the default conversion.
    extensions : sequence of str
        The image files' extensions (case-insensitive).
    """

    def __init__(self, root: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
                 transform: Callable | None = None, extensions: Sequence[str] = IMAGE_EXTENSIONS):
        root = os.fspath(root)
        if not os.path.isdir(root):
            why = "not a directory" if os.path.exists(root) else "not a directory: it does not exist"
            raise ValueError(f"root must be a directory of identity folders, got {root!r} ({why})")
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        self.root, self.image_size, self.transform = root, image_size, transform
        self.classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
        extensions = tuple(e.lower() for e in extensions)
        paths, labels = [], []
        for label, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(root, name)) if f.lower().endswith(extensions))
            paths.extend(os.path.join(root, name, f) for f in files)
            labels.extend([label] * len(files))
        if not paths:
            raise ValueError(f"root {root!r} holds no images with extensions {extensions} in identity folders")
        self.paths = paths
        self.labels = torch.tensor(labels, dtype=torch.long)
        require_pil()  # fail now, not in the first batch

    def __len__(self) -> int:
        return len(self.paths)

    def load(self, indices: np.ndarray) -> torch.Tensor:
        """The images at ``indices`` decoded, float [B, 3, H, W] in [-1, 1]; ImageDecodeError
        names a file that cannot be decoded."""
        Image = require_pil()
        images = []
        for i in np.asarray(indices).reshape(-1):
            path = self.paths[int(i)]
            image = None
            try:
                image = Image.open(path)
                image.load()  # decode here (Pillow is lazy), so a broken file fails inside this try
            except (FileNotFoundError, PermissionError, IsADirectoryError):
                raise  # the file, not its bytes: these already name the path
            except DECODE_ERRORS as exc:
                if image is not None:
                    image.close()
                # Pillow names the file only when it cannot identify it, not when a
                # truncated or corrupt one fails to decode: name it always.
                raise decode_failure(f"{path} (image {int(i)} of {self.root})", exc) from exc
            with image:
                images.append(self.transform(image) if self.transform is not None
                              else pil_to_tensor(image, self.image_size))
        shapes = {tuple(t.shape) for t in images}
        if len(shapes) > 1:
            raise ValueError(f"images of one batch differ in shape {sorted(shapes)}: pass image_size=(H, W)")
        return torch.stack(images)
