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
