"""The dcq-train command: exit status 0 on success, 2 with argparse's message naming the
flag for every bad argument (no traceback), 1 with a clear message when the run stops."""

import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from dcq_ops.training import cli
from dcq_ops.training.trainer import Trainer

TINY = ["--threads", "1", "--synthetic-identities", "80", "--synthetic-eval-identities", "20", "--image-size", "16",
        "--width", "4", "--embedding-size", "16", "--batch-size", "16", "--queue-size", "32", "--steps", "4",
        "--log-every", "2", "--eval-pairs", "100", "--progress", "none"]

# (arguments, what stderr must name): each was a traceback, or silently did something else.
BAD = [
    (["--queue-size", "0"], "argument --queue-size"),
    (["--queue-size", "-1"], "argument --queue-size"),
    (["--sample-rate", "0"], "argument --sample-rate"),
    (["--sample-rate", "2"], "argument --sample-rate"),
    (["--queue-size", "8"], "--queue-size"),                       # smaller than the batch
    (["--scale", "0"], "argument --scale"),
    (["--image-size", "3"], "--image-size"),
    (["--data", "/no/such/data"], "argument --data"),
    (["--device", "bogus"], "argument --device"),
    (["--batch-size", "1"], "--batch-size"),
    (["--warmup-epochs", "nan"], "argument --warmup-epochs"),
    (["--clip-grad", "nan"], "argument --clip-grad"),
    (["--stop-after", "-1"], "argument --stop-after"),
    (["--lr", "inf"], "argument --lr"),
    (["--epochs", "nan"], "argument --epochs"),
    (["--momentum", "nan"], "argument --momentum"),
    (["--decay-at", "0.5", "inf"], "argument --decay-at"),
    (["--max-bad-steps", "-1"], "argument --max-bad-steps"),
    (["--validate", "sometimes"], "argument --validate"),
    (["--resume", "/no/such/checkpoint.pt"], "argument --resume"),
    (["--queue-size", "4000", "--batch-size", "4000"], "--batch-size"),  # more than the training samples
    # Issue 28: a segfault, a late error after the data or the steps, a conversion error in the optimizer.
    (["--threads", "100000"], "argument --threads"),
    (["--lr", "1e308"], "argument --lr"),
    (["--weight-decay", "1e308"], "argument --weight-decay"),
    (["--decay-gamma", "1e308", "--schedule", "step"], "argument --decay-gamma"),
    (["--warmup-epochs", "1e308"], "argument --warmup-epochs"),
    (["--eval-pairs", "3"], "argument --eval-pairs"),
    (["--synthetic-eval-identities", "1"], "argument --synthetic-eval-identities"),
    (["--dist-timeout", "0"], "argument --dist-timeout"),
    (["--dist-timeout", "nan"], "argument --dist-timeout"),
    (["--dist-timeout", "1e308"], "argument --dist-timeout"),
]


@pytest.mark.parametrize("args,flag", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_arguments_are_usage_errors(args, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: dcq-train") and "dcq-train: error:" in err and flag in err, err
    assert "Traceback" not in err


def test_a_rec_without_its_idx_and_a_sample_rate_queue_below_the_batch(tmp_path, capsys):
    rec = tmp_path / "train.rec"
    rec.write_bytes(b"\0" * 64)
    without_queue_size = [a for a in TINY if a not in ("--queue-size", "32")]
    cases = ((TINY + ["--data", str(rec)], ["argument --data", "train.idx"]),
             (TINY + ["--queue-size", "0.5"], ["argument --queue-size"]),
             # 80 classes x 0.1 = 8 slots < a batch of 16: found once the data is known
             (without_queue_size + ["--sample-rate", "0.1"], ["--sample-rate", "--batch-size"]))
    for args, words in cases:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words) and "Traceback" not in err, err


def test_run_returns_the_result_and_main_the_status(tmp_path):
    result = cli.run(TINY + ["--output", str(tmp_path)])
    assert result["steps"] == 4 and result["bad_steps"] == 0 and result["skipped_steps"] == []
    assert cli.main(TINY + ["--steps", "2", "--log-every", "1"]) == 0


def test_too_many_bad_steps_exit_1_with_the_reason(monkeypatch, capsys):
    generate = Trainer._class_weights

    def class_weights(self, images):
        weights = generate(self, images)
        if self.step + 1 in (2, 3):
            weights = weights.clone()
            weights[0] = math.nan
        return weights
    monkeypatch.setattr(Trainer, "_class_weights", class_weights)
    assert cli.main(TINY + ["--max-bad-steps", "1"]) == 1
    err = capsys.readouterr().err
    assert "dcq-train: error: stopped at step 4: 2 bad steps, more than --max-bad-steps 1" in err
    assert "Traceback" not in err


def test_no_readable_checkpoint_exit_1(tmp_path, capsys):
    (tmp_path / "checkpoint.pt").write_bytes(b"PK\3\4 not a whole checkpoint")
    assert cli.main(TINY + ["--output", str(tmp_path), "--resume", "auto"]) == 1
    err = capsys.readouterr().err
    assert "no readable checkpoint" in err and "checkpoint.pt" in err and "Traceback" not in err


def _console_script():
    path = shutil.which("dcq-train")
    if path is None:
        pytest.skip("the dcq-train console script is not installed (pip install -e .)")
    return path


def _run(command, **kwargs):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # tiny runs: the CPU, wherever the tests run
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, **kwargs)


