"""``python -m dcq_ops.check``: what this machine's backends compute, as JSON.

Run it on your GPU after installing (``scripts/gpu_check.sh`` runs it too). It reports:

1. **numerics**: every available backend ("triton", "chunked", "reference") and queue
   dtype (fp32, fp16, bf16; float64 where the backend computes it) against the reference,
   on small seeded inputs and three margins, within the first-contact check's error bound
   (``dcq_ops.rounding_bound.difference_bound``; the reference itself against float64);
2. **triton_configuration**: the architecture, the tile configurations that fit (the first
   is the default) and the autotuner's pick (``launch.autotuner_picks()``, autotuning
   forced on for that call);
3. **first_contact**: ``dcq_ops.warmup`` of each fused backend and queue dtype (the
   first-contact check), its outcomes and ``dcq_ops.backends()`` after it;
4. **sync_free_step**: training steps of a small model with ``DCQLoss`` after
   ``DCQLoss.prepare`` and one warm-up step, under ``torch.cuda.set_sync_debug_mode("error")``;
5. **timing**: the fused Triton pass against the cuBLAS GEMM pair it fuses (logits
   ``q W^T`` then ``P W``, bf16) and against "chunked", forward with the gradient.

Parts that cannot run here (no GPU, no Triton, no extension) are listed under
``"skipped"`` with the reason. The JSON goes to stdout, or to ``--out PATH`` (rewritten
after every part, with ``"unfinished": true`` until the end, so that a time limit keeps
what ran); progress goes to stderr. Exit status: 0 when every check that ran passed, 1 when one failed (a
numerics or first-contact mismatch, a synchronisation in the step, an error), 2 on a
bad argument. On a CPU it takes a few seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
import time
import traceback

import torch
import torch.nn.functional as F

import dcq_ops
from dcq_ops import first_contact, rounding_bound
from dcq_ops.atomic_write import write_text
from dcq_ops.backends import select_backend, why_unavailable
from dcq_ops.margin import MarginConfig
from dcq_ops.validation import positive_int_argument

MARGINS = {
    "arcface": MarginConfig(64.0, 1.0, 0.5, 0.0),
    "cosface": MarginConfig(50.0, 1.0, 0.0, 0.3),
    "cosface_filtered": MarginConfig(50.0, 1.0, 0.0, 0.3, 0.1),
}
QUEUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _say(message: str) -> None:
    print(f"[dcq_ops.check] {message}", file=sys.stderr, flush=True)


def _finite(value):
    """A float for JSON: None for NaN or inf (JSON has neither)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _inputs(rows, dim, slots, classes, dtype, queue_dtype, device, seed):
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
        _say(f"skipped {part}: {reason}")
        self.data["skipped"].append({"part": part, "reason": reason})

    def fail(self, part: str, reason: str) -> None:
        _say(f"FAILED {part}: {reason}")
        self.data["failures"].append({"part": part, "reason": reason})

    @contextlib.contextmanager
    def part(self, name: str):
        """Run a part; an exception in it is a failure of that part, not of the command."""
        start = time.perf_counter()
        _say(f"{name} ...")
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - reported, with its traceback
            self.fail(name, f"{type(exc).__name__}: {exc}")
            self.data.setdefault("tracebacks", {})[name] = traceback.format_exc()
        self.data.setdefault("seconds", {})[name] = round(time.perf_counter() - start, 3)


# ----------------------------------------------------------------------------
# 1. Numerics


def numerics(report: Report, device: torch.device, seed: int) -> None:
    rows, dim, slots = (256, 128, 4096) if device.type == "cuda" else (37, 48, 500)
    results = []
    for backend in ("triton", "chunked", "reference"):
        missing = why_unavailable(backend, device)
        if missing is not None:
            report.skip(f"numerics/{backend}", missing)
            continue
        for queue_dtype in QUEUE_DTYPES:
            dtype = torch.float64 if queue_dtype == torch.float64 else torch.float32
            what = f"numerics/{backend}/{_name(queue_dtype)}"
            try:
                select_backend(device, backend, input_dtypes=(dtype,), queue_dtype=queue_dtype)
            except (TypeError, RuntimeError) as exc:
                report.skip(what, str(exc))
                continue
            for margin_name, margin in MARGINS.items():
                inputs = _inputs(rows, dim, slots, 500, dtype, queue_dtype, device, seed)
                results.append(_numerics_case(report, backend, margin_name, margin, inputs, what))
    report.data["numerics"] = {"rows": rows, "dim": dim, "queue_size": slots, "cases": results}


