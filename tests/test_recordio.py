"""insightface RecordIO (train.rec + train.idx) without mxnet: the writer, the
reader, two views from it, training from it, and the errors of broken files."""

import math
import os
import pickle
import struct

import numpy as np
import pytest
import torch

from dcq_ops.training import cli
from dcq_ops.training.data import TwoViewBatchSampler, TwoViewDataset, batch_loader
from dcq_ops.training.sources import ImageFolder
from dcq_ops.training.recordio import (MAGIC, RecordIOImages, RecordIOWriter, is_recordio, main, pack_folder,
                                       pack_payload, unpack_header)

Image = pytest.importorskip("PIL.Image")

# Identity sizes: "ann" 3, "bob" 1 (a singleton), "cy" 2, "dee" 4.
IDENTITIES = (("ann", 3), ("bob", 1), ("cy", 2), ("dee", 4))


def make_faces(root, identities=IDENTITIES, size=12, seed=0):
    """Random RGB JPEGs, one folder per identity; every image differs."""
    rng = np.random.default_rng(seed)
    for name, count in identities:
        (root / name).mkdir(parents=True)
        for k in range(count):
            array = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{k}.jpg", quality=90)
    return root


@pytest.fixture
def packed(tmp_path):
    faces = make_faces(tmp_path / "faces")
    result = pack_folder(faces, tmp_path / "data" / "train")
    return faces, tmp_path / "data", result


def index_lines(path):
    return [tuple(int(v) for v in line.split("\t")) for line in path.read_text().splitlines()]


def test_packed_set_reads_back_exactly(packed):
    faces, data, result = packed
    assert result == {"rec": str(data / "train.rec"), "idx": str(data / "train.idx"), "images": 10, "identities": 4}
    assert is_recordio(data) and is_recordio(data / "train.rec") and not is_recordio(faces)
    source = RecordIOImages(data)
    assert source.has_identity_records and source.num_classes == 4
    assert source.labels.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    assert source.keys.tolist() == list(range(1, 11))  # key 0 is the header, 11..14 the identities
    # JPEG files are stored as they are: the decoded pixels equal Pillow's decoding of the files.
    folder = ImageFolder(faces)
    assert folder.labels.tolist() == source.labels.tolist()
    torch.testing.assert_close(source.load(np.arange(10)), folder.load(np.arange(10)), rtol=0, atol=0)
    # The same set through the .rec path, and resized.
    assert RecordIOImages(data / "train.rec").labels.tolist() == source.labels.tolist()
    assert RecordIOImages(data, image_size=(8, 6)).load([0, 5]).shape == (2, 3, 8, 6)


def test_layout_matches_insightface(packed):
    _, data, _ = packed
    source = RecordIOImages(data)
    flag, labels, _, rest = unpack_header(source.read_key(0))
    assert (flag, labels.tolist(), rest) == (2, [11.0, 15.0], b"")  # images 1..10, identities 11..14
    ranges = [unpack_header(source.read_key(k))[1].tolist() for k in range(11, 15)]
    assert ranges == [[1, 4], [4, 5], [5, 7], [7, 11]]
    flag, labels, rid, jpeg = unpack_header(source.read_key(7))  # dee's first image
    assert (flag, labels.tolist(), rid, jpeg[:3]) == (0, [3.0], 7, b"\xff\xd8\xff")
    lines = index_lines(data / "train.idx")
    assert [k for k, _ in lines] == list(range(15))
    raw = (data / "train.rec").read_bytes()
    assert all(struct.unpack_from("<I", raw, offset)[0] == MAGIC and offset % 4 == 0 for _, offset in lines)


def test_two_views_are_other_images_of_the_identity(packed):
    _, data, _ = packed
    dataset = TwoViewDataset(str(data), augment=None, seed=3)  # a path: RecordIO is recognised
    assert isinstance(dataset.source, RecordIOImages)
    counts = dataset.counts[dataset.labels]
    for epoch in range(3):
        a, b, labels = dataset.get_batch(np.arange(len(dataset)), epoch)
        partners = dataset.partner(np.arange(len(dataset)), epoch)
        assert torch.equal(dataset.labels[torch.from_numpy(partners)], labels)
        for i in range(len(dataset)):
            if counts[i] > 1:  # never the image itself: a real second image of the identity
                assert partners[i] != i and not torch.equal(a[i], b[i])
            else:
                assert partners[i] == i and torch.equal(a[i], b[i])


