"""What a run reports: :class:`RunLog` (its records, in OUTPUT/log.csv or
OUTPUT/log.jsonl, cut back to a step when a run resumes there),
:class:`TrainWindow` (the train record of the steps since the last log line) and
:class:`Progress` (plain lines or a tqdm bar on the terminal)."""

from __future__ import annotations

import csv
import json
import os
import sys
import time

import torch

from dcq_ops.atomic_write import atomic_write
from dcq_ops.training.verification import DEFAULT_FARS


LOG_COLUMNS = ("kind", "step", "epoch", "loss", "lr", "samples_per_s", "grad_norm", "skipped", "model", "set",
               "accuracy", "accuracy_std", *(f"tar@far={f:g}" for f in DEFAULT_FARS), "xnorm", "elapsed_s", "message")


class RunLog:
    """Appends records to OUTPUT/log.csv (fixed columns, blanks where a record has
    no value) or OUTPUT/log.jsonl (every key); keeps them in ``records``."""

    def __init__(self, output: str | None, fmt: str, enabled: bool = True):
        self.records: list[dict] = []
        self.path = None
        if output and enabled:
            os.makedirs(output, exist_ok=True)
            self.path = os.path.join(output, "log.csv" if fmt == "csv" else "log.jsonl")
        self.fmt = fmt

    def write(self, record: dict) -> None:
        self.records.append(record)
        if self.path is None:
            return
        if self.fmt == "json":
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")
            return
        new = not os.path.exists(self.path)
        with open(self.path, "a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(record)

    def truncate(self, step: int, total_steps: int) -> None:
        """Drop what a resumed run at ``step`` writes again: every record after ``step``,
        and a finished run's final evaluation (a run resumed at its end evaluates again).
        Records up to ``step`` were written before its checkpoint (the loop logs and then
        saves), so they stay; the file is rewritten whole, under the current columns."""
        if self.path is None or not os.path.exists(self.path):
            return

        def kept(record: dict) -> bool:
            try:
                at = int(float(record.get("step")))
            except (TypeError, ValueError):
                return True  # not a record of a step
            if at != step:
                return at < step
            return not (record.get("kind") == "eval" and step >= total_steps)

        with open(self.path, newline="") as f:
            if self.fmt == "json":
                lines = [line for line in f.read().splitlines() if line.strip()]
                records = []
                for line in lines:
                    try:
                        records.append((line, json.loads(line)))
                    except json.JSONDecodeError:
                        pass  # a line cut short by a kill
            else:
                records = [(None, row) for row in csv.DictReader(f)]
        # Replaced whole (fsynced, renamed): a kill or a full disk leaves the old log.
        with atomic_write(self.path, "w", newline="") as f:
            if self.fmt == "json":
                f.writelines(line + "\n" for line, record in records if kept(record))
            else:
                writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerows(record for _, record in records if kept(record))


class TrainWindow:
    """The steps since the last log line: their loss, summed on the device (read once
    per line, not per step), their count, the skipped ones among them, and when the
    window started (for samples/s)."""

    def __init__(self, checked: bool, samples_per_step: int, start: float):
        self.checked = checked  # the bad-step guard is on: average the finite losses only
        self.samples_per_step = samples_per_step
        self.reset()
        self.start = start

    def reset(self) -> None:
        """Start the next window, now."""
        self.loss_sum, self.finite, self.steps, self.skipped = None, None, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        # A skipped step's loss may be NaN: the line averages the finite ones
        # (validate="off" shows what the run computed, NaN included).
        if self.checked:
            finite = torch.isfinite(loss)
            loss = torch.where(finite, loss, 0.0)
            self.finite = finite.long() if self.finite is None else self.finite + finite
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.steps += 1

    def record(self, step: int, epoch: float, lr: float, grad_norm, run_start: float) -> dict:
        """The "train" record of the window, ending at ``step`` (reads the device once)."""
        now = time.perf_counter()
        counted = self.steps if self.finite is None else int(self.finite)
        return {"kind": "train", "step": step, "epoch": epoch,
                "loss": float(self.loss_sum) / counted if counted else None, "lr": lr,
                "samples_per_s": self.steps * self.samples_per_step / max(now - self.start, 1e-9),
                "grad_norm": None if grad_norm is None else float(grad_norm),
                "skipped": self.skipped, "elapsed_s": now - run_start}


def _format_loss(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"  # None: every step of the window was skipped


class Progress:
    """Periodic plain lines, or a tqdm bar when asked (or "auto" on a terminal with tqdm installed)."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool):
        self.bar = None
        self.enabled = enabled and mode != "none"
        if self.enabled and mode in ("auto", "bar"):
            try:
                from tqdm import tqdm
            except ImportError:
                if mode == "bar":
                    print("progress=bar needs tqdm (`pip install tqdm`); printing lines instead", file=sys.stderr)
            else:
                if mode == "bar" or sys.stdout.isatty():
                    self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True)

    def update(self, record: dict, steps: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(steps)
            postfix = dict(loss=_format_loss(record["loss"]), lr=f"{record['lr']:.3g}",
                           samples_s=f"{record['samples_per_s']:.0f}")
            if record.get("skipped"):
                postfix["skipped"] = record["skipped"]
            self.bar.set_postfix(**postfix)
        else:
            skipped = f" skipped {record['skipped']}" if record.get("skipped") else ""
            print(f"step {record['step']}/{total} epoch {record['epoch']:.2f} loss {_format_loss(record['loss'])} "
                  f"lr {record['lr']:.4g} {record['samples_per_s']:.0f} samples/s{skipped}", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
