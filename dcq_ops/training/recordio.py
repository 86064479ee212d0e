"""insightface's RecordIO training sets (``train.rec`` + ``train.idx``), read
without mxnet, and a writer that packs an image folder into that layout.

The layout (what insightface's ``MXFaceDataset`` and DALI's mxnet reader read):

- ``.rec``: records one after the other. Each starts with two little-endian
  uint32 words, the magic number 0xced7230a and ``cflag << 29 | length``, then
  ``length`` bytes, zero-padded to a multiple of 4. A payload holding the magic
  number at a 4-byte-aligned position is split there (MXNet's RecordIO framing):
  the parts carry cflag 1 (first), 2 (middle), 3 (last), the magic word itself
  is dropped and put back by the reader; a whole record has cflag 0.
- ``.idx``: text lines ``key<TAB>byte offset`` for random access.
- A payload is an ``IRHeader`` (struct ``'IfQQ'``: flag, label, id, id2); when
  ``flag > 0`` the float ``label`` is replaced by ``flag`` float32 labels after
  the header. The rest is the image (JPEG, or PNG).
- Record 0 is a header (flag 2, labels ``[a, b]``, no image): keys 1..a-1 are
  the images, keys a..b-1 the identity records. Identity record ``a + k`` holds
  the image-key range ``[start, end)`` of identity k. (insightface's packing
  tools write this; arcface_torch's ``MXFaceDataset`` reads the header.)

:class:`RecordIOImages` has ``.labels`` and ``.load(indices)`` like
:class:`~dcq_ops.training.data.ImageFolder`, so :class:`TwoViewDataset` gives
each sample another image of its identity. Labels come from the identity
records (identity k -> label k, which in insightface's sets is also the label
in each image's header: one small read per identity when the file is opened).
A file without them (record 0 is an image, or the header names no identity
record, as in arcface_torch's ``shuffle_rec.py`` output) falls back to a label
scan: one small header read per image when the file is opened. From the page
cache that is a few microseconds per image; from a cold disk it costs about one
pass over the whole file (reading in file order, the OS reads ahead), minutes
for millions of images on a slow disk. The labels are then the distinct stored
labels in increasing order, renumbered 0..C-1. benchmarks/RECORDIO.md has
measured rates.

Workers: the file is opened lazily, once per process (reopened after a fork,
not pickled), and read with ``os.pread``, so DataLoader workers never share a
file position.

Command line::

    python -m dcq_ops.training.recordio pack FOLDER OUT_PREFIX   # FOLDER/<identity>/<image> -> OUT_PREFIX.rec/.idx
    python -m dcq_ops.training.recordio info PATH                # counts of a .rec (or a folder with train.rec)
    python -m dcq_ops.training.recordio index PATH.rec           # write the missing PATH.idx beside it
"""

from __future__ import annotations