def test_workers_open_their_own_file_and_match_in_process(packed):
    _, data, _ = packed
    source = RecordIOImages(data)
    source.load([0])
    assert source._fd is not None
    clone = pickle.loads(pickle.dumps(source))  # what a spawned worker receives
    assert clone._fd is None
    torch.testing.assert_close(clone.load([3, 4]), source.load([3, 4]), rtol=0, atol=0)
    dataset = TwoViewDataset(source, seed=1)
    sampler = TwoViewBatchSampler(len(dataset), 3, seed=1)
    local = list(batch_loader(dataset, sampler, epoch=2))
    workers = list(batch_loader(dataset, sampler, epoch=2, num_workers=2))
    assert len(local) == len(workers) == 3
    for x, y in zip(local, workers):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_dcq_train_runs_on_a_rec(packed, tmp_path):
    _, data, _ = packed
    # cli.run: dcq-train in-process, returning the result (cli.main returns the exit status).
    result = cli.run(["--data", str(data / "train.rec"), "--backbone", "small_cnn", "--width", "4",
                       "--embedding-size", "8", "--image-size", "12", "--batch-size", "4", "--queue-size", "8",
                       "--steps", "3", "--threads", "1", "--progress", "none", "--output", str(tmp_path / "run")])
    assert result["steps"] == 3
    losses = [r["loss"] for r in result["history"]]
    assert losses and all(np.isfinite(losses))
    assert os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_no_identity_records_falls_back_to_a_label_scan(tmp_path):
    faces = make_faces(tmp_path / "faces")
    pack_folder(faces, tmp_path / "flat", identity_records=False)
    assert [k for k, _ in index_lines(tmp_path / "flat.idx")] == list(range(10))  # key 0 is an image
    source = RecordIOImages(tmp_path / "flat.rec")
    assert not source.has_identity_records
    assert source.labels.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    assert source.keys.tolist() == list(range(10))
    torch.testing.assert_close(source.load(np.arange(10)), ImageFolder(faces).load(np.arange(10)), rtol=0, atol=0)


def test_png_is_stored_as_is_and_other_formats_become_jpeg(tmp_path):
    rng = np.random.default_rng(4)
    smooth = np.stack([*np.meshgrid(np.arange(7) * 20, np.arange(9) * 15), np.full((9, 7), 90)], -1)
    arrays = [rng.integers(0, 256, (9, 7, 3), dtype=np.uint8), smooth.astype(np.uint8)]
    (tmp_path / "faces" / "p").mkdir(parents=True)
    Image.fromarray(arrays[0]).save(tmp_path / "faces" / "p" / "0.png")
    Image.fromarray(arrays[1]).save(tmp_path / "faces" / "p" / "1.bmp")
    pack_folder(tmp_path / "faces", tmp_path / "mixed")
    source = RecordIOImages(tmp_path / "mixed.rec")
    assert source.read_image_bytes(0) == (tmp_path / "faces" / "p" / "0.png").read_bytes()
    assert source.read_image_bytes(1)[:3] == b"\xff\xd8\xff"  # BMP -> JPEG
    pixels = source.load_uint8([0, 1]).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(pixels[0], arrays[0])  # PNG: lossless
    error = np.abs(pixels[1].astype(int) - arrays[1])
    assert 0 < error.max() and error.mean() < 4  # JPEG at quality 95 of a smooth image: close, not equal


