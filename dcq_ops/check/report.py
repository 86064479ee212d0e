"""The JSON report being built by ``python -m dcq_ops.check``: its parts, what was skipped and
what failed, and the helpers every part shares (progress on stderr, JSON-safe floats,
seeded inputs)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
import traceback

import torch
import torch.nn.functional as F

from dcq_ops.atomic_write import write_text


def name(dtype: torch.dtype) -> str:
    """A dtype without "torch."."""
    return str(dtype).replace("torch.", "")


def say(message: str) -> None:
    """Progress, on stderr."""
    print(f"[dcq_ops.check] {message}", file=sys.stderr, flush=True)


def finite(value):
    """A float for JSON: None for NaN or inf (JSON has neither)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def inputs(rows, dim, slots, classes, dtype, queue_dtype, device, seed):
    """Seeded inputs: labels repeat in the batch and the queue, 5% empty slots, class
    weights correlated with the embeddings (as tests/inputs.py)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, classes, (rows,), generator=g)
    queue_labels = torch.randint(0, classes, (slots,), generator=g)
    queue_labels[torch.randperm(slots, generator=g)[: slots // 20]] = -1
    x = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    k = 0.5 * x + torch.randn(rows, dim, generator=g, dtype=torch.float64)
    w = F.normalize(torch.randn(slots, dim, generator=g, dtype=torch.float64), dim=1)
    return (x.to(dtype).to(device), k.to(dtype).to(device), labels.to(device), w.to(queue_dtype).to(device),
            queue_labels.to(device))


class Report:
    """The JSON being built, with the skipped parts and the failures."""

    def __init__(self):
        self.data = {"skipped": [], "failures": []}

    def skip(self, part: str, reason: str) -> None:
        say(f"skipped {part}: {reason}")
        self.data["skipped"].append({"part": part, "reason": reason})

    def fail(self, part: str, reason: str) -> None:
        say(f"FAILED {part}: {reason}")
        self.data["failures"].append({"part": part, "reason": reason})

    @contextlib.contextmanager
    def part(self, name: str):
        """Run a part; an exception in it is a failure of that part, not of the command."""
        start = time.perf_counter()
        say(f"{name} ...")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported, with its traceback
            self.fail(name, f"{type(exc).__name__}: {exc}")
            self.data.setdefault("tracebacks", {})[name] = traceback.format_exc()
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 3)


@contextlib.contextmanager
def environment(**values):
    """Environment variables set for a block, then restored."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def write(data: dict, out: str) -> None:
    """The JSON to stdout (``out`` "-") or to the file ``out``."""
    text = json.dumps(data, indent=2, default=str)
    if out == "-":
        print(text)
    else:
        write_text(out, text + "\n")  # replaced whole: a time limit mid-write keeps the last report