import argparse
import io
import os
import struct
import threading
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dcq_ops.training.images import DECODE_ERRORS, IMAGE_EXTENSIONS, decode_failure

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_FRAME = struct.Struct("<II")        # magic, cflag << 29 | length
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2 (MXNet's IRHeader, 24 bytes)
# Float32 labels hold integers exactly up to 2**24: the limit of image keys and
# identities in insightface's layout (its identity records store key ranges as float32).
_FLOAT32_EXACT = 1 << 24
_PREFIX_READ = 256  # bytes read per record by the label scan (header + labels)
_FIRST_READ = 1 << 20  # most bytes read at once for a record (an .idx with gaps gives long extents)


def is_recordio(path: str | os.PathLike) -> bool:
    """Whether ``path`` names a RecordIO set: a ``.rec`` file, or a directory holding ``train.rec``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        return os.path.exists(os.path.join(path, "train.rec"))
    return path.endswith(".rec")


def resolve_paths(path: str | os.PathLike) -> tuple[str, str]:
    """(.rec path, .idx path) of ``path``: a ``.rec`` file (its ``.idx`` next to
    it, same stem) or a directory with ``train.rec`` and ``train.idx``."""
    path = os.fspath(path)
    if os.path.isdir(path):
        rec = os.path.join(path, "train.rec")
        if not os.path.exists(rec):
            raise ValueError(f"path {path!r} is a directory without train.rec: expected a .rec file or a "
                             f"directory holding train.rec and train.idx")
    elif os.path.exists(path):
        rec = path
    else:
        raise ValueError(f"path {path!r} does not exist: expected a .rec file or a directory holding "
                         f"train.rec and train.idx")
    idx = os.path.splitext(rec)[0] + ".idx"
    if not os.path.exists(idx):
        raise ValueError(f"{rec}: its index {idx} is missing: found {rec} but not {idx} beside it; a .rec is "
                         f"read through the .idx next to it (same stem; text lines 'key<TAB>offset'). Create "
                         f"it with `python -m dcq_ops.training.recordio index {rec}`")
    return rec, idx


def build_index(rec_path: str | os.PathLike, idx_path: str | os.PathLike | None = None) -> dict:
    """Write the ``.idx`` of a ``.rec`` (default: beside it, same stem) by
    walking its records in file order and numbering them 0, 1, 2, ... as
    MXNet's ``tools/rec2idx.py`` does: the keys are right for files written in
    key order (this package's writer, insightface's packing tools).
    Returns {"rec", "idx", "records"}."""
    rec_path = os.fspath(rec_path)
    if not os.path.isfile(rec_path):
        raise ValueError(f"{rec_path!r} is not a file: expected a .rec to index")
    idx_path = os.path.splitext(rec_path)[0] + ".idx" if idx_path is None else os.fspath(idx_path)
    size = os.path.getsize(rec_path)
    lines, pos, record_start, inside = [], 0, 0, False
    with open(rec_path, "rb") as f:
        while pos < size:
            f.seek(pos)
            frame = f.read(_FRAME.size)
            if len(frame) < _FRAME.size:
                raise ValueError(f"{rec_path}: truncated record header at byte {pos}: expected 8 bytes, "
                                 f"got {len(frame)}")
            magic, word = _FRAME.unpack(frame)
            if magic != MAGIC:
                raise ValueError(f"{rec_path}: bad magic number at byte {pos}: expected 0x{MAGIC:08x}, got "
                                 f"0x{magic:08x} (not a RecordIO file)")
            cflag, length = word >> _LENGTH_BITS, word & _LENGTH_MASK
            if cflag > 3 or (cflag in (2, 3)) != inside:
                raise ValueError(f"{rec_path}: bad continuation flag {cflag} at byte {pos}")
            if not inside:
                record_start = pos
            if pos + _FRAME.size + length > size:
                raise ValueError(f"{rec_path}: the record at byte {record_start} is truncated: its header says "
                                 f"{length} bytes from byte {pos + _FRAME.size}, the file ends at {size}")
            pos += _FRAME.size + length + (-length % 4)  # the padding to 4 bytes
            inside = cflag in (1, 2)  # a split record continues in the next frame
            if not inside:
                lines.append(f"{len(lines)}\t{record_start}\n")
    if inside:
        raise ValueError(f"{rec_path}: the last record (at byte {record_start}) lacks its final part")
    tmp = idx_path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, idx_path)  # never a half-written index under the final name
    return {"rec": rec_path, "idx": idx_path, "records": len(lines)}


def _parse_index_lines(idx_path: str, data: bytes) -> np.ndarray:
    """Line by line (the slow path): [M, 2] int64, or ValueError naming the first bad line."""
    rows = []
    for number, line in enumerate(data.splitlines(), start=1):
        fields = line.split()
        if not fields:
            continue  # a blank line (a trailing one, say)
        if len(fields) != 2 or not all(f.lstrip(b"-").isdigit() for f in fields):
            raise ValueError(f"{idx_path}: line {number}: expected 'key<TAB>offset' (two integers), got "
                             f"{line[:80].decode(errors='replace')!r}")
        rows.append((int(fields[0]), int(fields[1])))
    return np.array(rows, dtype=np.int64).reshape(-1, 2)


def read_index(idx_path: str, rec_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) of an ``.idx`` file, both int64, checked against the .rec's size."""
    with open(idx_path, "rb") as f:
        data = f.read()
    values = None
    if data.strip():
        # numpy's text parser reads millions of lines in a fraction of a second;
        # anything it cannot read, or a line count that does not match, takes the
        # line-by-line path, which names the bad line.
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            try:
                values = np.fromstring(data, dtype=np.int64, sep=" ")
            except (ValueError, DeprecationWarning):
                values = None
        lines = data.count(b"\n") + (not data.endswith(b"\n"))
        if values is not None and values.size != 2 * lines:
            values = None
    table = values.reshape(-1, 2) if values is not None else _parse_index_lines(idx_path, data)
    keys, offsets = table[:, 0].copy(), table[:, 1].copy()
    if offsets.size and (offsets.min() < 0 or offsets.max() >= rec_size):
        bad = int(offsets[(offsets < 0) | (offsets >= rec_size)][0])
        raise ValueError(f"{idx_path}: offsets must be in [0, {rec_size}) (the .rec's size), got {bad}")
    if np.unique(keys).size != keys.size:
        raise ValueError(f"{idx_path}: keys must be unique, got {keys.size - np.unique(keys).size} repeated")
    return keys, offsets


def unpack_header(payload: bytes) -> tuple[int, np.ndarray, int, bytes]:
    """(flag, labels float32 [max(flag, 1)], id, rest of the payload) of a record's payload."""
    if len(payload) < _IR_HEADER.size:
        raise ValueError(f"expected a payload of at least {_IR_HEADER.size} bytes (an IRHeader), got {len(payload)}")
    flag, label, rid, _ = _IR_HEADER.unpack_from(payload)
    start = _IR_HEADER.size
    if flag == 0:
        return 0, np.array([label], dtype=np.float32), rid, payload[start:]
    end = start + 4 * flag
    if len(payload) < end:
        raise ValueError(f"expected {flag} float32 labels after the IRHeader ({end} bytes), got {len(payload)} bytes")
    return flag, np.frombuffer(payload[start:end], dtype=np.float32).copy(), rid, payload[end:]


def pack_payload(labels, data: bytes = b"", rid: int = 0, id2: int = 0) -> bytes:
    """An IRHeader (one float label: flag 0; several: flag = their count, stored after it) and ``data``."""
    labels = np.atleast_1d(np.asarray(labels, dtype=np.float32))
    if labels.size == 1:
        return _IR_HEADER.pack(0, float(labels[0]), rid, id2) + data
    return _IR_HEADER.pack(labels.size, 0.0, rid, id2) + labels.tobytes() + data


# --------------------------------------------------------------------------- decoding


# A decoder maps (encoded bytes, wanted (H, W) or None) to a uint8 array or
# tensor [H, W, 3] (RGB), channels last: what Pillow produces without a copy,
# so a batch is stacked once and transposed once (in the float conversion).


def _pil_decoder(data: bytes, size: tuple[int, int] | None):
    from PIL import Image
    with Image.open(io.BytesIO(data)) as image:
        if size is not None and image.format == "JPEG":
            image.draft("RGB", (size[1], size[0]))  # decode straight at a reduced DCT scale when much larger
        if image.mode != "RGB":
            image = image.convert("RGB")
        return np.asarray(image)


def _torchvision_decoder(data: bytes, size: tuple[int, int] | None):
    from torchvision.io import ImageReadMode, decode_image
    return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB).permute(1, 2, 0)


