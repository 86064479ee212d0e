"""dcq_ops.check's timing part on sm_90 times the Triton backend once with each queue-pass
kernel forced (DCQ_OPS_SM90_KERNEL), side by side with the GEMM pair. The GPU timing
itself runs only on a GPU (scripts/gpu_check.sh); here the switch is checked: each
kernel's time is taken with that kernel selected, and the environment is restored."""

from __future__ import annotations

import os

import pytest
import torch

from dcq_ops.triton import import_ops

# Triton's first import in the mode the other Triton test modules need (the interpreter
# without a GPU): a module imported before them must not fix it to compiled.
try:
    import_ops(interpret=not torch.cuda.is_available())
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

from dcq_ops.check import gpu_parts  # noqa: E402
from dcq_ops.triton import hopper_launch  # noqa: E402


def test_each_kernel_is_timed_with_itself_selected_and_the_setting_restored(monkeypatch):
    monkeypatch.setenv(hopper_launch.ENV, "classic")
    seen = []

    def fake_time_ms(fn, device, repeats):
        seen.append(hopper_launch.selected_kernel())
        return {"classic": 4.0, "pipelined": 2.0, "seesaw": 1.6}[seen[-1]]

    monkeypatch.setattr(gpu_parts, "_time_ms", fake_time_ms)
    section = {"gemm_pair_ms": 1.0}
    gpu_parts._time_sm90_kernels(section, lambda: None, torch.device("cpu"), 3, 4e12)
    assert seen == list(hopper_launch.CHOICES)
    assert section["triton_classic_ms"] == 4.0 and section["triton_pipelined_ms"] == 2.0
    assert section["pipelined_vs_classic"] == 2.0 and section["seesaw_vs_classic"] == 2.5
    assert section["triton_seesaw_ms"] == 1.6 and "seesaw" in hopper_launch.CHOICES
    assert section["triton_pipelined_vs_gemm_pair"] == 0.5
    assert section["triton_classic_tflops"] == 4e12 / 4.0 / 1e9
    assert isinstance(section["hopper_probe"], list)
    assert os.environ[hopper_launch.ENV] == "classic"
