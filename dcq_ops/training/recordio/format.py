"""insightface's RecordIO format (``train.rec`` + ``train.idx``), without mxnet:
the framing of a record, the ``IRHeader`` of a payload, the ``.idx`` index (read,
checked, or built by walking the records), and where a set's two files are.

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
"""

from __future__ import annotations

import os
import struct
import warnings

import numpy as np

from dcq_ops.atomic_write import atomic_write

MAGIC = 0xCED7230A
MAGIC_BYTES = struct.pack("<I", MAGIC)
FRAME = struct.Struct("<II")        # magic, cflag << 29 | length
LENGTH_BITS = 29
LENGTH_MASK = (1 << LENGTH_BITS) - 1
IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2 (MXNet's IRHeader, 24 bytes)
# Float32 labels hold integers exactly up to 2**24: the limit of image keys and
# identities in insightface's layout (its identity records store key ranges as float32).
FLOAT32_EXACT = 1 << 24


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
            frame = f.read(FRAME.size)
            if len(frame) < FRAME.size:
                raise ValueError(f"{rec_path}: truncated record header at byte {pos}: expected 8 bytes, "
                                 f"got {len(frame)}")
            magic, word = FRAME.unpack(frame)
            if magic != MAGIC:
                raise ValueError(f"{rec_path}: bad magic number at byte {pos}: expected 0x{MAGIC:08x}, got "
                                 f"0x{magic:08x} (not a RecordIO file)")
            cflag, length = word >> LENGTH_BITS, word & LENGTH_MASK
            if cflag > 3 or (cflag in (2, 3)) != inside:
                raise ValueError(f"{rec_path}: bad continuation flag {cflag} at byte {pos}")
            if not inside:
                record_start = pos
            if pos + FRAME.size + length > size:
                raise ValueError(f"{rec_path}: the record at byte {record_start} is truncated: its header says "
                                 f"{length} bytes from byte {pos + FRAME.size}, the file ends at {size}")
            pos += FRAME.size + length + (-length % 4)  # the padding to 4 bytes
            inside = cflag in (1, 2)  # a split record continues in the next frame
            if not inside:
                lines.append(f"{len(lines)}\t{record_start}\n")
    if inside:
        raise ValueError(f"{rec_path}: the last record (at byte {record_start}) lacks its final part")
    with atomic_write(idx_path, "w") as f:  # never a half-written index under the final name
        f.writelines(lines)
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
    if offsets.size > 1:  # one record, one key: two keys at one offset read one image twice
        order = np.argsort(offsets, kind="stable")
        same = np.flatnonzero(offsets[order][1:] == offsets[order][:-1])
        if same.size:
            first, second = order[same[0]], order[same[0] + 1]
            raise ValueError(f"{idx_path}: every offset must belong to one key, got keys {int(keys[first])} and "
                             f"{int(keys[second])} both at offset {int(offsets[first])} ({same.size} such "
                             f"pair(s)): the .idx does not match the .rec; rebuild it with `python -m "
                             f"dcq_ops.training.recordio index`")
    return keys, offsets


def integral_labels(values: np.ndarray, low: int, high: int) -> np.ndarray | None:
    """``values`` (float) as int64 when every one is a finite integer in [low, high],
    else None (the caller names the file and the record)."""
    values = np.asarray(values, dtype=np.float64)
    if not np.isfinite(values).all() or (values != np.round(values)).any() or (values < low).any() \
            or (values > high).any():
        return None
    return values.astype(np.int64)


def unpack_header(payload: bytes) -> tuple[int, np.ndarray, int, bytes]:
    """(flag, labels float32 [max(flag, 1)], id, rest of the payload) of a record's payload."""
    if len(payload) < IR_HEADER.size:
        raise ValueError(f"expected a payload of at least {IR_HEADER.size} bytes (an IRHeader), got {len(payload)}")
    flag, label, rid, _ = IR_HEADER.unpack_from(payload)
    start = IR_HEADER.size
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
        return IR_HEADER.pack(0, float(labels[0]), rid, id2) + data
    return IR_HEADER.pack(labels.size, 0.0, rid, id2) + labels.tobytes() + data