def available_decoders() -> list[str]:
    """Names of the JPEG decoders installed, in the order "auto" prefers them."""
    names = []
    try:
        from torchvision.io import decode_image  # noqa: F401
        names.append("torchvision")
    except ImportError:
        pass
    try:
        import PIL.Image  # noqa: F401
        names.append("pil")
    except ImportError:
        pass
    return names


_DECODERS = {"pil": _pil_decoder, "torchvision": _torchvision_decoder}


def get_decoder(name: str = "auto"):
    """(name, function (bytes, (H, W) or None) -> uint8 [H', W', 3] RGB, an array or a tensor).
    "auto": torchvision's libjpeg-turbo ``decode_image`` when torchvision is
    installed (it decodes straight into a tensor), else Pillow."""
    installed = available_decoders()
    if name == "auto":
        if not installed:
            raise ImportError("decoding images needs Pillow (`pip install pillow`) or torchvision")
        name = installed[0]
    if name not in _DECODERS:
        raise ValueError(f"decoder must be 'auto' or one of {sorted(_DECODERS)}, got {name!r}")
    if name not in installed:
        raise ImportError(f"decoder {name!r} is not installed (installed: {installed or 'none'})")
    return name, _DECODERS[name]


# --------------------------------------------------------------------------- reader


class RecordIOImages:
    """The images of an insightface RecordIO set, with ``.labels`` (int64 [N])
    and ``.load(indices)`` -> float [B, 3, H, W] in [-1, 1] (arcface_torch's
    normalisation), the interface :class:`~dcq_ops.training.data.TwoViewDataset`
    takes.

    ``path``: a ``.rec`` file (its ``.idx`` next to it) or a directory holding
    ``train.rec`` and ``train.idx``. ``image_size`` (H, W) resizes images that
    differ (bilinear). ``decoder``: "auto", "pil" or "torchvision".

    ``num_classes`` is the number of identities; ``has_identity_records`` says
    whether labels came from identity records (else from a scan of every image
    header, see the module's docs). Errors in the file (bad magic number,
    truncated record, broken index) raise ValueError naming the file; an image
    that does not decode raises :class:`~dcq_ops.training.images.ImageDecodeError`
    (a ValueError) naming the file, the record's key and its byte offset.
    """

    def __init__(self, path: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
                 decoder: str = "auto"):
        self.rec_path, self.idx_path = resolve_paths(path)
        if isinstance(image_size, int):
            image_size = (image_size, image_size)
        if image_size is not None and (len(image_size) != 2 or any(
                isinstance(s, bool) or not isinstance(s, int) or s <= 0 for s in image_size)):
            raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
        self.image_size = image_size
        self.decoder, self._decode = get_decoder(decoder)
        self._fd, self._pid, self._lock = None, None, threading.Lock()
        self.file_size = os.path.getsize(self.rec_path)
        keys, offsets = read_index(self.idx_path, self.file_size)
        if keys.size == 0:
            raise ValueError(f"{self.idx_path}: expected at least one record, got an empty index")
        # Each record's extent: up to the next record's offset (or the end of the
        # file), so one read usually fetches a whole record.
        bounds = np.unique(np.append(offsets, self.file_size))
        extents = bounds[np.searchsorted(bounds, offsets, side="right")] - offsets
        order = np.argsort(keys)
        self._keys, self._offsets, self._extents = keys[order], offsets[order], extents[order]

        image_keys, labels, classes = self._identities()
        if image_keys is None:
            image_keys, labels, classes = self._scan_labels()
        if image_keys.size == 0:
            raise ValueError(f"{self.rec_path}: expected at least one image record, got none")
        self.keys = image_keys  # the record key of each item
        self._image_slots = self._slots(image_keys, "image")
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.classes = classes
        self.num_classes = len(classes)

    # ---------------------------------------------------------------- file access

    def __getstate__(self):  # DataLoader workers under spawn: the open file stays behind
        state = self.__dict__.copy()
        state["_fd"], state["_pid"], state["_lock"] = None, None, None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __del__(self):
        try:
            self.close()
        except Exception:  # at interpreter shutdown os may already be gone; the OS closes the file
            pass

    def close(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None and self._pid == os.getpid():
            os.close(fd)
        self._fd = None

    def _file(self) -> int:
        # One descriptor per process: a forked DataLoader worker opens its own
        # instead of using the inherited one, so no two processes share a
        # descriptor (nor, without pread, a file position).
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY | getattr(os, "O_BINARY", 0)), os.getpid()
        return self._fd

    def _pread(self, offset: int, size: int) -> bytes:
        fd = self._file()
        if hasattr(os, "pread"):
            return os.pread(fd, size, offset)
        with self._lock:  # no pread (Windows): seek + read under a lock
            os.lseek(fd, offset, os.SEEK_SET)
            return os.read(fd, size)

    def _slots(self, wanted: np.ndarray, what: str) -> np.ndarray:
        """Positions of ``wanted`` keys in the sorted index; ValueError for keys it lacks."""
        slots = np.searchsorted(self._keys, wanted)
        found = (slots < self._keys.size) & (self._keys[np.minimum(slots, self._keys.size - 1)] == wanted)
        if not found.all():
            missing = wanted[~found]
            raise ValueError(f"{self.idx_path}: expected the {what} key(s) {missing[:5].tolist()} "
                             f"({missing.size} in all), got no such line in the index")
        return slots

    def read_record(self, offset: int, extent: int, key=None, limit: int | None = None) -> bytes:
        """The payload of the record at ``offset`` (parts of a split record joined
        back). ``limit``: return once this many payload bytes are known (the
        label scan reads only headers)."""
        where = f"{self.rec_path}: record {key if key is not None else '?'} at offset {offset}"
        size = min(max(int(extent), 8), _FIRST_READ if limit is None else limit + 8)
        buf = self._pread(offset, size)
        parts, pos, first = [], 0, True
        while True:
            if len(buf) - pos < 8:
                buf += self._pread(offset + len(buf), pos + 8 - len(buf))
                if len(buf) - pos < 8:
                    raise ValueError(f"{where} is truncated: expected an 8-byte record header at byte "
                                     f"{offset + pos}, got {len(buf) - pos} bytes before the end of the file")
            magic, word = _FRAME.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ValueError(f"{where}: bad magic number at byte {offset + pos}: expected 0x{MAGIC:08x}, "
                                 f"got 0x{magic:08x} (not a RecordIO file, or the .idx does not match the .rec)")
            cflag, length = word >> _LENGTH_BITS, word & _LENGTH_MASK
            if cflag > 3 or (cflag in (2, 3)) == first:
                raise ValueError(f"{where}: bad continuation flag at byte {offset + pos}: expected "
                                 f"{'0 or 1' if first else '2 or 3'}, got {cflag}")
            end = pos + 8 + length
            if limit is not None and not parts and cflag == 0 and length >= limit and len(buf) >= pos + 8 + limit:
                return buf[pos + 8:pos + 8 + limit]  # the scan's header fits in the first part
            if len(buf) < end:
                buf += self._pread(offset + len(buf), end - len(buf))
                if len(buf) < end:
                    raise ValueError(f"{where} is truncated: its header says {length} bytes from byte "
                                     f"{offset + pos + 8}, the file has {len(buf) - pos - 8}")
            parts.append(buf[pos + 8:end])
            pos = end + (-length % 4)  # the padding to 4 bytes
            if cflag in (0, 3):
                return b"".join(parts)
            parts.append(_MAGIC_BYTES)  # the writer dropped it where it split the payload
            first = False

    def read_key(self, key: int, limit: int | None = None) -> bytes:
        """The payload (IRHeader, labels, image) of the record with ``key``."""
        slot = int(self._slots(np.array([key]), "record")[0])
        return self.read_record(int(self._offsets[slot]), int(self._extents[slot]), key, limit)

    # ---------------------------------------------------------------- labels

    def _identities(self):
        """(image keys, labels, classes) from the header and identity records, or
        (None, None, None) when the file has none."""
        if self._keys[0] != 0:
            return None, None, None
        flag, labels, _, rest = unpack_header(self.read_key(0))
        if flag < 2 or rest:  # record 0 is an image: no header
            return None, None, None
        first, last = int(labels[0]), int(labels[1])
        if last <= first:  # a header, but no identity records
            return None, None, None
        ranges = np.empty((last - first, 2), dtype=np.int64)
        for k, key in enumerate(range(first, last)):
            flag, bounds, _, _ = unpack_header(self.read_key(key))
            if flag < 2:
                raise ValueError(f"{self.rec_path}: identity record {key} (header record 0 names keys "
                                 f"[{first}, {last}) as identities) must hold an image-key range "
                                 f"[start, end) (flag 2), got flag {flag}")
            ranges[k] = bounds[:2]
        counts = ranges[:, 1] - ranges[:, 0]
        if (counts < 0).any():
            k = int(np.flatnonzero(counts < 0)[0])
            raise ValueError(f"{self.rec_path}: identity record {first + k} must hold a range start <= end, "
                             f"got [{ranges[k, 0]}, {ranges[k, 1]})")
        labels = np.repeat(np.arange(len(ranges)), counts)
        keys = np.repeat(ranges[:, 0] - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts) + np.arange(counts.sum())
        self.has_identity_records = True
        return keys, labels, list(range(len(ranges)))

    def _scan_labels(self):
        """Every key but a header record 0 is an image: read each one's stored label."""
        keys = self._keys
        if keys[0] == 0:
            flag, _, _, rest = unpack_header(self.read_key(0))
            if flag >= 2 and not rest:
                keys = keys[1:]
        stored = np.empty(keys.size, dtype=np.float64)
        slots = self._slots(keys, "image")
        for i, (key, slot) in enumerate(zip(keys.tolist(), slots.tolist())):
            offset, extent = int(self._offsets[slot]), int(self._extents[slot])
            payload = self.read_record(offset, extent, key, _PREFIX_READ)
            flag = struct.unpack_from("<I", payload)[0] if len(payload) >= 4 else 0
            if _IR_HEADER.size + 4 * flag > len(payload):  # more labels than the prefix holds
                payload = self.read_record(offset, extent, key)
            stored[i] = unpack_header(payload)[1][0]  # the first label is the identity
        if stored.size and (stored.min() < 0 or (stored != np.round(stored)).any()):
            raise ValueError(f"{self.rec_path}: image labels must be integers >= 0, got "
                             f"{stored[(stored < 0) | (stored != np.round(stored))][0]}")
        classes, labels = np.unique(stored.astype(np.int64), return_inverse=True)
        self.has_identity_records = False
        return keys, labels, classes.tolist()

    # ---------------------------------------------------------------- images

    def __len__(self) -> int:
        return len(self.keys)

    def read_image_bytes(self, index: int) -> bytes:
        """The encoded image (JPEG or PNG bytes) of item ``index``."""
        slot = self._image_slots[index]
        payload = self.read_record(int(self._offsets[slot]), int(self._extents[slot]), int(self.keys[index]))
        return unpack_header(payload)[3]

    def _decoded(self, index: int) -> np.ndarray:
        data = self.read_image_bytes(index)
        try:
            image = self._decode(data, self.image_size)
        except DECODE_ERRORS as exc:
            # The decoder names only a BytesIO: say which file and record hold the bytes.
            slot = self._image_slots[index]
            where = f"{self.rec_path}: record {int(self.keys[index])} at offset {int(self._offsets[slot])}"
            raise decode_failure(f"{where} (image {index}, decoder {self.decoder})", exc, data) from exc
        if isinstance(image, torch.Tensor):
            image = image.numpy()
        if self.image_size is not None and image.shape[:2] != self.image_size:
            chw = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float()  # a writable copy
            chw = F.interpolate(chw, size=self.image_size, mode="bilinear", align_corners=False, antialias=True)
            image = chw[0].permute(1, 2, 0).round().clamp(0, 255).to(torch.uint8).numpy()
        return image

    def load_uint8(self, indices) -> torch.Tensor:
        """Decoded images uint8 [B, 3, H, W] (RGB) of ``indices``: a channels-last
        view of a [B, H, W, 3] buffer (``.contiguous()`` gives NCHW memory)."""
        images = [self._decoded(i) for i in np.asarray(indices, dtype=np.int64).reshape(-1).tolist()]
        shapes = {image.shape for image in images}
        if len(shapes) > 1:
            raise ValueError(f"{self.rec_path}: images of one batch differ in shape "
                             f"{sorted((s[2], s[0], s[1]) for s in shapes)}: pass image_size=(H, W)")
        if not images:
            return torch.empty(0, *(self.image_size or (0, 0)), 3, dtype=torch.uint8).permute(0, 3, 1, 2)
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)

    def load(self, indices) -> torch.Tensor:
        """Images float [B, 3, H, W] (contiguous) in [-1, 1]: (x / 255 - 0.5) / 0.5,
        arcface_torch's normalisation, computed in place."""
        pixels = self.load_uint8(indices)
        out = torch.empty(pixels.shape, dtype=torch.float32).copy_(pixels)  # the transpose, fused with the cast
        return out.div_(255).sub_(0.5).div_(0.5)


