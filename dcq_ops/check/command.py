"""``python -m dcq_ops.check``: its arguments (every bad one exits 2 before anything runs)
and the run of every part."""

from __future__ import annotations

import argparse
import os
import platform

import torch

import dcq_ops
from dcq_ops import downgrades, first_contact
from dcq_ops.check.first_contact_part import first_contact_check
from dcq_ops.check.gpu_parts import sync_free_step, timing, triton_configuration
from dcq_ops.check.numerics import numerics
from dcq_ops.check.report import Report, say, write
from dcq_ops.validation import positive_int_argument

PARTS = ("numerics", "triton_configuration", "first_contact", "sync_free_step", "timing")


def parser() -> argparse.ArgumentParser:
    """The command's arguments (``python -m dcq_ops.check --help``)."""
    p = argparse.ArgumentParser(prog="python -m dcq_ops.check", description="What this machine's backends compute, as JSON.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="-", help="where the JSON goes: a path, or - for stdout (default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the current CUDA device if there is one, else the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of every input (default 0)")
    p.add_argument("--timing-shape", default="2048,262144,512", metavar="N,K,D",
                   help="rows, queue size and D of the timings (default 2048,262144,512)")
    p.add_argument("--repeats", type=positive_int_argument, default=10, help="timed repetitions (default 10)")
    p.add_argument("--skip", action="append", default=[],
                   choices=PARTS,
                   help="leave a part out (repeatable)")
    return p


def _timing_shape(p: argparse.ArgumentParser, text: str) -> tuple[int, int, int]:
    parts = text.split(",")
    try:
        values = tuple(int(v) for v in parts)
    except ValueError:
        values = ()
    if len(values) != 3 or min(values) <= 0:
        p.error(f"argument --timing-shape: expected three positive ints N,K,D, got {text!r}")
    return values


def _out_path(p: argparse.ArgumentParser, out: str) -> str:
    """``--out`` checked before anything runs: "-", or a file in a folder that exists and can be
    written (a run of minutes must not end in an error about its output)."""
    if out == "-":
        return out
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        p.error(f"argument --out: expected a file path or -, got the folder {out!r}")
    if not os.path.isdir(folder):
        p.error(f"argument --out: the folder {folder!r} does not exist (got {out!r})")
    if not os.access(folder, os.W_OK | os.X_OK) or (os.path.exists(out) and not os.access(out, os.W_OK)):
        p.error(f"argument --out: {out!r} cannot be written")
    return out


def run(args) -> dict:
    """Every part of the check with the parsed arguments: the report as a dict (written to
    ``args.out`` after every part when it is a path, so that a time limit keeps what ran)."""
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    report = Report()
    data = report.data
    try:
        import triton
        triton_version = triton.__version__
    except ImportError as exc:
        triton_version = f"not importable: {exc}"
    data["environment"] = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "triton": triton_version, "dcq_ops": dcq_ops.__version__, "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "capability": list(torch.cuda.get_device_capability(device)) if device.type == "cuda" else None,
        "cpu_capability": dcq_ops.cpu_capability(), "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "extension": "loaded" if dcq_ops.extension_loaded() else dcq_ops.EXTENSION_ERROR,
    }
    data["backends"] = dcq_ops.backends(device)
    first_contact.reset()  # this command's checks, not those of an earlier import
    rows, slots, dim = args.timing_shape
    parts = (("numerics", lambda: numerics(report, device, args.seed)),
             ("triton_configuration", lambda: triton_configuration(report, device)),
             ("first_contact", lambda: first_contact_check(report, device, args.seed)),
             ("sync_free_step", lambda: sync_free_step(report, device, args.seed)),
             ("timing", lambda: timing(report, device, rows, slots, dim, args.repeats, args.seed)))
    for part_name, part in parts:
        if part_name in args.skip:
            report.skip(part_name, "--skip")
            continue
        with report.part(part_name):
            part()
        if args.out != "-":
            write(dict(data, ok=None, unfinished=True), args.out)
    data["downgrades"] = downgrades.downgrades(device)
    data["ok"] = not data["failures"]
    return data


def main(argv=None) -> int:
    """Run the check; the exit status (0 passed, 1 a check failed; 2, from argparse, on a bad
    argument, before anything runs)."""
    p = parser()
    args = p.parse_args(argv)
    args.timing_shape = _timing_shape(p, args.timing_shape)
    args.out = _out_path(p, args.out)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda asked for, but torch.cuda.is_available() is False")
    data = run(args)
    write(data, args.out)
    if args.out != "-":
        say(f"wrote {args.out}")
    say(("passed" if data["ok"] else f"{len(data['failures'])} failure(s)") +
         f"; skipped {len(data['skipped'])} part(s)")
    return 0 if data["ok"] else 1
