"""The probe of a Gluon sm_90 kernel (the seesaw, the pipelined one) in a child process
(dcq_ops/triton/hopper_probe.py). The kernels' selection behind it
(dcq_ops/triton/hopper_launch.py, the ranked chain): tests/test_hopper_probe_chain.py.

The parent's side is host code, tested for real here with children that stand in for the
kernel's child (``hopper_probe.CHILD_COMMAND``): one that hangs past a short deadline
(with a grandchild, to see the whole group killed), ones that die by SIGABRT or exit 1,
one that reports wrong numbers, and one that passes (its verdict cached on disk, and
invalidated by another source hash or version). The real child runs under Triton's
interpreter on CPU tensors (the plain-Triton twin stands in for the Gluon kernel it is
asked about), and on an sm_90 GPU for real (skipped elsewhere). The cache's files:
tests/test_hopper_probe_cache.py; the probe class: tests/test_hopper_probe_class.py.
"""

import json
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

from dcq_ops.triton import import_ops  # noqa: E402  (sets TRITON_INTERPRET for Triton's first import)

try:
    import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

import dcq_ops  # noqa: E402
from dcq_ops import demotions, first_contact  # noqa: E402
from dcq_ops.triton import hopper, hopper_launch, hopper_probe, hopper_probe_cache, hopper_probe_child  # noqa: E402
from dcq_ops.triton import kernels  # noqa: E402
from dcq_ops.triton.hopper_probe_class import ProbeClass  # noqa: E402

from hopper_probe_fakes import (CLASS, _clean, cleared_with_warnings, fake_child, passing_child,  # noqa: E402,F401
                                spawned, verdict_line)


def alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie waiting for its reaper counts as dead)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def assert_demoted_once(runs, what: str, reason_part: str):
    """The failed verdict: classic for the class, one warning, the demotion reported; a
    second launch of the class neither probes nor warns again."""
    assert hopper_probe.verdicts()[0]["what"] == what
    assert reason_part in hopper_probe.verdicts()[0]["reason"]
    demoted = [d for d in demotions.demotions() if d.fallback == hopper_probe.FALLBACK]
    assert len(demoted) == 1 and demoted[0].backend == "triton" and what in demoted[0].reason
    report = dcq_ops.backends("cpu")["triton"]
    assert "demoted by the first-contact check" in report and hopper_probe.FALLBACK in report and what in report
    again, said = cleared_with_warnings()
    assert again is False and said == [] and len(runs) == 1


# ----------------------------------------------------------------------------
# Children that fail: (a) a hang, (b) a crash, (c) wrong numbers


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc to see the grandchild gone")
def test_a_hanging_child_is_killed_with_its_group_and_the_classic_kernel_runs(monkeypatch, tmp_path, spawned):
    pid_file = tmp_path / "grandchild.pid"
    fake_child(monkeypatch, "import subprocess, sys, time\n"
                            "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
                            f"open({str(pid_file)!r}, 'w').write(str(g.pid))\n"
                            "time.sleep(120)\n")
    monkeypatch.setenv(hopper_probe.TIMEOUT_ENV, "4")
    start = time.perf_counter()
    result, said = cleared_with_warnings()
    assert time.perf_counter() - start < 60, "the parent waited for the hung child"
    assert result is False and len(said) == 1 and "timeout" in str(said[0].message)
    grandchild = int(pid_file.read_text())
    for _ in range(100):  # the killed grandchild is reaped by init (or a subreaper)
        if not alive(grandchild):
            break
        time.sleep(0.05)
    assert not alive(grandchild), "the child's process group was not killed"
    assert_demoted_once(spawned, "timeout", "did not finish within 4 s")


@pytest.mark.parametrize("code, reason", [("import os; os.abort()", "SIGABRT"),
                                          ("import os; os._exit(1)", "exited with status 1"),
                                          ("import os, signal; os.kill(os.getpid(), signal.SIGSEGV)", "SIGSEGV")])
def test_a_crashing_child_demotes_the_class(monkeypatch, spawned, code, reason):
    fake_child(monkeypatch, code)
    result, said = cleared_with_warnings()
    assert result is False and len(said) == 1 and reason in str(said[0].message)
    assert_demoted_once(spawned, "crash", reason)