def test_scan_renumbers_sparse_labels_and_reads_label_arrays(tmp_path):
    jpeg = (make_faces(tmp_path / "faces", (("x", 1),)) / "x" / "0.jpg").read_bytes()
    with RecordIOWriter(tmp_path / "sparse") as writer:
        writer.write(0, pack_payload(7, jpeg))
        writer.write(1, pack_payload([40, 0.5], jpeg))  # a label array: the first entry is the identity
        writer.write(2, pack_payload(7, jpeg))
    source = RecordIOImages(tmp_path / "sparse.rec")
    assert source.classes == [7, 40] and source.labels.tolist() == [0, 1, 0]


def test_payloads_holding_the_magic_number_are_split_and_rejoined(tmp_path):
    magic = struct.pack("<I", MAGIC)
    images = [b"abcd" + magic + b"xyz" + magic + b"q",  # aligned (split) at 28, unaligned at 35
              magic + magic + b"12345",                  # two aligned occurrences, at the start of the image
              b"ab" + magic + b"cd"]                      # unaligned only: one part
    with RecordIOWriter(tmp_path / "m") as writer:
        for key, image in enumerate(images):
            writer.write(key, pack_payload(key, image))
    raw = (tmp_path / "m.rec").read_bytes()
    aligned = sum(struct.unpack_from("<I", raw, p)[0] == MAGIC for p in range(0, len(raw) - 3, 4))
    assert aligned == 3 + 3  # one frame per record, plus one per aligned occurrence
    source = RecordIOImages(tmp_path / "m.rec")
    assert [source.read_image_bytes(i) for i in range(3)] == images


def test_broken_files_raise_clear_errors(packed, tmp_path):
    faces, data, _ = packed
    raw = bytearray((data / "train.rec").read_bytes())
    offsets = dict(index_lines(data / "train.idx"))

    os.remove(data / "train.idx")
    with pytest.raises(ValueError, match=r"train\.rec: its index .*train\.idx is missing"):
        RecordIOImages(data)

    def write(name, content, idx_lines):
        (tmp_path / f"{name}.rec").write_bytes(bytes(content))
        (tmp_path / f"{name}.idx").write_text("".join(f"{k}\t{o}\n" for k, o in idx_lines))
        return tmp_path / f"{name}.rec"

    lines = sorted(offsets.items())
    bad = raw.copy()
    bad[offsets[3]:offsets[3] + 4] = b"JUNK"
    source = RecordIOImages(write("magic", bad, lines))  # opens: image records are read on load
    with pytest.raises(ValueError, match=r"magic\.rec: record 3 at offset \d+: bad magic number at byte \d+: "
                                         r"expected 0xced7230a, got 0x4b4e554a"):
        source.load([2])
    bad = raw.copy()
    bad[0:4] = b"\0\0\0\0"
    with pytest.raises(ValueError, match=r"record 0 at offset 0: bad magic number .* got 0x00000000"):
        RecordIOImages(write("header", bad, lines))

    # Truncated in the last image of a file without identity records.
    pack_folder(faces, tmp_path / "flat", identity_records=False)
    flat = (tmp_path / "flat.rec").read_bytes()
    flat_lines = index_lines(tmp_path / "flat.idx")
    last = flat_lines[-1][1]
    length = struct.unpack_from("<I", flat, last + 4)[0] & ((1 << 29) - 1)
    source = RecordIOImages(write("truncated", flat[:last + 8 + 300], flat_lines))
    with pytest.raises(ValueError, match=rf"truncated\.rec: record 9 at offset {last} is truncated: its header "
                                         rf"says {length} bytes from byte {last + 8}, the file has 300"):
        source.load([9])
    assert source.load([8]).shape[0] == 1  # the other records still read

    with pytest.raises(ValueError, match=r"line 2: expected 'key<TAB>offset' \(two integers\), got '1\\tx'"):
        RecordIOImages(write("idx", raw, [(0, 0), (1, "x")]))
    with pytest.raises(ValueError, match=r"offsets must be in \[0, \d+\) \(the \.rec's size\), got 99999999"):
        RecordIOImages(write("offset", raw, [(0, 0), (1, 99999999)]))
    with pytest.raises(ValueError, match=r"expected the identity key|expected the record key"):
        RecordIOImages(write("gap", raw, [(k, o) for k, o in lines if k != 12]))
    with pytest.raises(ValueError, match="does not exist"):
        RecordIOImages(tmp_path / "nowhere.rec")
    with pytest.raises(ValueError, match="directory without train.rec"):
        RecordIOImages(tmp_path / "faces")