def test_the_installed_console_script_exits_0_and_2(tmp_path):
    script = _console_script()
    done = _run([script, *TINY, "--output", str(tmp_path)])
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr and (tmp_path / "result.json").exists()
    assert torch.load(tmp_path / "checkpoint.pt", weights_only=False)["step"] == 4
    # Two of BAD through the script (each start imports torch: seconds); all of them in-process above.
    for args, flag in ((["--queue-size", "0"], "argument --queue-size"),
                       (["--warmup-epochs", "nan"], "argument --warmup-epochs")):
        done = _run([script, *TINY, *args])
        assert done.returncode == 2, (args, done.stderr)
        assert "dcq-train: error:" in done.stderr and flag in done.stderr, (args, done.stderr)
        assert "Traceback" not in done.stderr, done.stderr


def test_python_dash_m_dcq_ops_train_exit_status():
    done = _run([sys.executable, "-m", "dcq_ops.train", *TINY, "--batch-size", "1"])
    assert done.returncode == 2 and "--batch-size" in done.stderr and "Traceback" not in done.stderr


# --------------------------------------------------------------------------- issue 28: checked before the data


def _no_data(monkeypatch):
    """Building the data fails the test: what these settings get wrong is found before it."""
    from dcq_ops.training import trainer as trainer_module

    def build_data(config):
        raise AssertionError("the data was built before the setting was checked")
    monkeypatch.setattr(trainer_module, "build_data", build_data)


def _usage_error(capsys, args) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(TINY + args)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "dcq-train: error:" in err, err
    return err


