"""Children that stand in for the Gluon kernels' probe child (``hopper_probe.CHILD_COMMAND``)
and the fixtures around them, shared by tests/test_hopper_probe.py (the probe) and
tests/test_hopper_probe_chain.py (the kernels' selection behind it). Import after
dcq_ops.triton.import_ops (it sets TRITON_INTERPRET for Triton's first import)."""

import json
import sys
import warnings

import pytest
import torch

from dcq_ops import first_contact
from dcq_ops.triton import hopper_probe, hopper_probe_cache, hopper_probe_child
from dcq_ops.triton.hopper_probe_class import ProbeClass

PREFIX = hopper_probe_child.VERDICT_PREFIX
# A class of the interpreter's tiles (16 x 32): 2 row blocks with a partial last, 2 splits of
# 5 tiles, the last split one partial tile; fp16 (the interpreter's bf16 dot is wrong).
CLASS = ProbeClass.of_launch("pipelined", torch.float16, 20, 5 * 32 + 7, 32, 5 * 32, True, True, 16, 32, 2)


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    """Each test with its own cache folder, no verdict or demotion of an earlier one, and the
    real child's command unless it replaces it."""
    monkeypatch.setenv(hopper_probe_cache.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(hopper_probe_cache.CACHE_ENV, raising=False)
    monkeypatch.delenv(hopper_probe.TIMEOUT_ENV, raising=False)
    monkeypatch.setattr(hopper_probe, "CHILD_COMMAND", None)
    first_contact.reset()
    yield
    first_contact.reset()


@pytest.fixture
def spawned(monkeypatch):
    """The probes run (their classes): a cached verdict runs none."""
    runs = []
    original = hopper_probe.run_probe

    def spy(probe_class, device):
        runs.append(probe_class)
        return original(probe_class, device)

    monkeypatch.setattr(hopper_probe, "run_probe", spy)
    return runs


def fake_child(monkeypatch, code: str) -> None:
    """Replace the child with ``python -c code`` (it gets --device DEVICE CLASS_JSON too)."""
    monkeypatch.setattr(hopper_probe, "CHILD_COMMAND", [sys.executable, "-c", code])


def verdict_line(**verdict) -> str:
    return f"print({PREFIX + json.dumps(verdict)!r}, flush=True)"


def passing_child(monkeypatch):
    fake_child(monkeypatch, verdict_line(status="passed", what="passed", reason="", rows_compared=25,
                                         loss_error=1e-7, loss_bound=1e-2))


def probe_warnings(record) -> list:
    return [w for w in record if issubclass(w.category, RuntimeWarning) and "failed its probe" in str(w.message)]


def cleared_with_warnings(probe_class=CLASS, device="cpu"):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        result = hopper_probe.cleared(probe_class, torch.device(device))
    return result, probe_warnings(record)