def test_command_line_packs_and_describes(tmp_path, capsys):
    faces = make_faces(tmp_path / "faces")
    result = main(["pack", str(faces), str(tmp_path / "out" / "train"), "--image-size", "8"])
    assert result["images"] == 10
    info = main(["info", str(tmp_path / "out")])
    assert info["identities"] == 4 and info["singletons"] == 1 and info["first_image_shape"] == (3, 8, 8)
    assert "identity_records: True" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["pack", str(tmp_path / "missing"), str(tmp_path / "x")])
    assert "not a directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- issue 18: errors and the command line


def _image_span(raw, offset):
    """(start, end) in the .rec of the image bytes of the unsplit record at ``offset``."""
    word = struct.unpack_from("<I", raw, offset + 4)[0]
    assert word >> 29 == 0, "the test expects a record in one part"
    length = word & ((1 << 29) - 1)
    return offset + 8 + 24, offset + 8 + length  # after the frame and the IRHeader (flag 0: no label array)


@pytest.mark.parametrize("damage", ["zeros", "truncated_jpeg"])
def test_a_corrupt_image_names_the_file_the_key_and_the_offset(packed, tmp_path, damage):
    from dcq_ops.training.images import ImageDecodeError
    _, data, _ = packed
    raw = bytearray((data / "train.rec").read_bytes())
    offsets = dict(index_lines(data / "train.idx"))
    start, end = _image_span(raw, offsets[5])  # key 5: image 4 (cy's first)
    if damage == "zeros":
        raw[start:end] = bytes(end - start)  # no image format at all
    else:
        raw[start + 200:end] = bytes(end - start - 200)  # a JPEG header, then no scan data
    (tmp_path / "bad.rec").write_bytes(bytes(raw))
    (tmp_path / "bad.idx").write_bytes((data / "train.idx").read_bytes())
    source = RecordIOImages(tmp_path / "bad.rec", decoder="pil")
    with pytest.raises(ImageDecodeError) as caught:
        source.load([3, 4])
    message = str(caught.value)
    assert f"bad.rec: record 5 at offset {offsets[5]}" in message
    assert "image 4" in message and "cannot decode the image" in message
    assert isinstance(caught.value, ValueError)  # callers catching the data layer's ValueErrors catch it
    assert isinstance(caught.value.__cause__, Exception) and caught.value.__cause__ is not caught.value
    if damage == "zeros":
        assert "starting 00 00 00 00" in message
        assert isinstance(caught.value.__cause__, Image.UnidentifiedImageError)
    assert source.load([3, 5]).shape[0] == 2  # the other records still read


def test_packing_an_unreadable_file_names_it(tmp_path):
    (tmp_path / "faces" / "a").mkdir(parents=True)
    (tmp_path / "faces" / "a" / "0.bmp").write_bytes(b"BM not really a bitmap")
    from dcq_ops.training.images import ImageDecodeError
    with pytest.raises(ImageDecodeError, match=r"faces/a/0\.bmp: cannot decode the image"):
        pack_folder(tmp_path / "faces", tmp_path / "out")