def _numerics_case(report, backend, margin_name, margin, inputs, what):
    x, k, y, w, yq = inputs
    loss, grad = first_contact.slice_loss_and_grad(backend, x, k, y, w, yq, margin, True)
    if backend == "reference":  # the reference against itself in float64
        other = tuple(t.double() if t.is_floating_point() else t for t in inputs)
        ref_loss, ref_grad = first_contact.slice_loss_and_grad("reference", *other, margin, True)
        roundings = (rounding_bound.gemm_rounding("reference", x.dtype, w.dtype, k.dtype),
                     rounding_bound.GemmRounding(None, 0.0, False))
        against = "reference in float64"
    else:
        ref_loss, ref_grad = first_contact.slice_loss_and_grad("reference", *inputs, margin, True)
        roundings = (rounding_bound.gemm_rounding(backend, x.dtype, w.dtype, k.dtype),
                     rounding_bound.gemm_rounding("reference", x.dtype, w.dtype, k.dtype))
        against = "reference"
    verdict = first_contact.compare(loss, grad, ref_loss, ref_grad, inputs, margin, roundings)
    with torch.no_grad():
        exact = first_contact.slice_loss_and_grad(
            "reference", *(t.double() if t.is_floating_point() else t for t in inputs), margin, False)[0]
    case = {"backend": backend, "embeddings": _name(x.dtype), "queue": _name(w.dtype), "margin": margin_name,
            "against": against, "status": "passed" if verdict.ok else "failed",
            "loss_error": _finite(verdict.loss_error), "loss_bound": _finite(verdict.loss_bound),
            "grad_error": _finite(verdict.grad_error), "grad_bound": _finite(verdict.grad_bound),
            "max_loss_error_vs_float64": _finite((loss.double() - exact).abs().max().item()),
            "rows_near_threshold": verdict.rows_near_threshold}
    if not verdict.ok:
        report.fail(f"{what}/{margin_name}", verdict.reason)
    return case


# ----------------------------------------------------------------------------
# 2. The Triton configuration and the autotuner's pick


@contextlib.contextmanager
def _environment(**values):
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


def _config_dict(config):
    """A triton.Config as JSON (None before the autotuner has run)."""
    if config is None:
        return None
    return {"kwargs": dict(getattr(config, "kwargs", {})), "num_warps": getattr(config, "num_warps", None),
            "num_stages": getattr(config, "num_stages", None)}


def triton_configuration(report: Report, device: torch.device) -> None:
    if device.type != "cuda":
        report.skip("triton_configuration", "no CUDA GPU: the configuration is chosen per GPU architecture")
        return
    missing = why_unavailable("triton", device)
    if missing is not None:
        report.skip("triton_configuration", missing)
        return
    from dcq_ops.triton import launch, ops
    from dcq_ops.triton.configs import mma_family, tile_configs

    architecture, sms = launch.device_architecture(device.index)
    section = {"gpu": torch.cuda.get_device_name(device), "architecture": architecture.name,
               "mma": mma_family(architecture.capability),
               "shared_memory_per_block_optin_kib": architecture.shared_memory_per_block_optin >> 10,
               "multiprocessors": sms, "candidates_d512": {}}
    for name, size, tf32 in (("bf16/fp16", 2, False), ("fp32", 4, False), ("tf32", 4, True)):
        section["candidates_d512"][name] = [c.as_dict() for c in tile_configs(architecture, size, 512, tf32)]
    g = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(512, 512, device=device, generator=g)
    w = F.normalize(torch.randn(1 << 16, 512, device=device, generator=g), dim=1).bfloat16()
    y = torch.randint(0, 1000, (512,), device=device, generator=g)
    yq = torch.randint(0, 1000, (1 << 16,), device=device, generator=g)
    with _environment(DCQ_TRITON_AUTOTUNE="1"):
        ops.triton_dcq_cross_entropy(x, x, y, w, yq, 64.0, 1.0, 0.5, 0.0, 0.0, True, True)
        torch.cuda.synchronize(device)
    section["autotuner_call"] = "N=512, K=65536, D=512, bf16 queue, with gradient"
    section["autotuner_picks"] = {
        (f"BLOCK_M={key[0]}" if isinstance(key, tuple) else str(key)): _config_dict(best)
        for key, best in launch.autotuner_picks().items()}
    report.data["triton_configuration"] = section