# --------------------------------------------------------------------------- writer


class RecordIOWriter:
    """Writes ``PREFIX.rec`` and ``PREFIX.idx``: ``write(key, payload)`` appends a
    record (split at aligned magic numbers as MXNet's reader expects) and its
    index line. A context manager."""

    def __init__(self, prefix: str | os.PathLike):
        prefix = os.fspath(prefix)
        if prefix.endswith(".rec"):
            prefix = prefix[:-4]
        self.rec_path, self.idx_path = prefix + ".rec", prefix + ".idx"
        parent = os.path.dirname(self.rec_path)
        if parent:
            os.makedirs(parent, exist_ok=True)
        self._rec = open(self.rec_path, "wb")
        self._idx = open(self.idx_path, "w")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def _part(self, cflag: int, data: bytes) -> None:
        if len(data) > _LENGTH_MASK:
            raise ValueError(f"a record part must be at most {_LENGTH_MASK} bytes (29-bit length), got {len(data)}")
        self._rec.write(_FRAME.pack(MAGIC, cflag << _LENGTH_BITS | len(data)))
        self._rec.write(data)

    def write(self, key: int, payload: bytes) -> None:
        offset = self._rec.tell()
        start, found = 0, payload.find(_MAGIC_BYTES)
        while found >= 0:
            if found % 4 == 0:  # only aligned occurrences would confuse a reader resynchronising on magic
                self._part(1 if start == 0 else 2, payload[start:found])
                start = found + 4
            found = payload.find(_MAGIC_BYTES, found + 1)
        self._part(0 if start == 0 else 3, payload[start:])
        self._rec.write(b"\0" * (-(len(payload) - start) % 4))
        self._idx.write(f"{int(key)}\t{offset}\n")