def test_index_command_rebuilds_a_missing_idx(packed, tmp_path, capsys):
    _, data, _ = packed
    original = (data / "train.idx").read_text()
    os.remove(data / "train.idx")
    with pytest.raises(ValueError, match=r"found .*train\.rec but not .*train\.idx beside it.*"
                                         r"python -m dcq_ops\.training\.recordio index"):
        RecordIOImages(data)
    result = main(["index", str(data / "train.rec")])
    assert result["records"] == 15 and "15 records" in capsys.readouterr().out
    assert (data / "train.idx").read_text() == original  # the writer writes keys in order: the same index
    assert RecordIOImages(data).labels.tolist() == [0, 0, 0, 1, 2, 2, 3, 3, 3, 3]
    # Split records (payloads holding the magic number) are one record of the index.
    magic = struct.pack("<I", MAGIC)
    with RecordIOWriter(tmp_path / "m") as writer:
        for key, image in enumerate([b"abcd" + magic + b"xyz" + magic, b"plain", magic + magic]):
            writer.write(key, pack_payload(key, image))
    written = (tmp_path / "m.idx").read_text()
    main(["index", str(tmp_path / "m.rec"), "--idx", str(tmp_path / "again.idx")])
    assert (tmp_path / "again.idx").read_text() == written
    (tmp_path / "junk.rec").write_bytes(b"JUNK" * 4)
    with pytest.raises(SystemExit) as caught:
        main(["index", str(tmp_path / "junk.rec")])
    assert caught.value.code == 2 and "bad magic number at byte 0" in capsys.readouterr().err


def _run_module(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "dcq_ops.training.recordio", *args], capture_output=True,
                          text=True, timeout=300)


def test_module_command_runs_without_a_runpy_warning(tmp_path):
    faces = make_faces(tmp_path / "faces", (("a", 2), ("b", 1)), size=8)
    packed = _run_module("pack", str(faces), str(tmp_path / "out" / "train"))
    assert packed.returncode == 0, packed.stderr
    assert "RuntimeWarning" not in packed.stderr and "found in sys.modules" not in packed.stderr
    assert "wrote 3 images of 2 identities" in packed.stdout
    info = _run_module("info", str(tmp_path / "out"))
    assert info.returncode == 0, info.stderr
    assert info.stderr == "" and "identities: 2" in info.stdout
    for bad in ([], ["frobnicate"], ["info"], ["info", str(tmp_path / "nowhere.rec")]):
        failed = _run_module(*bad)
        assert failed.returncode == 2, (bad, failed.stderr)
        assert "RuntimeWarning" not in failed.stderr and "usage:" in failed.stderr


# --------------------------------------------------------------------------- issue 28 item 13: refuse what cannot be read honestly


def _jpeg(seed=0, size=8):
    import io
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "JPEG")
    return out.getvalue()


def _write_set(path, header, images, identities=()):
    """A .rec/.idx in insightface's layout from parts: ``header`` the labels of record 0
    (None: no header, images from key 0), ``images`` their stored labels, ``identities``
    the [start, end) of each identity record (after the images)."""
    with RecordIOWriter(path) as writer:
        key = 0
        if header is not None:
            writer.write(0, pack_payload(np.array(header, dtype=np.float32)))
            key = 1
        for i, label in enumerate(images):
            writer.write(key, pack_payload(label, _jpeg(i)))
            key += 1
        for bounds in identities:
            writer.write(key, pack_payload(np.array(bounds, dtype=np.float32)))
            key += 1
    return path.with_suffix(".rec")


def test_a_consistent_hand_made_set_reads(tmp_path):
    """The helper's layout is insightface's: 4 images, identities [1, 3) and [3, 5)."""
    source = RecordIOImages(_write_set(tmp_path / "ok", [5, 7], [0, 0, 1, 1], [(1, 3), (3, 5)]))
    assert source.labels.tolist() == [0, 0, 1, 1] and source.has_identity_records
    assert source.verify() == (0, [])


def test_two_index_keys_at_one_offset_are_refused(packed, tmp_path):
    _, data, _ = packed
    lines = index_lines(data / "train.idx")
    offsets = dict(lines)
    (tmp_path / "dup.rec").write_bytes((data / "train.rec").read_bytes())
    (tmp_path / "dup.idx").write_text("".join(f"{k}\t{offsets[2] if k == 3 else o}\n" for k, o in lines))
    with pytest.raises(ValueError, match=rf"dup\.idx: every offset must belong to one key, got keys 2 and 3 both "
                                         rf"at offset {offsets[2]}"):
        RecordIOImages(tmp_path / "dup.rec")


