"""dcq-train's checkpoints never lose or overwrite one another (and older ones still resume), a damaged latest
checkpoint resumes from the newest readable step checkpoint, and the log holds one
row per step after a resume."""

import csv
import dataclasses
import json
import os

import pytest
import torch

from dcq_ops.training import TrainConfig, TrainingError, train

# As tests/test_training.py's tiny run: a second or two per run.
TINY = dict(synthetic_identities=120, synthetic_eval_identities=40, image_size=16, width=4, embedding_size=32,
            batch_size=32, queue_size=64, log_every=1, eval_pairs=100, progress="none", threads=1, steps=8)


def _step(path) -> int:
    return torch.load(path, weights_only=False)["step"]


def _truncate(path) -> None:
    """Cut a file in half as a kill during a copy would; a new file, so that a hard link
    to it (checkpoint.pt shares the latest step checkpoint's bytes) keeps its own."""
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
    printed = capsys.readouterr().out
    assert "could not read checkpoint.pt" in printed and "resuming from checkpoint_0000006.pt (step 6)" in printed
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
    with pytest.raises(TrainingError, match="no readable checkpoint in .*could not read checkpoint.pt"):
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