def _encoded_image(path: str, image_size: tuple[int, int] | None, quality: int) -> bytes:
    with open(path, "rb") as f:
        data = f.read()
    # JPEG and PNG as they are (every reader of the format decodes both): no
    # second lossy compression. Anything else, or a resize, is encoded as JPEG.
    if image_size is None and (data[:3] == b"\xff\xd8\xff" or data[:8] == b"\x89PNG\r\n\x1a\n"):
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
    ``shuffle_rec.py`` writes; readers then scan labels). Returns
    {"rec", "idx", "images", "identities"}.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"folder must be a directory of identity folders, got {folder!r} (not a directory)")
    if isinstance(image_size, int):
        image_size = (image_size, image_size)
    if not 1 <= quality <= 100:
        raise ValueError(f"quality must be in [1, 100], got {quality!r}")
    extensions = tuple(e.lower() for e in (extensions or IMAGE_EXTENSIONS))
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir())
    members = [sorted(f for f in os.listdir(os.path.join(folder, c)) if f.lower().endswith(extensions))
               for c in classes]
    total = sum(len(m) for m in members)
    if total == 0:
        raise ValueError(f"folder {folder!r} holds no images with extensions {extensions} in identity folders")
    if total + len(classes) + 1 > _FLOAT32_EXACT:
        raise ValueError(f"the layout stores keys as float32, exact up to {_FLOAT32_EXACT}: expected at most "
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


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m dcq_ops.training.recordio",
                                     description="insightface RecordIO sets (train.rec + train.idx) without mxnet")
    commands = parser.add_subparsers(dest="command", required=True)
    pack = commands.add_parser("pack", help="pack FOLDER/<identity>/<image> into OUT_PREFIX.rec and OUT_PREFIX.idx")
    pack.add_argument("folder")
    pack.add_argument("out_prefix", help="e.g. data/train writes data/train.rec + data/train.idx (config.rec = 'data')")
    pack.add_argument("--image-size", type=int, nargs="+", metavar="N", help="resize to N x N (or H W)")
    pack.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    pack.add_argument("--no-identity-records", action="store_true",
                      help="images only (readers then scan every image's label)")
    info = commands.add_parser("info", help="counts of a .rec (or a directory with train.rec)")
    info.add_argument("path")
    index = commands.add_parser("index", help="write the .idx of a .rec that lacks one (records numbered in "
                                              "file order, as MXNet's tools/rec2idx.py)")
    index.add_argument("rec")
    index.add_argument("--idx", help="where to write it (default: beside the .rec, same stem)")
    args = parser.parse_args(argv)
    if args.command == "index":
        try:
            result = build_index(args.rec, args.idx)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"wrote {result['idx']}: {result['records']} records of {result['rec']}")
        return result
    if args.command == "pack":
        size = args.image_size
        if size is not None and len(size) not in (1, 2):
            parser.error(f"--image-size takes N or H W, got {len(size)} values")
        size = None if size is None else (size[0], size[-1])
        try:
            result = pack_folder(args.folder, args.out_prefix, image_size=size, quality=args.quality,
                                 identity_records=not args.no_identity_records)
        except ValueError as exc:
            parser.error(str(exc))
        print(f"wrote {result['images']} images of {result['identities']} identities to {result['rec']} "
              f"and {result['idx']}")
        return result
    try:
        source = RecordIOImages(args.path)
    except ValueError as exc:
        parser.error(str(exc))
    counts = np.bincount(source.labels.numpy(), minlength=source.num_classes)
    shape = tuple(source.load_uint8([0]).shape[1:])
    result = {"rec": source.rec_path, "images": len(source), "identities": source.num_classes,
              "identity_records": source.has_identity_records, "singletons": int((counts == 1).sum()),
              "first_image_shape": shape}
    print("\n".join(f"{k}: {v}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