# ----------------------------------------------------------------------------
# 3. The first-contact check


def first_contact_check(report: Report, device: torch.device, seed: int) -> None:
    rows, dim, slots = (512, 512, 1 << 16) if device.type == "cuda" else (64, 64, 1000)
    cases = []
    if first_contact.skip_requested():
        report.skip("first_contact", f"{first_contact.SKIP_ENV} is set")
    for backend in first_contact.FUSED_BACKENDS:
        missing = why_unavailable(backend, device)
        if missing is not None:
            report.skip(f"first_contact/{backend}", missing)
            continue
        for queue_dtype in (torch.bfloat16, torch.float16, torch.float32):
            try:
                select_backend(device, backend, queue_dtype=queue_dtype)
            except (TypeError, RuntimeError) as exc:
                report.skip(f"first_contact/{backend}/{_name(queue_dtype)}", str(exc))
                continue
            for outcome in dcq_ops.warmup([rows], dim, slots, queue_dtype=queue_dtype, device=device,
                                          backend=backend, evaluation=True, seed=seed):
                cases.append({key: (_finite(value) if isinstance(value, float) else value)
                              for key, value in outcome.as_dict().items()})
                if outcome.status == "demoted":
                    report.fail(f"first_contact/{backend}/{_name(queue_dtype)}", outcome.reason)
    report.data["first_contact"] = {"rows": rows, "dim": dim, "queue_size": slots, "outcomes": cases,
                                    "backends_after": dcq_ops.backends(device)}


# ----------------------------------------------------------------------------
# 4. A training step that never synchronises


def sync_free_step(report: Report, device: torch.device, seed: int) -> None:
    if device.type != "cuda":
        report.skip("sync_free_step", "no CUDA GPU: torch.cuda.set_sync_debug_mode needs one")
        return
    torch.manual_seed(seed)
    backbone = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128)).to(device)
    generator = dcq_ops.MomentumEncoder(backbone, momentum=0.99)
    loss_fn = dcq_ops.DCQLoss(None, 128, 1000, sample_rate=0.5).to(device)
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator(device=device).manual_seed(seed)
    batches = [(torch.randn(64, 32, device=device, generator=g), torch.randn(64, 32, device=device, generator=g),
                torch.randint(0, 1000, (64,), device=device, generator=g)) for _ in range(6)]
    outcomes = loss_fn.prepare([64])

    def step(batch):
        a, b, labels = batch
        loss = loss_fn(backbone(a), labels, generator(b))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        generator.update()
        return loss.detach()

    step(batches[0])  # the optimizer's state, the guard's buffers
    torch.cuda.synchronize(device)
    section = {"backend": loss_fn.resolved_backend, "queue": _name(loss_fn.queue.weights.dtype),
               "prepare": [o.status for o in outcomes], "warmup_steps": 1, "checked_steps": len(batches) - 1}
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[1:]:
            losses.append(step(batch))
    except RuntimeError as exc:
        section["status"] = "failed"
        section["error"] = str(exc).splitlines()[0]
        report.fail("sync_free_step", section["error"])
    else:
        section["status"] = "passed"
    finally:
        torch.cuda.set_sync_debug_mode("default")
    section["losses"] = [_finite(v) for v in torch.stack(losses).tolist()] if losses else []
    report.data["sync_free_step"] = section


# ----------------------------------------------------------------------------
# 5. Timing


def _time_ms(fn, device, repeats: int) -> float:
    for _ in range(2):
        fn()
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize(device)
    return start.elapsed_time(end) / repeats


