"""dcq-train's checkpoints never lose or overwrite one another (and older ones still resume), a damaged latest
checkpoint resumes from the newest readable step checkpoint, and the log holds one
row per step after a resume. Faults are injected for real: files truncated in place,
bytes flipped, states that fail to load, a full disk (tmpfs, or a file-size limit)."""

import contextlib
import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dcq_ops.training import TrainConfig, TrainingError, train

# As tests/test_training.py's tiny run: a second or two per run.
TINY = dict(synthetic_identities=120, synthetic_eval_identities=40, image_size=16, width=4, embedding_size=32,
            batch_size=32, queue_size=64, log_every=1, eval_pairs=100, progress="none", threads=1, steps=8)


def _step(path) -> int:
    return torch.load(path, weights_only=False)["step"]


def _truncate(path) -> None:
    """Cut a file in half as a kill during a copy would (a new file under the same name;
    test_checkpoint_pt_is_a_distinct_file_and_survives_truncation_in_place truncates in place)."""
    data = open(path, "rb").read()
    os.remove(path)
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


def test_a_stale_link_left_by_a_kill_does_not_overwrite_an_older_checkpoint(tmp_path):
    config = TrainConfig(**TINY, output=str(tmp_path))
    train(dataclasses.replace(config, stop_after=5))
    step5 = tmp_path / "checkpoint_0000005.pt"
    assert _step(step5) == 5
    # What a kill between save's os.link(step checkpoint, checkpoint.pt.tmp) and its
    # os.replace leaves: checkpoint.pt.tmp, a hard link to the step checkpoint.
    os.link(step5, tmp_path / "checkpoint.pt.tmp")
    train(dataclasses.replace(config, stop_after=6, resume="auto"))
    assert _step(step5) == 5, "the next save wrote step 6 into the older step checkpoint"
    assert _step(tmp_path / "checkpoint_0000006.pt") == 6 and _step(tmp_path / "checkpoint.pt") == 6
    assert not os.path.exists(tmp_path / "checkpoint.pt.tmp")


def test_a_truncated_latest_checkpoint_resumes_from_the_newest_readable_step(tmp_path, capsys):
    config = TrainConfig(**{**TINY, "progress": "lines"}, output=str(tmp_path), save_every=2)
    train(dataclasses.replace(config, stop_after=6))  # step checkpoints 4 and 6 kept, checkpoint.pt = 6
    _truncate(tmp_path / "checkpoint.pt")
    capsys.readouterr()
    result = train(dataclasses.replace(config, resume="auto"))
    assert result["steps"] == 8 and [r["step"] for r in result["history"]] == [7, 8], "resumed at step 6"
    printed = capsys.readouterr()
    assert "skipped checkpoint.pt (failed to verify: not a complete checkpoint archive" in printed.out
    assert "resuming from checkpoint_0000006.pt (step 6)" in printed.out
    assert "skipped checkpoint.pt" in printed.err, "the skipped file is named on stderr too"
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert any(r["kind"] == "message" and "checkpoint_0000006.pt" in r["message"] for r in rows)

    # The newest step checkpoint damaged too: the one before it.
    train(dataclasses.replace(config, stop_after=6, output=str(tmp_path / "b")))
    _truncate(tmp_path / "b" / "checkpoint.pt")
    _truncate(tmp_path / "b" / "checkpoint_0000006.pt")
    result = train(dataclasses.replace(config, resume="auto", output=str(tmp_path / "b")))
    assert [r["step"] for r in result["history"]] == [5, 6, 7, 8], "resumed at step 4"

    # Nothing readable: a clear error, not the zip reader's traceback.
    for name in os.listdir(tmp_path / "b"):
        if name.endswith(".pt"):
            _truncate(tmp_path / "b" / name)
    with pytest.raises(TrainingError, match="no readable checkpoint in .*skipped checkpoint.pt .*checkpoint_0000006.pt"):
        train(dataclasses.replace(config, resume="auto", output=str(tmp_path / "b")))


