"""Image files for the training application: the extensions it reads, and
decoding with Pillow into arcface_torch's normalisation ([3, H, W] in [-1, 1]).
Shared by the image-folder and RecordIO sources (data.py, recordio.py)."""

from __future__ import annotations

import io

import numpy as np
import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def require_pil():
    try:
        from PIL import Image
    except ImportError:
        raise ImportError("reading image files needs Pillow: `pip install pillow`") from None
    return Image


def pil_to_tensor(image, size: tuple[int, int] | None = None) -> torch.Tensor:
    """A PIL image -> float tensor [3, H, W] in [-1, 1] (RGB, arcface_torch's normalisation)."""
    Image = require_pil()
    image = image.convert("RGB")
    if size is not None and image.size != (size[1], size[0]):
        image = image.resize((size[1], size[0]), Image.BILINEAR)
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (array.float() / 255 - 0.5) / 0.5


def decode_image(data: bytes) -> "PIL.Image.Image":  # noqa: F821
    Image = require_pil()
    return Image.open(io.BytesIO(data))