def _bin(path, pairs=10, size=16, seed=0):
    """A small insightface .bin: random images, half the pairs genuine (the same image twice)."""
    import numpy as np
    from dcq_ops.training.verification import write_bin
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(pairs):
        first = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        images += [first, first if k % 2 == 0 else rng.integers(0, 256, (size, size, 3), dtype=np.uint8)]
        issame.append(k % 2 == 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_bin(path, images, issame)
    return str(path)


def test_outputs_that_cannot_be_written_are_usage_errors_before_the_data(tmp_path, monkeypatch, capsys):
    _no_data(monkeypatch)
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    err = _usage_error(capsys, ["--output", str(a_file)])
    assert f"--output {a_file}: is a file, not a directory" in err
    err = _usage_error(capsys, ["--output", str(a_file / "run")])
    assert f"--output {a_file / 'run'}: cannot write there" in err
    if os.geteuid() != 0:  # root writes through permissions: a read-only directory only stops others
        read_only = tmp_path / "read_only"
        read_only.mkdir(mode=0o500)
        err = _usage_error(capsys, ["--output", str(read_only)])
        assert "cannot write there" in err
    elif not os.access("/sys", os.W_OK) or not os.path.isdir("/sys/kernel"):
        pytest.skip("no place root cannot write to")
    else:  # sysfs: root may not create a directory there
        err = _usage_error(capsys, ["--output", "/sys/dcq-train-output-check"])
        assert "--output /sys/dcq-train-output-check: cannot write there" in err


def test_eval_sets_that_cannot_be_evaluated_are_usage_errors_before_the_data(tmp_path, monkeypatch, capsys):
    pytest.importorskip("PIL")
    _no_data(monkeypatch)
    not_bin = tmp_path / "notbin.bin"
    not_bin.write_bytes(b"these are not the pairs you are looking for")
    err = _usage_error(capsys, ["--eval-bin", str(not_bin)])
    assert "--eval-bin" in err and "notbin.bin" in err and "is not an insightface .bin" in err
    few = _bin(tmp_path / "few.bin", pairs=4)
    err = _usage_error(capsys, ["--eval-bin", few])
    assert "--eval-bin" in err and "holds 4 pairs" in err and "at least 10" in err
    good = _bin(tmp_path / "good.bin")
    err = _usage_error(capsys, ["--eval-bin", good, good])
    assert "--eval-bin" in err and "is given twice" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is of a machine without a GPU")
def test_backend_triton_without_a_gpu_is_a_usage_error_before_the_data(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    _no_data(monkeypatch)
    err = _usage_error(capsys, ["--backend", "triton"])
    assert "--backend triton: backend 'triton' cannot run on cpu" in err


def test_two_eval_sets_with_one_file_name_are_both_evaluated(tmp_path):
    pytest.importorskip("PIL")
    first, second = _bin(tmp_path / "a" / "toy.bin", seed=1), _bin(tmp_path / "b" / "toy.bin", seed=2)
    result = cli.run(TINY + ["--steps", "2", "--eval-bin", first, second, "--output", str(tmp_path / "run")])
    assert {first, second} <= set(result["final_eval"]), result["final_eval"].keys()
    assert "toy.bin" not in result["final_eval"]
    assert result["final_eval"][first]["pairs"] == result["final_eval"][second]["pairs"] == 10


def test_a_resume_on_another_world_size_is_said_on_stderr_without_progress(tmp_path, capsys):
    """A 1-process checkpoint that says it was written by 2 gathered processes: the resume
    renumbers nothing (--steps) but says what changed, on stderr too when --progress is none."""
    out = tmp_path / "run"
    assert cli.main(TINY + ["--output", str(out), "--stop-after", "2"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state.update(world_size=2, queue_mode="gathered")
    state["rng"] = [state["rng"], state["rng"]]
    torch.save(state, tmp_path / "two.pt")
    capsys.readouterr()
    assert cli.main(TINY + ["--output", str(out), "--resume", str(tmp_path / "two.pt")]) == 0
    err = capsys.readouterr().err
    assert "dcq-train: resume: the checkpoint was written by 2 process(es), this run has 1" in err, err
    assert "dcq-train: resume: the DCQ queue was saved in 'gathered' mode and loads in 'none' mode" in err, err


def test_the_queue_too_small_message_says_where_its_size_came_from():
    from dcq_ops.training.build import build_models
    from dcq_ops.training.config import ConfigError, TrainConfig
    small = dict(batch_size=16, image_size=16, width=4, embedding_size=16)
    with pytest.raises(ConfigError) as given:  # two processes: a global batch of 32
        build_models(TrainConfig(queue_size=16, **small), 60, 3, 2, torch.device("cpu"))
    assert "(16 slots = --queue-size 16)" in str(given.value) and "--sample-rate" not in str(given.value).split(")")[0]
    with pytest.raises(ConfigError) as rate:
        build_models(TrainConfig(sample_rate=0.25, **small), 60, 3, 2, torch.device("cpu"))
    assert "(15 slots = ceil(--sample-rate 0.25 x 60 classes))" in str(rate.value)


def test_the_docs_name_files_that_exist():
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for doc in ("benchmarks/ACCURACY.md", "docs/training.md"):
        with open(os.path.join(root, doc)) as f:
            text = f.read()
        for path in set(re.findall(r"`(dcq_ops/[\w/]+\.py)`", text)):
            assert os.path.exists(os.path.join(root, path)), f"{doc} names {path}, which does not exist"
