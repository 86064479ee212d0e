"""The probe of a Gluon sm_90 kernel (the seesaw, dcq_ops.triton.hopper_seesaw, and the
pipelined, dcq_ops.triton.hopper): before a kernel's first launch of a probe class in a
process (``ProbeClass``: which kernel, and what of a launch matters to each program's
control flow), a child process runs that kernel on a small launch of the same class and
judges it (dcq_ops.triton.hopper_probe_child), so that what the in-process first-contact
check cannot survive stays in the child:

- a hang (a wrong mbarrier phase deadlocks the GPU and its process forever): the child
  has a deadline (``TIMEOUT_ENV``, default ``DEFAULT_TIMEOUT_S`` seconds, its compile
  included); past it the child's whole process group is killed (SIGKILL);
- a crash or a sticky CUDA error (an illegal address poisons the whole CUDA context, so
  the process that met it cannot fall back): the child dies or exits non-zero;
- a compile or launch error, and wrong numbers (against the float64 loss, within the
  first-contact check's bound): the child's verdict says so.

Any of these: one ``RuntimeWarning`` naming the kernel and what happened, the next kernel
of dcq_ops.triton.hopper_launch's chain for the class in this process (the pipelined
kernel after the seesaw, behind its own probe; else the classic kernel,
kernels.queue_pass_kernel), and the demotion recorded (dcq_ops.demotions:
``dcq_ops.backends()`` and ``python -m dcq_ops.check`` report it). A pass: that kernel
for the class. Either verdict is cached on disk (dcq_ops.triton.hopper_probe_cache, keyed
on the GPU, driver, CUDA, torch, Triton, the kernels' sources and the class, the kernel
included), so a machine pays each probe once; in memory, every later launch of the class
is one dictionary lookup. One kernel's verdict never clears the other. Several ranks may
probe at once; each writes the cache atomically.

Under torch.compile's tracing or a CUDA-graph capture, where no probe can run, a cached
verdict decides, and without one the kernel does not run (a Gluon kernel never launches
unprobed; a later eager launch of the class probes it).

The child's command is ``CHILD_COMMAND`` (None: ``python -m CHILD_MODULE``), followed by
``--device DEVICE CLASS_JSON``: the tests replace it with children that hang, crash or
lie.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from dcq_ops.demotions import Demotion, record_demotion
from dcq_ops.triton import hopper_probe_cache
from dcq_ops.triton.hopper_probe_child import VERDICT_PREFIX  # (the child module imports only the stdlib)
from dcq_ops.triton.hopper_probe_class import ProbeClass
from dcq_ops.validation import check_number

TIMEOUT_ENV = "DCQ_OPS_HOPPER_PROBE_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 120.0
CHILD_MODULE = "dcq_ops.triton.hopper_probe_child"
# What runs instead of a kernel that failed its probe (the demotion's fallback).
FALLBACK = "triton (classic sm_90 kernel)"
FALLBACK_PIPELINED = "triton (pipelined sm_90 kernel, behind its own probe)"

# Test hook: the child's argv before "--device DEVICE CLASS_JSON" (None: python -m CHILD_MODULE).
CHILD_COMMAND: list | None = None
# Set in the child itself: its launch is the probe, not probed again.
IN_CHILD = False

# The folder holding the dcq_ops package this process imported.
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

# How long the child's output is waited for after its group was killed (an escaped
# grandchild may hold the pipes open).
_DRAIN_S = 5.0


@dataclass(frozen=True)
class Verdict:
    """What the probe of one class found.

    Attributes
    ----------
    status : str
        "passed" or "failed".
    what : str
        "passed", "timeout", "crash", "error" (a compile or launch error, or no verdict)
        or "wrong numbers".
    reason : str
        What happened, in a line ("" when passed).
    seconds : float
        How long the child ran (from the cache: how long it ran then).
    source : str
        "probe" (this process ran the child) or "cache".
    cache_path : str or None
        The cache file holding the verdict, if any.
    numbers : dict
        The child's comparison (rows_compared, loss_error, loss_bound, grad_error,
        grad_bound), when it got there.
    """

    status: str
    what: str
    reason: str
    seconds: float = 0.0
    source: str = "probe"
    cache_path: str | None = None
    numbers: dict = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def as_dict(self) -> dict:
        """The verdict as a JSON-ready dict."""
        return asdict(self)


_VERDICTS: dict = {}  # (device, ProbeClass) -> Verdict
_SAID: set = set()


def timeout_s() -> float:
    """The child's deadline in seconds: ``DCQ_OPS_HOPPER_PROBE_TIMEOUT_S`` (default 120).

    Raises
    ------
    ValueError
        The variable is not a positive number.
    """
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a positive number of seconds, got {text!r}") from None
    return check_number(TIMEOUT_ENV, value, low=0.0, low_open=True)


def verdicts() -> list[dict]:
    """Every verdict of this process (since the last ``forget``), as dicts with the class
    (``class``, ``class_words``) and the device, in the order they were reached."""
    return [{"device": device, "class": probe_class._asdict(), "class_words": probe_class.words(),
             **verdict.as_dict()} for (device, probe_class), verdict in _VERDICTS.items()]


def forget() -> None:
    """Forget this process's verdicts (dcq_ops.first_contact.reset calls this): the next
    launch of each class reads the disk cache, or probes, again."""
    _VERDICTS.clear()
    _SAID.clear()


def cleared(probe_class: ProbeClass, device: torch.device, fallback: str = FALLBACK) -> bool:
    """Whether ``probe_class.kernel`` may launch for ``probe_class`` on ``device``: its
    verdict, from this process's memory, the disk cache or a probe run now (see the
    module docstring).

    Parameters
    ----------
    probe_class : ProbeClass
    device : torch.device
    fallback : str
        What runs the class if the probe fails (``FALLBACK``, the classic kernel, or
        ``FALLBACK_PIPELINED``): the warning and the recorded demotion name it.

    Returns
    -------
    bool
        True when the probe passed; False when it failed (warned once, demotion
        recorded) or cannot run now (tracing, capture) without a cached verdict.
    """
    if IN_CHILD:
        return True
    device = torch.device(device)
    key = (str(device), probe_class)
    verdict = _VERDICTS.get(key)
    if verdict is not None:
        return verdict.passed
    cache_key = hopper_probe_cache.key_of(device, probe_class)
    cached = hopper_probe_cache.read(cache_key)
    verdict = None if cached is None else _cached_verdict(*cached)
    if verdict is not None:
        _record(key, probe_class, verdict, fallback)
        return verdict.passed
    if torch.compiler.is_compiling() or (device.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        if ("unprobed", probe_class.kernel) not in _SAID:
            _SAID.add(("unprobed", probe_class.kernel))
            warnings.warn(
                f"dcq_ops: the {probe_class.kernel} sm_90 kernel met a class that no probe has cleared, under "
                "torch.compile's tracing or a CUDA-graph capture, where its probe (a child process) cannot run: "
                f"{_words_of(fallback)} runs it ({probe_class.words()}). Run dcq_ops.warmup or DCQLoss.prepare "
                "before compiling or capturing.", RuntimeWarning, stacklevel=2)
        return False
    verdict = run_probe(probe_class, device)
    path = hopper_probe_cache.write(cache_key, {k: v for k, v in verdict.as_dict().items()
                                                 if k not in ("source", "cache_path")})
    if path is not None:
        verdict = Verdict(verdict.status, verdict.what, verdict.reason, verdict.seconds, "probe", str(path),
                          verdict.numbers)
    _record(key, probe_class, verdict, fallback)
    return verdict.passed


def _cached_verdict(data: dict, path) -> Verdict | None:
    """The verdict of a cache file, or None when it is not one (the class is probed again)."""
    what = data.get("what")
    valid = {"passed": ("passed",), "failed": ("timeout", "crash", "error", "wrong numbers")}
    if what not in valid.get(data.get("status"), ()) or not isinstance(data.get("reason", ""), str):
        return None
    seconds, numbers = data.get("seconds", 0.0), data.get("numbers") or {}
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not isinstance(numbers, dict):
        return None
    return Verdict(data["status"], what, data.get("reason", ""), float(seconds), "cache", str(path), dict(numbers))


def _words_of(fallback: str) -> str:
    """A fallback (``FALLBACK``, ``FALLBACK_PIPELINED``) as the subject of a sentence."""
    return {FALLBACK: "the classic sm_90 kernel",
            FALLBACK_PIPELINED: "the pipelined sm_90 kernel (if its own probe clears the class; else the classic "
                                "one)"}.get(fallback, fallback)


def _record(key: tuple, probe_class: ProbeClass, verdict: Verdict, fallback: str) -> None:
    """Keep the verdict; a failure: one warning, and the demotion recorded."""
    _VERDICTS[key] = verdict
    if verdict.passed:
        return
    device = key[0]
    where = f"{device} ({hopper_probe_cache.fingerprint(torch.device(device))['gpu']})"
    cached = (f" The verdict is cached in {verdict.cache_path} (from an earlier probe)" if verdict.source == "cache"
              else f" The verdict is cached in {verdict.cache_path}" if verdict.cache_path else "")
    retry = (f": delete it, or set {hopper_probe_cache.CACHE_ENV}=0, to probe again." if verdict.cache_path else ".")
    instead = _words_of(fallback)
    message = (f"dcq_ops: the {probe_class.kernel} sm_90 queue-pass kernel failed its probe on {where} for "
               f"{probe_class.words()}: {verdict.what}: {verdict.reason}. {instead[0].upper()}{instead[1:]} runs this "
               f"class instead (dcq_ops.backends() reports it).{cached}{retry} Please report it with the output of "
               "`python -m dcq_ops.check`; DCQ_OPS_SM90_KERNEL=classic selects the classic kernel without a probe.")
    record_demotion(("hopper_probe",) + key, Demotion("triton", fallback, device,
                                                      f"the {probe_class.kernel} sm_90 kernel, {probe_class.words()}",
                                                      f"{verdict.what}: {verdict.reason}", message))
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def child_command(probe_class: ProbeClass, device: torch.device) -> list[str]:
    """The child's argv (``CHILD_COMMAND`` or ``python -m CHILD_MODULE``, then the device
    and the class)."""
    prefix = list(CHILD_COMMAND) if CHILD_COMMAND is not None else [sys.executable, "-m", CHILD_MODULE]
    return prefix + ["--device", str(device), probe_class.to_json()]


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (the child leads its own session), so that
    what it started (ptxas, a compile worker) dies with it."""
    try:
        if hasattr(os, "killpg"):
            os.killpg(process.pid, signal.SIGKILL)
        else:  # no process groups (Windows): the child alone
            process.kill()
    except (ProcessLookupError, PermissionError):
        pass


