"""Writing a RecordIO set: :class:`RecordIOWriter` (records and their index lines)
and :func:`pack_folder`, which packs an image folder (a sub-folder per identity)
into insightface's layout."""

from __future__ import annotations

import io
import os
from typing import Sequence

from dcq_ops.atomic_write import AtomicFile
from dcq_ops.training.images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_failure, image_size_pair
from dcq_ops.training.recordio.reader import check_image_decodes
from dcq_ops.training.recordio.format import (FLOAT32_EXACT, FRAME, LENGTH_BITS, LENGTH_MASK, MAGIC, MAGIC_BYTES,
                                              pack_payload)


class RecordIOWriter:
    """Writes ``PREFIX.rec`` and ``PREFIX.idx``: ``write(key, payload)`` appends a
    record (split at aligned magic numbers as MXNet's reader expects) and its
    index line. A context manager.

    Both files are written under temporary names (``PREFIX.rec.tmp``,
    ``PREFIX.idx.tmp``) and replace the final names only at :meth:`close`, fsynced
    (:mod:`dcq_ops.atomic_write`); a ``with`` block that raises (a bad image) or
    :meth:`discard` removes them: an existing set under the same prefix stays whole."""

    def __init__(self, prefix: str | os.PathLike):
        prefix = os.fspath(prefix)
        if prefix.endswith(".rec"):
            prefix = prefix[:-4]
        self.rec_path, self.idx_path = prefix + ".rec", prefix + ".idx"
        parent = os.path.dirname(self.rec_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._rec_file = AtomicFile(self.rec_path, "wb")
        try:
            self._idx_file = AtomicFile(self.idx_path, "w")
        except BaseException:
            self._rec_file.discard()
            raise
        self._rec, self._idx = self._rec_file.file, self._idx_file.file
        self._open = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.close()
        else:
            self.discard()

    def close(self) -> None:
        """Publish the set: both files fsynced, then renamed over the final names (the .idx
        last: a reader never finds a new index beside an old, shorter .rec). A failure
        discards both."""
        if not self._open:
            return
        self._open = False
        try:
            self._rec_file.sync()
            self._idx_file.sync()
            self._rec_file.publish(sync_directory=False)
            self._idx_file.publish()
        except BaseException:
            self._rec_file.discard()
            self._idx_file.discard()
            raise

    def discard(self) -> None:
        """Drop what was written: the temporaries are removed, the final names untouched."""
        self._open = False
        self._rec_file.discard()
        self._idx_file.discard()

    def _part(self, cflag: int, data: bytes) -> None:
        if len(data) > LENGTH_MASK:
            raise ValueError(f"a record part must be at most {LENGTH_MASK} bytes (29-bit length), got {len(data)}")
        self._rec.write(FRAME.pack(MAGIC, cflag << LENGTH_BITS | len(data)))
        self._rec.write(data)

    def write(self, key: int, payload: bytes) -> None:
        offset = self._rec.tell()
        start, found = 0, payload.find(MAGIC_BYTES)
        while found >= 0:
            if found % 4 == 0:  # only aligned occurrences would confuse a reader resynchronising on magic
                self._part(1 if start == 0 else 2, payload[start:found])
                start = found + 4
            found = payload.find(MAGIC_BYTES, found + 1)
        self._part(0 if start == 0 else 3, payload[start:])
        self._rec.write(b"\0" * (-(len(payload) - start) % 4))
        self._idx.write(f"{int(key)}\t{offset}\n")


def _encoded_image(path: str, image_size: tuple[int, int] | None, quality: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    # JPEG and PNG as they are (every reader of the format decodes both): no
    # second lossy compression. Anything else, or a resize, is encoded as JPEG.
    if image_size is None and (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"):
        check_image_decodes(data, path)  # stored as is: a truncated one would fail in training instead
        return data
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("RGB")
    except DECODE_ERRORS as exc:  # Pillow names only the BytesIO: name the file
        raise decode_failure(path, exc, data) from exc
    if image_size is not None and image.size != (image_size[1], image_size[0]):
        image = image.resize((image_size[1], image_size[0]), Image.BILINEAR)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=quality)
    return out.getvalue()


def pack_folder(folder: str | os.PathLike, out_prefix: str | os.PathLike, *,
                image_size: int | tuple[int, int] | None = None, quality: int = 95,
                identity_records: bool = True, extensions: Sequence[str] | None = None) -> dict:
    """Pack ``folder/<identity>/<image>`` (sorted identity names -> labels 0..C-1,
    as :class:`~dcq_ops.training.data.ImageFolder`) into ``out_prefix.rec`` and
    ``out_prefix.idx`` in insightface's layout: header record 0, images at keys
    1..N (each with its label), identity records at keys N+1..N+C. So
    ``pack_folder(faces, "data/train")`` writes the ``data/`` that
    arcface_torch's ``config.rec`` names.

    ``image_size`` (H, W) resizes (then every image is JPEG at ``quality``);
    ``identity_records=False`` writes images only, at keys 0..N-1 (what
    ``shuffle_rec.py`` writes; readers then scan labels).

    Parameters
    ----------
    folder : str or os.PathLike
        The folder of identity folders.
    out_prefix : str or os.PathLike
        Writes ``out_prefix.rec`` and ``out_prefix.idx``.
    image_size : int or (int, int), optional
        Resize every image to (H, W) (then each is JPEG at ``quality``).
    quality : int
        JPEG quality of re-encoded images, in [1, 100].
    identity_records : bool
        Write the header and identity records (insightface's layout).
    extensions : sequence of str, optional
        The image files' extensions (default: those the application reads).

    Returns
    -------
    dict
        {"rec", "idx", "images", "identities"}.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder must be a directory of identity folders, got {folder!r} (not a directory)")
    image_size = image_size_pair(image_size)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality!r}")
    extensions = tuple(e.lower() for e in (extensions or IMAGE_EXTENSIONS))
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    members = [sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(extensions))
               for c in classes]
    total = sum(len(m) for m in members)
    if total == 0:
        raise ValueError(f"folder {folder!r} holds no images with extensions {extensions} in identity folders")
    if total + len(classes) + 1 > FLOAT32_EXACT:
        raise ValueError(f"the layout stores keys as float32, exact up to {FLOAT32_EXACT}: expected at most "
                         f"that many records, got {total + len(classes) + 1}")
    first = 1 if identity_records else 0
    with RecordIOWriter(out_prefix) as writer:
        if identity_records:
            # Written first (MXNet writes it last; the .idx makes the order irrelevant).
            writer.write(0, pack_payload([total + 1, total + 1 + len(classes)], id2=1))
        key, ranges = first, []
        for label, (name, files) in enumerate(zip(classes, members)):
            start = key
            for file in files:
                writer.write(key, pack_payload(label, _encoded_image(os.path.join(folder, name, file), image_size,
                                                                     quality), rid=key))
                key += 1
            ranges.append((start, key))
        if identity_records:
            for start, end in ranges:
                writer.write(key, pack_payload([start, end], rid=key))
                key += 1
    return {"rec": writer.rec_path, "idx": writer.idx_path, "images": total, "identities": len(classes)}
