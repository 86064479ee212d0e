"""Every file the package writes is replaced whole (dcq_ops/atomic_write.py): a failure
while writing leaves the old file exactly as it was and no temporary behind; a temporary
left by a kill is never written through. The checkpoints' own faults (truncation, bit
flips, a full disk) are in tests/test_checkpoints.py."""

import os

import numpy as np
import pytest
from PIL import Image

from dcq_ops.atomic_write import atomic_write, write_text
from dcq_ops.training.recordio import RecordIOImages, RecordIOWriter, main


def _faces(root, names=("ann", "bob"), count=3, seed=0):
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).mkdir(parents=True)
        for k in range(count):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{k}.jpg")
    return root


def test_pack_with_a_bad_image_leaves_the_existing_set_intact(tmp_path):
    """`recordio pack` wrote straight to the final .rec/.idx names: one bad image left a
    10 KB .rec and an 88 B .idx in place of the good set."""
    prefix = tmp_path / "data" / "train"
    main(["pack", str(_faces(tmp_path / "good")), str(prefix)])
    rec, idx = (tmp_path / "data" / "train.rec").read_bytes(), (tmp_path / "data" / "train.idx").read_bytes()
    bad = _faces(tmp_path / "bad", names=("ann", "bob", "cy"), count=4, seed=1)
    (bad / "cy" / "9.bmp").write_bytes(b"BM not really a bitmap")  # decoded (not JPEG/PNG): fails last
    with pytest.raises(SystemExit) as caught:
        main(["pack", str(bad), str(prefix)])
    assert caught.value.code == 2
    assert (tmp_path / "data" / "train.rec").read_bytes() == rec
    assert (tmp_path / "data" / "train.idx").read_bytes() == idx
    assert sorted(os.listdir(tmp_path / "data")) == ["train.idx", "train.rec"], "no temporary left behind"
    assert len(RecordIOImages(tmp_path / "data")) == 6, "the good set still reads"


def test_a_writer_that_raises_publishes_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="stop"):
        with RecordIOWriter(tmp_path / "x") as writer:
            writer.write(0, b"payload")
            raise RuntimeError("stop")
    assert os.listdir(tmp_path) == []


def test_atomic_write_keeps_the_old_file_on_failure_and_never_writes_through_a_stale_link(tmp_path):
    target, other = tmp_path / "result.json", tmp_path / "other.json"
    write_text(target, "old\n")
    other.write_text("someone else's\n")
    with pytest.raises(ZeroDivisionError):
        with atomic_write(target, "w") as f:
            f.write("half of the new")
            1 / 0
    assert target.read_text() == "old\n" and not os.path.exists(str(target) + ".tmp")
    # A kill between link and rename (or any earlier writer) left PATH.tmp as a hard link.
    os.link(other, str(target) + ".tmp")
    write_text(target, "new\n")
    assert target.read_text() == "new\n" and other.read_text() == "someone else's\n"
