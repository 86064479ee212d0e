"""Image files for the training application: the extensions it reads, and
decoding with Pillow into arcface_torch's normalisation ([3, H, W] in [-1, 1]).
Shared by the image-folder and RecordIO sources (data.py, recordio/)."""

from __future__ import annotations

import io
import struct

import numpy as np
import torch

from dcq_ops.validation import check_positive_int

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def image_size_pair(image_size) -> tuple[int, int] | None:
    """``image_size`` (an int N, or (H, W), or None: the images' own size) as (H, W) or
    None; ValueError "image_size must be a positive int or (H, W), got X" otherwise."""
    if image_size is None:
        return None
    pair = (image_size, image_size) if isinstance(image_size, int) and not isinstance(image_size, bool) else image_size
    try:
        if len(pair) != 2:
            raise ValueError
        for side in pair:
            check_positive_int("image_size", side)  # an int (a bool is none), > 0
    except (TypeError, ValueError):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}") from None
    return tuple(pair)


class ImageDecodeError(ValueError):
    """An image (a file, a RecordIO record, an entry of a .bin) that cannot be
    decoded. The message names where the bytes came from; the decoder's own
    error (which names only a BytesIO) is the ``__cause__``. A ValueError, so
    code that catches the data layer's other errors catches this one too."""


def describe_bytes(data: bytes) -> str:
    """"N bytes, starting ff d8 ff e0": what a reader needs to tell a JPEG, a
    PNG, zeros or text apart when a decoder rejects them."""
    head = " ".join(f"{b:02x}" for b in data[:8])
    return f"{len(data)} bytes, starting {head}" if data else "0 bytes"


def decode_failure(where: str, exc: BaseException, data: bytes | None = None) -> ImageDecodeError:
    """The ImageDecodeError for the bytes at ``where`` (raise it ``from exc``)."""
    what = f" ({describe_bytes(data)})" if data is not None else ""
    return ImageDecodeError(f"{where}: cannot decode the image{what}: {type(exc).__name__}: {exc}")


# What decoders raise for bad bytes: Pillow raises UnidentifiedImageError (an
# OSError) or OSError ("image file is truncated"), and for some malformed files
# SyntaxError, ValueError, struct.error, EOFError or IndexError; torchvision's
# decoders raise RuntimeError. MemoryError and KeyboardInterrupt are not the
# image's fault and pass through.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, RuntimeError, EOFError, IndexError, struct.error)


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