def test_a_newer_step_checkpoint_than_the_latest_is_resumed(tmp_path, capsys):
    """A kill after a step checkpoint is complete but before checkpoint.pt names it."""
    config = TrainConfig(**{**TINY, "progress": "lines"}, output=str(tmp_path), save_every=2)
    train(dataclasses.replace(config, stop_after=6))
    os.remove(tmp_path / "checkpoint.pt")
    os.link(tmp_path / "checkpoint_0000004.pt", tmp_path / "checkpoint.pt")
    capsys.readouterr()
    result = train(dataclasses.replace(config, resume="auto"))
    assert [r["step"] for r in result["history"]] == [7, 8]
    assert "checkpoint_0000006.pt (step 6) is newer than checkpoint.pt" in capsys.readouterr().out


@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_the_log_has_one_row_per_step_after_a_resume(tmp_path, fmt):
    config = TrainConfig(**TINY, output=str(tmp_path), save_every=3, log_format=fmt)
    train(dataclasses.replace(config, stop_after=5))  # logs steps 1-5; checkpoints at 3 and 5
    # Resumed from step 3 (as after a kill between steps 5 and 6 with only the checkpoint
    # of step 3 on disk): steps 4 and 5 run again.
    train(dataclasses.replace(config, resume=str(tmp_path / "checkpoint_0000003.pt")))
    train(dataclasses.replace(config, resume="auto"))  # a finished run resumed: evaluates again

    if fmt == "csv":
        records = list(csv.DictReader(open(tmp_path / "log.csv")))
    else:
        records = [json.loads(line) for line in open(tmp_path / "log.jsonl")]
    steps = [int(r["step"]) for r in records if r["kind"] == "train"]
    assert steps == list(range(1, 9)), steps
    evals = [(int(r["step"]), r["set"]) for r in records if r["kind"] == "eval"]
    assert sorted(evals) == [(8, "head"), (8, "heldout"), (8, "tail")], "the final evaluation once"


def test_a_checkpoint_from_before_topology_free_checkpoints_still_resumes(tmp_path):
    """Checkpoints written before the world size, the queue mode, the run's total and the
    per-rank generator buffers were saved (and before --queue-mode existed) resume as
    they did: their queue was already the global one (dcq-train had no sharded mode)."""
    config = TrainConfig(**TINY, output=str(tmp_path))
    full = train(dataclasses.replace(config, output=str(tmp_path / "full")))
    train(dataclasses.replace(config, stop_after=5))
    state = torch.load(tmp_path / "checkpoint_0000005.pt", weights_only=False)
    assert state["queue_mode"] == "none" and state["total_steps"] == 8 and state["world_size"] == 1
    assert state["head"]["loss.queue.weights"].device.type == "cpu", "the global queue, ready for any device"
    for key in ("queue_mode", "total_steps", "generator_buffers"):
        del state[key]
    del state["config"]["queue_mode"]
    torch.save(state, tmp_path / "old.pt")
    resumed = train(dataclasses.replace(config, resume=str(tmp_path / "old.pt")))
    assert [r["loss"] for r in resumed["history"]] == [r["loss"] for r in full["history"] if r["step"] > 5]


# ------------------------------------------------------------------ issue 28: nothing lost

