"""``python -m dcq_ops.check`` on this machine: it runs, writes its JSON, lists what it
skipped (the GPU parts without a GPU) with the reason, exits 0 when every check passed,
1 when one failed (a deliberately wrong backend), and 2 on a bad argument."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcq_ops
from dcq_ops import check, first_contact
from dcq_ops.ops import chunked

ROOT = Path(__file__).resolve().parents[1]
GPU_PARTS = ("triton_configuration", "sync_free_step", "timing")


def run_command(*args, cwd):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("TRITON_INTERPRET", first_contact.SKIP_ENV):
        env.pop(name, None)
    return subprocess.run([sys.executable, "-m", "dcq_ops.check", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.fixture(autouse=True)
def fresh():
    first_contact.reset()
    yield
    first_contact.reset()


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU run (on a GPU, scripts/gpu_check.sh runs the command)")
@pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=dcq_ops.EXTENSION_ERROR or "no extension")
def test_the_command_on_the_cpu(tmp_path):
    out = tmp_path / "check.json"
    result = run_command("--out", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["ok"] is True and data["failures"] == []
    assert data["environment"]["device"] == "cpu" and data["environment"]["torch"] == torch.__version__
    skipped = {s["part"]: s["reason"] for s in data["skipped"]}
    for part in GPU_PARTS:
        assert "no CUDA GPU" in skipped[part], skipped
    assert "Triton runs on CUDA tensors" in skipped["numerics/triton"]
    cases = data["numerics"]["cases"]
    ran = {(c["backend"], c["queue"]) for c in cases}
    assert {("chunked", d) for d in ("float32", "float16", "bfloat16", "float64")} <= ran
    assert {("reference", d) for d in ("float32", "float64")} <= ran
    for case in cases:
        assert case["status"] == "passed" and case["loss_error"] <= case["loss_bound"], case
        assert case["grad_error"] <= case["grad_bound"], case
    outcomes = data["first_contact"]["outcomes"]
    assert {o["status"] for o in outcomes} == {"passed"} and {o["backend"] for o in outcomes} == {"chunked"}
    assert len(outcomes) == 12  # three queue dtypes, with and without the gradient, two batch sizes
    assert {o["comparator"] for o in outcomes} == {"float64"}
    assert {c["against"] for c in cases} == {"float64"}
    assert "[dcq_ops.check] passed" in result.stderr


def test_the_json_goes_to_stdout_by_default(tmp_path):
    result = run_command("--skip", "numerics", "--skip", "first_contact", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(result.stdout)
    assert {"part": "numerics", "reason": "--skip"} in data["skipped"]
    assert list(tmp_path.iterdir()) == []  # nothing written under the working directory


@pytest.mark.parametrize("args,message", [
    (["--device", "gpu"], "argument --device: invalid choice"),
    (["--timing-shape", "1,2"], "expected three positive ints N,K,D"),
    (["--repeats", "0"], "expected a positive int"),
    (["--skip", "everything"], "argument --skip: invalid choice"),
])
def test_a_bad_argument_exits_2(args, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        check.main(args)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_a_bad_argument_exits_2_from_the_shell(tmp_path):
    result = run_command("--out", str(tmp_path / "x.json"), "--repeats", "-1", cwd=tmp_path)
    assert result.returncode == 2 and "expected a positive int" in result.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.parametrize("where,message", [
    ("missing_dir/x.json", "argument --out: the folder .*missing_dir' does not exist"),
    (".", "argument --out: expected a file path or -, got the folder"),
])
def test_an_out_path_that_cannot_be_written_exits_2_before_any_check_runs(tmp_path, monkeypatch, capsys, where,
                                                                          message):
    ran = []
    monkeypatch.setattr(check.command, "run", lambda args: ran.append(args))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        check.main(["--out", where])
    assert exit_info.value.code == 2 and ran == []
    assert re.search(message, capsys.readouterr().err)


def test_the_out_path_is_checked_before_the_checks_from_the_shell(tmp_path):
    result = run_command("--out", "missing_dir/x.json", cwd=tmp_path)
    assert result.returncode == 2 and "does not exist" in result.stderr
    assert "numerics ..." not in result.stderr  # nothing ran
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=dcq_ops.EXTENSION_ERROR or "no extension")
def test_a_numerics_failure_exits_1(tmp_path, monkeypatch, capsys):
    original = chunked.dcq_cross_entropy

    def wrong(*args, **kwargs):
        loss, grad = original(*args, **kwargs)
        return loss + 0.01, grad

    monkeypatch.setattr(chunked, "dcq_cross_entropy", wrong)
    out = tmp_path / "check.json"
    with pytest.warns(RuntimeWarning, match="first-contact check of backend 'chunked' failed"):
        code = check.main(["--out", str(out), "--device", "cpu"])
    assert code == 1
    data = json.loads(out.read_text())
    failed = {f["part"] for f in data["failures"]}
    assert "numerics/chunked/float32/arcface" in failed and "first_contact/chunked/float32" in failed, failed
    demoted = [o for o in data["first_contact"]["outcomes"] if o["status"] == "demoted"]
    assert demoted and all(o["reason"].startswith("loss error") for o in demoted)
    assert not any(p.startswith("numerics/reference") for p in failed)
    assert "demoted by the first-contact check" in data["first_contact"]["backends_after"]["chunked"]


@pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=dcq_ops.EXTENSION_ERROR or "no extension")
def test_a_backend_that_raises_is_reported_demoted_with_its_error(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(chunked, "dcq_cross_entropy", broken)
    out = tmp_path / "check.json"
    with pytest.warns(RuntimeWarning, match="its first call raised RuntimeError: CUDA error: an illegal memory"):
        code = check.main(["--out", str(out), "--device", "cpu", "--skip", "numerics"])
    assert code == 1
    data = json.loads(out.read_text())
    outcomes = [o for o in data["first_contact"]["outcomes"] if o["backend"] == "chunked"]
    assert outcomes and {o["status"] for o in outcomes} == {"demoted"}
    assert {o["reason"] for o in outcomes} == {"RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert {o["fallback"] for o in outcomes} == {"reference"}
    assert "illegal memory access" in data["first_contact"]["backends_after"]["chunked"]