def test_a_child_reporting_wrong_numbers_demotes_the_class(monkeypatch, spawned):
    fake_child(monkeypatch, verdict_line(status="failed", what="wrong numbers", reason="loss error 1e+00 > bound 1e-03",
                                         rows_compared=25, loss_error=1.0, loss_bound=1e-3) + "\nraise SystemExit(1)")
    result, said = cleared_with_warnings()
    assert result is False and len(said) == 1 and "loss error 1e+00 > bound 1e-03" in str(said[0].message)
    assert hopper_probe.verdicts()[0]["numbers"]["loss_error"] == 1.0
    assert_demoted_once(spawned, "wrong numbers", "loss error")


def test_a_compile_error_in_the_child_demotes_the_class(monkeypatch, spawned):
    fake_child(monkeypatch, verdict_line(status="failed", what="error",
                                         reason="CompilationError: shared memory overflow") + "\nraise SystemExit(1)")
    result, said = cleared_with_warnings()
    assert result is False and len(said) == 1
    assert_demoted_once(spawned, "error", "CompilationError")


def test_a_passing_verdict_with_a_failing_exit_is_a_crash(monkeypatch, spawned):
    # The verdict printed, then the process died at exit (e.g. a CUDA error at teardown).
    fake_child(monkeypatch, verdict_line(status="passed", what="passed", reason="") + "\nimport os; os._exit(3)")
    result, said = cleared_with_warnings()
    assert result is False and len(said) == 1
    assert_demoted_once(spawned, "crash", "status 3")


def test_a_failed_verdict_is_cached_and_said_again_in_a_new_process(monkeypatch, spawned):
    fake_child(monkeypatch, "import os; os.abort()")
    assert cleared_with_warnings()[0] is False
    hopper_probe.forget()  # as a new process: memory empty, the disk cache holds the verdict
    first_contact.reset()
    result, said = cleared_with_warnings()
    assert result is False and len(spawned) == 1 and len(said) == 1
    assert "cached in" in str(said[0].message) and hopper_probe.verdicts()[0]["source"] == "cache"
    assert [d.fallback for d in demotions.demotions()] == [hopper_probe.FALLBACK]


# ----------------------------------------------------------------------------
# (d) a child that passes; the cache


def test_a_passing_child_clears_the_class_and_its_verdict_is_cached(monkeypatch, spawned):
    passing_child(monkeypatch)
    result, said = cleared_with_warnings()
    assert result is True and said == [] and len(spawned) == 1
    assert demotions.demotions() == [] and "demoted" not in dcq_ops.backends("cpu")["triton"]
    verdict = hopper_probe.verdicts()[0]
    assert verdict["source"] == "probe" and Path(verdict["cache_path"]).is_file()
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 1  # memory
    hopper_probe.forget()  # a new process: the disk cache answers, no child
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 1
    assert hopper_probe.verdicts()[0]["source"] == "cache"
    # Another class is probed on its own.
    other = CLASS._replace(compute_grad=False)
    assert hopper_probe.cleared(other, torch.device("cpu")) and spawned == [CLASS, other]


@pytest.mark.parametrize("change", ["source", "triton", "torch", "cache off"])
def test_another_source_or_version_probes_again(monkeypatch, tmp_path, spawned, change):
    import triton

    passing_child(monkeypatch)
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 1
    hopper_probe.forget()
    if change == "source":
        edited = tmp_path / "hopper.py"
        edited.write_text(Path(hopper.__file__).read_text() + "\n# edited\n")
        others = tuple(p for p in hopper_probe_cache.sources() if p.name != "hopper.py")
        assert len(others) < len(hopper_probe_cache.sources())  # hopper.py is hashed
        monkeypatch.setattr(hopper_probe_cache, "SOURCES", (edited,) + others)
    elif change == "triton":
        monkeypatch.setattr(triton, "__version__", triton.__version__ + ".post1")
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", str(torch.__version__) + ".post1")
    else:
        monkeypatch.setenv(hopper_probe_cache.CACHE_ENV, "0")
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 2
    if change == "cache off":
        assert hopper_probe.verdicts()[0]["cache_path"] is None


def test_a_corrupt_or_foreign_cache_file_is_no_verdict(monkeypatch, spawned):
    passing_child(monkeypatch)
    key = hopper_probe_cache.key_of(torch.device("cpu"), CLASS)
    path = hopper_probe_cache.path_of(key)
    path.parent.mkdir(parents=True)
    path.write_text('{"key": ')  # half a file
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 1
    data = json.loads(path.read_text())
    assert data["verdict"]["status"] == "passed" and data["key"] == json.loads(json.dumps(key))
    data["key"]["class"]["dim"] += 1  # a file of another key under this name
    path.write_text(json.dumps(data))
    assert hopper_probe_cache.read(key) is None


