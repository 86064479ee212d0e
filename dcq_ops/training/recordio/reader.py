"""Reading a RecordIO set: :class:`RecordIOImages` (images and labels, like
:class:`~dcq_ops.training.data.ImageFolder`) and the JPEG decoders it uses.

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
"""

from __future__ import annotations

import io
import os
import struct
import threading

import numpy as np
import torch
import torch.nn.functional as F

from dcq_ops.training.images import DECODE_ERRORS, decode_failure, image_size_pair
from dcq_ops.training.recordio.format import (FLOAT32_EXACT, FRAME, IR_HEADER, LENGTH_BITS, LENGTH_MASK, MAGIC,
                                              MAGIC_BYTES, integral_labels, read_index, resolve_paths,
                                              unpack_header)

_PREFIX_READ = 256  # bytes read per record by the label scan (header + labels)
_FIRST_READ = 1 << 20  # most bytes read at once for a record (an .idx with gaps gives long extents)


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



def check_image_decodes(data: bytes, where: str) -> None:
    """Decode ``data`` in full (Pillow, every pixel: a truncated PNG or JPEG fails,
    where opening it alone would not); :class:`~dcq_ops.training.images.ImageDecodeError`
    naming ``where`` if it does not decode.

    Parameters
    ----------
    data : bytes
        An encoded image (JPEG, PNG).
    where : str
        Where the bytes come from (a file; a .rec, key and offset), for the message.
    """
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except DECODE_ERRORS as exc:
        raise decode_failure(where, exc, data) from exc


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

    Parameters
    ----------
    path : str or os.PathLike
        A ``.rec`` (its ``.idx`` beside it) or a folder holding train.rec and train.idx.
    image_size : int or (int, int), optional
        Resize to this (H, W); None keeps each image's size.
    decoder : str
        "auto", "pil" or "torchvision".
    """

    def __init__(self, path: str | os.PathLike, image_size: int | tuple[int, int] | None = None,
                 decoder: str = "auto"):
        self.rec_path, self.idx_path = resolve_paths(path)
        self.image_size = image_size_pair(image_size)
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
        """Close this process's file (it reopens at the next read)."""
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
            magic, word = FRAME.unpack_from(buf, pos)
            if magic != MAGIC:
                raise ValueError(f"{where}: bad magic number at byte {offset + pos}: expected 0x{MAGIC:08x}, "
                                 f"got 0x{magic:08x} (not a RecordIO file, or the .idx does not match the .rec)")
            cflag, length = word >> LENGTH_BITS, word & LENGTH_MASK
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
            parts.append(MAGIC_BYTES)  # the writer dropped it where it split the payload
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
        # Every key is a line of the .idx: a header naming keys beyond the index's is
        # corrupt (and would size the arrays below by its NaN or 3e9).
        end = int(self._keys[-1]) + 1
        header = integral_labels(labels[:2], 0, end)
        if header is None or header[1] - header[0] > self._keys.size:
            raise ValueError(f"{self.rec_path}: record 0 (the header) must hold key bounds [a, b) that are "
                             f"integers in [0, {end}] (the keys of {self.idx_path} end at {end - 1}), got "
                             f"{labels[:2].tolist()}")
        first, last = int(header[0]), int(header[1])
        if last <= first:  # a header, but no identity records
            return None, None, None
        ranges = np.empty((last - first, 2), dtype=np.int64)
        for k, key in enumerate(range(first, last)):
            flag, bounds, _, _ = unpack_header(self.read_key(key))
            if flag < 2:
                raise ValueError(f"{self.rec_path}: identity record {key} (header record 0 names keys "
                                 f"[{first}, {last}) as identities) must hold an image-key range "
                                 f"[start, end) (flag 2), got flag {flag}")
            checked = integral_labels(bounds[:2], 1, first)
            if checked is None or checked[0] > checked[1]:
                raise ValueError(f"{self.rec_path}: identity record {key} must hold an image-key range "
                                 f"[start, end) with 1 <= start <= end <= {first} (header record 0 says the "
                                 f"images are keys 1..{first - 1}), got {bounds[:2].tolist()}")
            ranges[k] = checked
        # One image, one identity: ranges that overlap would give an image two labels.
        order = np.argsort(ranges[:, 0], kind="stable")
        overlap = np.flatnonzero(ranges[order[1:], 0] < ranges[order[:-1], 1])
        if overlap.size:
            a, b = order[overlap[0]], order[overlap[0] + 1]
            raise ValueError(f"{self.rec_path}: identity records {first + a} and {first + b} hold overlapping "
                             f"image-key ranges [{ranges[a, 0]}, {ranges[a, 1]}) and [{ranges[b, 0]}, "
                             f"{ranges[b, 1]}): an image would have two labels")
        counts = ranges[:, 1] - ranges[:, 0]
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
            if IR_HEADER.size + 4 * flag > len(payload):  # more labels than the prefix holds
                payload = self.read_record(offset, extent, key)
            stored[i] = unpack_header(payload)[1][0]  # the first label is the identity
            # A label inf or 1e30 is no identity (float32 holds integers exactly up to 2**24).
            if integral_labels(stored[i:i + 1], 0, FLOAT32_EXACT) is None:
                raise ValueError(f"{self.rec_path}: record {key} at offset {offset}: an image's label must be "
                                 f"an integer in [0, {FLOAT32_EXACT}], got {stored[i]}")
        classes, labels = np.unique(stored.astype(np.int64), return_inverse=True)
        self.has_identity_records = False
        return keys, labels, classes.tolist()

    # ---------------------------------------------------------------- images

    def verify(self, decode: bool = True, limit: int = 10) -> tuple[int, list[str]]:
        """Read every image record (its framing, its IRHeader) and, with ``decode``,
        decode its image in full: (records checked, the first ``limit`` problems, each
        naming the file, the record's key and offset).

        Parameters
        ----------
        decode : bool
            Decode every image (Pillow, every pixel: a truncated PNG or JPEG fails).
        limit : int
            At most this many problems are described (the count covers them all).

        Returns
        -------
        tuple
            (number of image records with a problem, descriptions of the first ones).
        """
        bad, problems = 0, []
        for index in range(len(self)):
            slot = self._image_slots[index]
            where = f"{self.rec_path}: record {int(self.keys[index])} at offset {int(self._offsets[slot])}"
            try:
                data = self.read_image_bytes(index)
                if decode:
                    check_image_decodes(data, where)
            except ValueError as exc:
                bad += 1
                if len(problems) < limit:
                    problems.append(str(exc))
        return bad, problems

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