def timing(report: Report, device: torch.device, rows: int, slots: int, dim: int, repeats: int, seed: int) -> None:
    if device.type != "cuda":
        report.skip("timing", "no CUDA GPU: the timings compare GPU kernels")
        return
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(rows, dim, device=device, generator=g)
    k = 0.5 * x + torch.randn(rows, dim, device=device, generator=g)
    y = torch.randint(0, slots, (rows,), device=device, generator=g)
    w = F.normalize(torch.randn(slots, dim, device=device, generator=g), dim=1).bfloat16()
    yq = torch.randint(0, slots, (slots,), device=device, generator=g)
    margin = MARGINS["arcface"]
    flops = 4.0 * rows * slots * dim  # the two GEMMs
    section = {"rows": rows, "queue_size": slots, "dim": dim, "queue": "bfloat16", "repeats": repeats,
               "gemm_tflop": flops / 1e12}
    q = F.normalize(x, dim=1).bfloat16()

    def gemm_pair():
        logits = q @ w.t()
        return logits @ w

    section["gemm_pair_ms"] = _time_ms(gemm_pair, device, repeats)
    args = (x, k, y, w, yq, margin.scale, margin.m1, margin.m2, margin.m3, 0.0, False, True)
    for backend in ("triton", "chunked"):
        missing = why_unavailable(backend, device)
        if missing is not None:
            report.skip(f"timing/{backend}", missing)
            continue
        if backend == "triton":
            from dcq_ops.triton import ops

            fn = lambda: ops.triton_dcq_cross_entropy(*args)  # noqa: E731
        else:
            fn = lambda: torch.ops.dcq_ops.dcq_cross_entropy(*args, 0)  # noqa: E731
        section[f"{backend}_ms"] = _time_ms(fn, device, repeats)
        section[f"{backend}_tflops"] = flops / section[f"{backend}_ms"] / 1e9
    if "triton_ms" in section:
        section["triton_vs_gemm_pair"] = section["gemm_pair_ms"] / section["triton_ms"]
        if "chunked_ms" in section:
            section["triton_vs_chunked"] = section["chunked_ms"] / section["triton_ms"]
    section["note"] = "ratios > 1: the fused kernel is faster; forward with the gradient, one GPU, one run"
    report.data["timing"] = section


# ----------------------------------------------------------------------------
# The command


def parser() -> argparse.ArgumentParser:
    """The command's arguments (``python -m dcq_ops.check --help``)."""
    p = argparse.ArgumentParser(prog="python -m dcq_ops.check", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="-", help="where the JSON goes: a path, or - for stdout (default)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                   help="auto: the current CUDA device if there is one, else the CPU")
    p.add_argument("--seed", type=int, default=0, help="seed of every input (default 0)")
    p.add_argument("--timing-shape", default="2048,262144,512", metavar="N,K,D",
                   help="rows, queue size and D of the timings (default 2048,262144,512)")
    p.add_argument("--repeats", type=positive_int_argument, default=10, help="timed repetitions (default 10)")
    p.add_argument("--skip", action="append", default=[],
                   choices=("numerics", "triton_configuration", "first_contact", "sync_free_step", "timing"),
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


def _write(data: dict, out: str) -> None:
    text = json.dumps(data, indent=2, default=str)
    if out == "-":
        print(text)
    else:
        write_text(out, text + "\n")  # replaced whole: a time limit mid-write keeps the last report


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
    for name, part in parts:
        if name in args.skip:
            report.skip(name, "--skip")
            continue
        with report.part(name):
            part()
        if args.out != "-":
            _write(dict(data, ok=None, unfinished=True), args.out)
    data["ok"] = not data["failures"]
    return data


def main(argv=None) -> int:
    """Run the check; the exit status (0 passed, 1 a check failed; argparse exits 2)."""
    p = parser()
    args = p.parse_args(argv)
    args.timing_shape = _timing_shape(p, args.timing_shape)
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("argument --device: cuda asked for, but torch.cuda.is_available() is False")
    data = run(args)
    _write(data, args.out)
    if args.out != "-":
        _say(f"wrote {args.out}")
    _say(("passed" if data["ok"] else f"{len(data['failures'])} failure(s)") +
         f"; skipped {len(data['skipped'])} part(s)")
    return 0 if data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