def test_a_malformed_cached_verdict_is_probed_again(monkeypatch, spawned):
    passing_child(monkeypatch)
    key = hopper_probe_cache.key_of(torch.device("cpu"), CLASS)
    for verdict in ({"status": "passed", "what": "timeout"}, {"status": "maybe", "what": "passed"},
                    {"status": "passed", "what": "passed", "seconds": "slow"}):
        hopper_probe_cache.write(key, verdict)
        hopper_probe.forget()
        assert hopper_probe.cleared(CLASS, torch.device("cpu"))
        assert hopper_probe.verdicts()[0]["source"] == "probe"
    assert len(spawned) == 3


# ----------------------------------------------------------------------------
# Where no probe can run


def test_no_probe_under_tracing_or_capture_the_cached_verdict_or_classic(monkeypatch, spawned):
    passing_child(monkeypatch)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        assert hopper_probe.cleared(CLASS, torch.device("cpu")) is False
        assert hopper_probe.cleared(CLASS, torch.device("cpu")) is False
    assert spawned == [] and len([w for w in record if "cannot run" in str(w.message)]) == 1
    assert hopper_probe.verdicts() == []  # nothing decided: an eager launch probes
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: False)
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 1
    hopper_probe.forget()
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert hopper_probe.cleared(CLASS, torch.device("cpu")) and len(spawned) == 1  # the cached verdict


def test_the_deadline_variable_is_checked(monkeypatch):
    assert hopper_probe.timeout_s() == hopper_probe.DEFAULT_TIMEOUT_S == 120.0
    monkeypatch.setenv(hopper_probe.TIMEOUT_ENV, "2.5")
    assert hopper_probe.timeout_s() == 2.5
    for bad in ("soon", "0", "-3", "inf"):
        monkeypatch.setenv(hopper_probe.TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=hopper_probe.TIMEOUT_ENV):
            hopper_probe.timeout_s()


# ----------------------------------------------------------------------------
# The real child


@pytest.mark.skipif(ON_CUDA, reason="the twin runs under the interpreter; on a GPU the Gluon kernel runs")
def test_the_real_child_passes_under_the_interpreter(monkeypatch, spawned):
    """python -m dcq_ops.triton.hopper_probe_child on CPU tensors under TRITON_INTERPRET=1:
    the twin runs the class's launch and matches the float64 loss within the bound."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result, said = cleared_with_warnings(CLASS, "cpu")
    verdict = hopper_probe.verdicts()[0]
    assert result is True and said == [], verdict
    rows, _, _ = CLASS.launch_shape()
    assert verdict["numbers"]["rows_compared"] == rows and verdict["numbers"]["grad_bound"] > 0


@pytest.mark.skipif(ON_CUDA or not kernels.INTERPRETED, reason="the twin, in this process, under the interpreter")
@pytest.mark.parametrize("compute_grad", [True, False])
def test_the_child_judges_a_wrong_kernel(monkeypatch, compute_grad):
    """The child's judgement (run in this process): a kernel whose row sums are 1.5 times
    what they should be is "wrong numbers"; one that never runs is an error."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # read again at each interpreted launch
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")
    probe_class = CLASS._replace(compute_grad=compute_grad, filtering=not compute_grad)
    assert hopper_probe_child.run(probe_class, "cpu")["status"] == "passed"
    original = hopper_launch.launch

    def sums_too_large(*args, **kwargs):
        original(*args, **kwargs)
        args[5][1].mul_(1.5)  # the workspace's row sums

    monkeypatch.setattr(hopper_launch, "launch", sums_too_large)
    verdict = hopper_probe_child.run(probe_class, "cpu")
    assert verdict["status"] == "failed" and verdict["what"] == "wrong numbers", verdict
    assert "loss error" in verdict["reason"]
    monkeypatch.setattr(hopper_launch, "launch", original)
    monkeypatch.setenv(hopper_launch.ENV, "classic")
    verdict = hopper_probe_child.run(probe_class, "cpu")
    assert verdict["what"] == "error" and "did not run" in verdict["reason"]