def test_overlapping_identity_ranges_are_refused(tmp_path):
    rec = _write_set(tmp_path / "overlap", [5, 7], [0, 0, 1, 1], [(1, 4), (3, 5)])
    with pytest.raises(ValueError, match=r"overlap\.rec: identity records 5 and 6 hold overlapping image-key "
                                         r"ranges \[1, 4\) and \[3, 5\): an image would have two labels"):
        RecordIOImages(rec)


@pytest.mark.parametrize("label", [math.inf, -math.inf, math.nan, 1e30, 2.5, -1.0])
def test_a_stored_label_that_is_no_identity_is_refused(tmp_path, label):
    """Without identity records the labels are the images' own: inf, NaN, 1e30 (beyond
    float32's exact integers), fractions and negatives name the file, the key and the offset."""
    rec = _write_set(tmp_path / "labels", None, [0, 1, label, 1])
    offset = index_lines(tmp_path / "labels.idx")[2][1]
    with pytest.raises(ValueError, match=rf"labels\.rec: record 2 at offset {offset}: an image's label must be an "
                                         rf"integer in \[0, 16777216\], got"):
        RecordIOImages(rec)


@pytest.mark.parametrize("header", [[math.nan, 7], [5, math.nan], [5, 3e9], [-1, 7], [5.5, 7]])
def test_a_bad_header_range_names_the_file_and_is_bounded_by_the_records(tmp_path, header):
    rec = _write_set(tmp_path / "header", header, [0, 0, 1, 1], [(1, 3), (3, 5)])
    with pytest.raises(ValueError, match=r"header\.rec: record 0 \(the header\) must hold key bounds \[a, b\) that "
                                         r"are integers in \[0, 7\] \(the keys of .*header\.idx end at 6\), got"):
        RecordIOImages(rec)


@pytest.mark.parametrize("bounds", [(1, 3e9), (math.nan, 3), (0, 3), (3, 2), (1, 6)])
def test_an_identity_range_beyond_the_images_is_refused(tmp_path, bounds):
    """A range of 3e9 once sized a 44.7 GiB array: ranges lie within the images
    (keys 1..a-1 of header [a, b)), so the file's record count bounds them."""
    rec = _write_set(tmp_path / "range", [5, 7], [0, 0, 1, 1], [bounds, (3, 5)])
    with pytest.raises(ValueError, match=r"range\.rec: identity record 5 must hold an image-key range \[start, end\) "
                                         r"with 1 <= start <= end <= 5"):
        RecordIOImages(rec)


def test_info_fails_on_a_set_with_a_corrupt_record(packed, tmp_path, capsys):
    _, data, _ = packed
    raw = bytearray((data / "train.rec").read_bytes())
    offsets = dict(index_lines(data / "train.idx"))
    start, end = _image_span(raw, offsets[5])
    raw[start + 200:end] = bytes(end - start - 200)  # a JPEG header, then no scan data
    (tmp_path / "bad.rec").write_bytes(bytes(raw))
    (tmp_path / "bad.idx").write_bytes((data / "train.idx").read_bytes())
    assert main(["info", str(data)])["images"] == 10  # the intact set
    with pytest.raises(SystemExit) as caught:
        main(["info", str(tmp_path / "bad.rec")])
    err = capsys.readouterr().err
    assert caught.value.code == 2
    assert "bad.rec: 1 of 10 image records do not read or decode" in err and f"record 5 at offset {offsets[5]}" in err
    assert main(["info", str(tmp_path / "bad.rec"), "--quick"])["images"] == 10  # counts only, as asked


def test_pack_refuses_a_truncated_png(tmp_path):
    import io
    from dcq_ops.training.images import ImageDecodeError
    (tmp_path / "faces" / "a").mkdir(parents=True)
    out = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(out, "PNG")
    png = out.getvalue()
    (tmp_path / "faces" / "a" / "0.png").write_bytes(png)
    (tmp_path / "faces" / "a" / "1.png").write_bytes(png[:len(png) // 2])  # a PNG signature, half its data
    with pytest.raises(ImageDecodeError, match=r"faces/a/1\.png: cannot decode the image"):
        pack_folder(tmp_path / "faces", tmp_path / "out" / "train")
    assert not (tmp_path / "out" / "train.rec").exists()