def _losses(result, after=0):
    return [r["loss"] for r in result["history"] if r["step"] > after]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The run every fault below must resume into, bit for bit (losses of steps 1..8)."""
    out = tmp_path_factory.mktemp("full")
    return _losses(train(TrainConfig(**TINY, output=str(out))))


def test_checkpoint_pt_is_a_distinct_file_and_survives_truncation_in_place(tmp_path, uninterrupted, capsys):
    """checkpoint.pt was a hard link to the newest step checkpoint: truncating it in place
    truncated both, and with --keep-checkpoints 1 no readable checkpoint was left."""
    config = TrainConfig(**TINY, output=str(tmp_path), keep_checkpoints=1, save_every=2)
    train(dataclasses.replace(config, stop_after=6))
    latest, step6 = tmp_path / "checkpoint.pt", tmp_path / "checkpoint_0000006.pt"
    assert sorted(p.name for p in tmp_path.glob("*.pt")) == ["checkpoint.pt", "checkpoint_0000006.pt"]
    assert os.stat(latest).st_ino != os.stat(step6).st_ino and os.stat(latest).st_nlink == 1
    with open(latest, "r+b") as f:
        f.truncate(os.path.getsize(latest) // 3)  # in place: a hard link would be cut too
    result = train(dataclasses.replace(config, resume="auto"))
    assert _losses(result) == uninterrupted[6:], "resumed at step 6, bit for bit"
    assert "skipped checkpoint.pt" in capsys.readouterr().err


def _flip_mid_file(path, count=64):
    data = bytearray(open(path, "rb").read())
    middle = len(data) // 2
    data[middle:middle + count] = bytes(b ^ 0xFF for b in data[middle:middle + count])
    with open(path, "r+b") as f:  # in place, as a disk or a copy would corrupt it
        f.write(data)


def test_a_bit_flip_inside_a_checkpoint_is_detected_and_the_resume_falls_back(tmp_path, uninterrupted, capsys):
    """64 bytes XOR-ed mid-file used to load silently (torch.load does not check the zip's
    CRC-32s): the resume exited 0 with other weights. Now the file fails to verify."""
    config = TrainConfig(**TINY, output=str(tmp_path), save_every=2)
    train(dataclasses.replace(config, stop_after=6))
    _flip_mid_file(tmp_path / "checkpoint.pt")
    result = train(dataclasses.replace(config, resume="auto"))
    assert _losses(result) == uninterrupted[6:]
    assert "skipped checkpoint.pt (failed to verify: checksum mismatch in member" in capsys.readouterr().err
    # An explicit --resume of the damaged file: refused, naming why (exit 2 from the command).
    _flip_mid_file(tmp_path / "checkpoint_0000006.pt")
    with pytest.raises(ValueError, match="cannot resume the checkpoint: failed to verify: checksum mismatch"):
        train(dataclasses.replace(config, resume=str(tmp_path / "checkpoint_0000006.pt")))


def test_every_member_of_a_checkpoint_is_verified(tmp_path):
    """One flipped bit in any member of the archive (the pickle, each tensor) is found."""
    import zipfile

    from dcq_ops.training.checkpoint_files import verify_checkpoint
    path = tmp_path / "c.pt"
    torch.save({"a": torch.arange(1000.0), "b": torch.ones(7, dtype=torch.long), "step": 3}, path)
    clean = path.read_bytes()
    with zipfile.ZipFile(path) as archive:
        members = [(i.filename, i.header_offset, i.compress_size) for i in archive.infolist() if i.compress_size]
    with open(path, "rb") as f:
        for name, offset, size in members:
            f.seek(offset + 26)
            name_len, extra_len = int.from_bytes(f.read(2), "little"), int.from_bytes(f.read(2), "little")
            data_start = offset + 30 + name_len + extra_len
            damaged = bytearray(clean)
            damaged[data_start + size // 2] ^= 0x01
            path.write_bytes(damaged)
            assert verify_checkpoint(str(path)) == f"checksum mismatch in member {name}", name
    path.write_bytes(clean)
    assert verify_checkpoint(str(path)) is None


def _bad_nan_queue(state):
    state["head"]["loss.queue.weights"][3, 0] = float("nan")


def _bad_rng(state):
    state["rng"]["numpy"]["keys"] = state["rng"]["numpy"]["keys"][:10]


def _bad_step(state):
    state["step"] = "seven"


def _no_backbone(state):
    del state["backbone"]


def _bad_backbone(state):
    key = next(iter(state["backbone"]))
    state["backbone"][key] = torch.zeros(3)


UNLOADABLE = {"nan queue row": (_bad_nan_queue, "failed to load: ValueError: loading ClassQueue (loss.queue.): "
                                                "loss.queue.weights must be finite"),
              "bad rng state": (_bad_rng, "failed to load: ValueError: the numpy RNG state"),
              "string step": (_bad_step, "step must be an int >= 0, got 'seven'"),
              "missing backbone": (_no_backbone, "failed to load: KeyError: 'backbone'"),
              "backbone of another shape": (_bad_backbone, "failed to load: RuntimeError: Error(s) in loading "
                                                           "state_dict for SmallCNN: size mismatch")}


@pytest.mark.parametrize("case", sorted(UNLOADABLE))
def test_resume_auto_falls_back_past_a_file_that_fails_to_load(tmp_path, uninterrupted, capsys, case):
    """A newer checkpoint that reads and verifies but does not load (a NaN queue row, a bad
    RNG state, a string step, a missing backbone) used to end the resume with a traceback
    and exit 1 although an older valid checkpoint was there."""
    change, words = UNLOADABLE[case]
    config = TrainConfig(**TINY, output=str(tmp_path), save_every=2)
    train(dataclasses.replace(config, stop_after=6))
    state = torch.load(tmp_path / "checkpoint_0000006.pt", weights_only=False)
    state["step"] = 7
    change(state)
    torch.save(state, tmp_path / "checkpoint_0000007.pt")  # newer, complete, checksums right
    torch.save(state, tmp_path / "checkpoint.pt")
    result = train(dataclasses.replace(config, resume="auto"))
    assert _losses(result) == uninterrupted[6:], "resumed from step 6 into a trainer as it was built"
    err = capsys.readouterr().err
    # checkpoint.pt (the same state) first, then the step checkpoint, both named with why.
    assert "skipped checkpoint.pt (" in err and ", checkpoint_0000007.pt (" in err and words in err, err
    assert "resuming from checkpoint_0000006.pt (step 6)" in err
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert any(r["kind"] == "message" and ", checkpoint_0000007.pt (" in r["message"] for r in rows)


def test_a_load_that_fails_leaves_the_trainer_as_it_was_built(tmp_path):
    """All or nothing: the backbone of a checkpoint whose queue is refused is not kept."""
    from dcq_ops.training import Trainer
    config = TrainConfig(**TINY, output=str(tmp_path))
    train(dataclasses.replace(config, stop_after=3))
    state = torch.load(tmp_path / "checkpoint_0000003.pt", weights_only=False)
    _bad_nan_queue(state)
    torch.save(state, tmp_path / "bad.pt")
    trainer, fresh = Trainer(config), Trainer(config)
    with pytest.raises(ValueError, match="failed to load: ValueError: .*must be finite"):
        trainer.resume(str(tmp_path / "bad.pt"))
    for mine, theirs in zip(trainer.backbone.state_dict().values(), fresh.backbone.state_dict().values()):
        assert torch.equal(mine, theirs)
    assert trainer.step == 0 and not trainer.optimizer.state


def test_checkpoints_load_with_torch_load_defaults_and_old_rng_tuples_still_resume(tmp_path, uninterrupted):
    """weights_only=True (torch's default since 2.6) refused the pickled numpy RNG state;
    a checkpoint written before the RNG states were tensors still resumes bit for bit."""
    import numpy as np
    config = TrainConfig(**TINY, output=str(tmp_path))
    train(dataclasses.replace(config, stop_after=5))
    state = torch.load(tmp_path / "checkpoint_0000005.pt")  # weights_only=True
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    # The older form: numpy's and Python's own tuples (the same streams).
    numpy_rng, python_rng = state["rng"]["numpy"], state["rng"]["python"]
    state["rng"]["numpy"] = (numpy_rng["kind"], numpy_rng["keys"].numpy().astype(np.uint32), numpy_rng["pos"],
                             numpy_rng["has_gauss"], numpy_rng["cached_gaussian"])
    state["rng"]["python"] = (python_rng["version"], tuple(python_rng["state"].tolist()), python_rng["gauss_next"])
    torch.save(state, tmp_path / "old_rng.pt")
    resumed = train(dataclasses.replace(config, resume=str(tmp_path / "old_rng.pt")))
    assert _losses(resumed) == uninterrupted[5:]


def test_checkpoint_writes_fsync_the_file_and_the_directory(tmp_path, monkeypatch):
    from dcq_ops.training.checkpoint_files import write_checkpoint
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    if not os.path.exists("/proc/self/fd"):
        pytest.skip("no /proc/self/fd to name the synced files")
    monkeypatch.setattr(os, "fsync", fsync)
    write_checkpoint({"step": 1, "x": torch.ones(3)}, str(tmp_path), 1, keep=1)
    out = os.path.realpath(tmp_path)
    assert os.path.join(out, "checkpoint_0000001.pt.tmp") in synced, synced
    assert os.path.join(out, "checkpoint.pt.tmp") in synced, synced
    assert synced.count(out) >= 2, "the directory after each rename"
    # the file is synced before its rename: its temporary name is what was open
    assert synced.index(os.path.join(out, "checkpoint_0000001.pt.tmp")) < synced.index(out)


# ------------------------------------------------------------------ a full disk

@contextlib.contextmanager
def _small_disk(path, size):
    """A tmpfs of ``size`` bytes at ``path`` (None where it cannot be mounted: not root, no
    mount command, a container without the capability)."""
    path.mkdir()
    mount = shutil.which("mount")
    if mount is None or not hasattr(os, "geteuid") or os.geteuid() != 0:
        yield None
        return
    done = subprocess.run([mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode != 0:
        yield None
        return
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _step4(tmp_path):
    """A run stopped after step 4 (checkpoint_0000004.pt and checkpoint.pt), and one
    checkpoint's size."""
    config = TrainConfig(**TINY, save_every=2, keep_checkpoints=1, output=str(tmp_path / "ref"))
    train(dataclasses.replace(config, stop_after=4))
    return config, os.path.getsize(tmp_path / "ref" / "checkpoint.pt")


def _copy_run(source, target):
    for name in os.listdir(source):
        shutil.copy(os.path.join(source, name), os.path.join(target, name))


def test_a_full_disk_is_a_clear_error_that_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    """A full disk gave "enforce fail ... unexpected pos" and left a stale .tmp."""
    from dcq_ops.training.checkpoint_files import verify_checkpoint
    config, size = _step4(tmp_path)
    used = sum(os.path.getsize(tmp_path / "ref" / n) for n in os.listdir(tmp_path / "ref"))
    with _small_disk(tmp_path / "disk", used + size // 2 + 8192) as disk:
        if disk is not None:
            _copy_run(tmp_path / "ref", disk)
            with pytest.raises(TrainingError, match="could not write the checkpoint of step 6 .*No space left on "
                                                    "device.*checkpoint.pt, checkpoint_0000004.pt"):
                train(dataclasses.replace(config, output=str(disk), resume="auto", stop_after=6))
            names = sorted(os.listdir(disk))
        else:  # no tmpfs here: a file-size limit in a child process (EFBIG instead of ENOSPC)
            disk = tmp_path / "limited"
            disk.mkdir()
            _copy_run(tmp_path / "ref", disk)
            code = ("import dataclasses, resource, signal\n"
                    "from dcq_ops.training import TrainConfig, TrainingError, train\n"
                    f"config = TrainConfig(**{dict(TINY, save_every=2, keep_checkpoints=1)!r}, output={str(disk)!r},"
                    " resume='auto', stop_after=6)\n"
                    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
                    f"resource.setrlimit(resource.RLIMIT_FSIZE, ({size // 2}, {size // 2}))\n"
                    "try:\n    train(config)\nexcept TrainingError as exc:\n    print('ERROR', exc)\n")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
            assert "ERROR could not write the checkpoint of step 6" in done.stdout, done.stdout + done.stderr
            assert "File too large" in done.stdout
            names = sorted(os.listdir(disk))
        assert names == ["checkpoint.pt", "checkpoint_0000004.pt", "log.csv"], "no temporary left"
        for name in ("checkpoint.pt", "checkpoint_0000004.pt"):
            assert verify_checkpoint(str(disk / name)) is None and _step(disk / name) == 4
        # Space freed (here: another directory): the run resumes from step 4, bit for bit.
        target = tmp_path / "resumed"
        target.mkdir()
        _copy_run(disk, target)
        result = train(dataclasses.replace(config, output=str(target), resume="auto"))
        assert _losses(result) == uninterrupted[4:]


def test_a_stale_temporary_on_a_full_disk_does_not_break_the_resume(tmp_path, uninterrupted):
    """A kill mid-write left checkpoint_*.pt.tmp filling the disk; the resume then failed with
    ENOSPC in RunLog.truncate. The resume removes what a run left under temporary names."""
    config, size = _step4(tmp_path)
    used = sum(os.path.getsize(tmp_path / "ref" / n) for n in os.listdir(tmp_path / "ref"))
    with _small_disk(tmp_path / "disk", used + 3 * size) as disk:
        if disk is None:
            pytest.skip("no tmpfs can be mounted here (needs root): a full disk cannot be made")
        _copy_run(tmp_path / "ref", disk)
        with open(disk / "checkpoint_0000006.pt.tmp", "wb") as f:  # what a kill mid-write leaves, disk full
            with contextlib.suppress(OSError):
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        with open(disk / "log.csv", "a") as f:
            f.write("train,5,,,,,,,,,,,,,,,lost\n")  # a row after the checkpoint: truncate must rewrite the log
        result = train(dataclasses.replace(config, output=str(disk), resume="auto"))
        assert _losses(result) == uninterrupted[4:]
        assert not any(n.endswith(".tmp") for n in os.listdir(disk))