@pytest.mark.skipif(ON_CUDA or not kernels.INTERPRETED, reason="the twin, in this process, under the interpreter")
def test_the_child_runs_the_kernel_it_is_asked_about(monkeypatch):
    """The child launches the class's kernel, asked for alone (``main`` sets
    DCQ_OPS_SM90_KERNEL to it): a seesaw class runs the seesaw's launch (the twin under the
    interpreter, where its BLOCK_M = BLOCK_K holds) and passes; a seesaw class of tiles it
    cannot run (16 x 32) is an error, not a pass of another kernel."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    launched = []
    original = hopper_launch.launch

    def spy(*args, **kwargs):
        launched.append(kwargs["kernel"])
        return original(*args, **kwargs)

    monkeypatch.setattr(hopper_launch, "launch", spy)
    seesaw = ProbeClass.of_launch("seesaw", torch.float16, 40, 5 * 32 + 7, 32, 5 * 32, True, True, 32, 32, 2)
    assert seesaw.row_blocks == 2 and seesaw.splits == 2 and seesaw.tail_tile
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    verdict = hopper_probe_child.run(seesaw, "cpu")
    assert verdict["status"] == "passed" and launched == ["seesaw"], (verdict, launched)
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")  # the wrong kernel asked for: not the class's
    verdict = hopper_probe_child.run(seesaw, "cpu")
    assert verdict["what"] == "error" and "the seesaw kernel did not run" in verdict["reason"], verdict
    assert launched == ["seesaw", "pipelined"]
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    verdict = hopper_probe_child.run(CLASS._replace(kernel="seesaw"), "cpu")  # 16 x 32: BLOCK_M != BLOCK_K
    assert verdict["what"] == "error" and "did not run" in verdict["reason"] and len(launched) == 2, verdict


ON_HOPPER = ON_CUDA and torch.cuda.get_device_capability() == (9, 0) and hopper.AVAILABLE


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernels run on sm_90 only (a GPU test)")
@pytest.mark.parametrize("kernel", hopper_launch.CHAIN)
@pytest.mark.parametrize("compute_grad, filtering", [(True, False), (False, True)])
def test_the_real_probe_passes_on_sm90(monkeypatch, kernel, compute_grad, filtering):
    """The real probe of each Gluon kernel on this GPU, for a class of several tiles past the
    refills, both tails partial: the child passes within its deadline."""
    monkeypatch.setenv(hopper_probe_cache.CACHE_ENV, "0")
    monkeypatch.setenv(hopper_probe.TIMEOUT_ENV, "40")  # a hang costs 40 s, not the default 120
    q = torch.zeros(130, 512, dtype=torch.bfloat16, device="cuda")
    w = torch.zeros(64 * 13 * 3 - 20, 512, dtype=torch.bfloat16, device="cuda")
    probe_class = hopper_launch.probe_class(kernel, q, w, 64 * 13, compute_grad, filtering)
    verdict = hopper_probe.run_probe(probe_class, torch.device("cuda"))
    assert verdict.passed, verdict


def test_the_check_command_reports_a_failed_probe_as_a_failure(monkeypatch):
    """python -m dcq_ops.check's first-contact part: the probes its warm-up met are in the
    JSON, and a failed one is a failure of the command, as a demotion is."""
    from dcq_ops.check import first_contact_part
    from dcq_ops.check.report import Report

    fake_child(monkeypatch, "import os; os.abort()")

    def warmup_meeting_the_kernel(*args, **kwargs):  # as the warm-up of a bf16 class on sm_90
        hopper_probe.cleared(CLASS, torch.device("cpu"))
        return []

    monkeypatch.setattr(first_contact_part.dcq_ops, "warmup", warmup_meeting_the_kernel)
    report = Report()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        first_contact_part.first_contact_check(report, torch.device("cpu"), seed=0)
    failures = [f for f in report.data["failures"] if f["part"] == "first_contact/hopper_probe"]
    assert len(failures) == 1 and "crash" in failures[0]["reason"] and "SIGABRT" in failures[0]["reason"]
    probes = report.data["first_contact"]["hopper_probe"]
    assert [p["what"] for p in probes] == ["crash"] and probes[0]["class"] == CLASS._asdict()
    assert "demoted by the first-contact check" in report.data["first_contact"]["backends_after"]["triton"]


def test_the_variables_are_the_documented_ones():
    root = Path(__file__).resolve().parents[1]
    docs = (root / "docs" / "numerics.md").read_text()
    for name in (hopper_launch.ENV, hopper_probe.TIMEOUT_ENV, hopper_probe_cache.CACHE_ENV,
                 hopper_probe_cache.CACHE_DIR_ENV, hopper_probe.CHILD_MODULE):
        assert name in docs, name
    assert f"{hopper_launch.ENV}=classic" in (root / "README.md").read_text()