def _drain(process: subprocess.Popen) -> tuple[bytes, bytes]:
    """The killed child's output so far, reaped; empty when an escaped grandchild holds the pipes."""
    try:
        return process.communicate(timeout=_DRAIN_S)
    except subprocess.TimeoutExpired:
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
        process.kill()
        process.wait()
        return b"", b""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def run_probe(probe_class: ProbeClass, device: torch.device) -> Verdict:
    """Run the child for ``probe_class`` on ``device`` under the deadline, and read its
    verdict (see the module docstring). Nothing is recorded or cached here.

    Parameters
    ----------
    probe_class : ProbeClass
    device : torch.device

    Returns
    -------
    Verdict
    """
    deadline = timeout_s()
    command = child_command(probe_class, device)
    start = time.perf_counter()
    # The child imports the dcq_ops this process runs, wherever the working directory is.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (_PACKAGE_ROOT, os.environ.get("PYTHONPATH")))))
    try:
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, start_new_session=True, env=env)
    except OSError as exc:
        return Verdict("failed", "error", f"the probe's child could not start ({type(exc).__name__}: {exc})")
    try:
        out, err = process.communicate(timeout=deadline)
    except subprocess.TimeoutExpired:
        _kill_group(process)
        _drain(process)
        return Verdict("failed", "timeout", f"the child did not finish within {deadline:g} s ({TIMEOUT_ENV}): a hang "
                       "or a compile that slow; its process group was killed", time.perf_counter() - start)
    except BaseException:  # KeyboardInterrupt included: never leave the child running
        _kill_group(process)
        _drain(process)
        raise
    seconds = time.perf_counter() - start
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    said = None
    for line in reversed(stdout.splitlines()):
        if line.startswith(VERDICT_PREFIX):
            try:
                said = json.loads(line[len(VERDICT_PREFIX):])
            except ValueError:
                said = None
            break
    code = process.returncode
    tail = _last_line(stderr)
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return Verdict("failed", "crash", f"the child died of {name}{f' ({tail})' if tail else ''}", seconds)
    if isinstance(said, dict) and said.get("status") in ("passed", "failed"):
        numbers = {k: said[k] for k in ("rows_compared", "loss_error", "loss_bound", "grad_error", "grad_bound")
                   if k in said}
        if said["status"] == "passed" and code == 0:
            return Verdict("passed", "passed", "", seconds, numbers=numbers)
        if said["status"] == "failed":
            what = said.get("what") if said.get("what") in ("error", "wrong numbers") else "error"
            return Verdict("failed", what, str(said.get("reason") or "(no reason given)"), seconds, numbers=numbers)
    if code != 0:
        return Verdict("failed", "crash", f"the child exited with status {code}{f' ({tail})' if tail else ''}",
                       seconds)
    return Verdict("failed", "error", f"the child printed no verdict{f' ({tail})' if tail else ''}", seconds)
