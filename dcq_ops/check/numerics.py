"""``python -m dcq_ops.check``, part 1: every available backend and queue dtype against the
loss computed in float64 from the same inputs (``dcq_ops.row_check.exact_loss_and_grad``),
within the first-contact check's bound."""

from __future__ import annotations

import torch

from dcq_ops import row_check
from dcq_ops.rounding_bound import gemm_rounding
from dcq_ops.backends import select_backend, why_unavailable
from dcq_ops.check.report import Report, finite, inputs as make_inputs, name
from dcq_ops.margin import MarginConfig

MARGINS = {
    "arcface": MarginConfig(64.0, 1.0, 0.5, 0.0),
    "cosface": MarginConfig(50.0, 1.0, 0.0, 0.3),
    "cosface_filtered": MarginConfig(50.0, 1.0, 0.0, 0.3, 0.1),
}
QUEUE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def numerics(report: Report, device: torch.device, seed: int) -> None:
    """Every available backend and queue dtype, three margins, against the float64 loss."""
    rows, dim, slots = (256, 128, 4096) if device.type == "cuda" else (37, 48, 500)
    results = []
    for backend in ("triton", "chunked", "reference"):
        missing = why_unavailable(backend, device)
        if missing is not None:
            report.skip(f"numerics/{backend}", missing)
            continue
        for queue_dtype in QUEUE_DTYPES:
            dtype = torch.float64 if queue_dtype == torch.float64 else torch.float32
            what = f"numerics/{backend}/{name(queue_dtype)}"
            try:
                select_backend(device, backend, input_dtypes=(dtype,), queue_dtype=queue_dtype)
            except (TypeError, RuntimeError) as exc:
                report.skip(what, str(exc))
                continue
            for margin_name, margin in MARGINS.items():
                inputs = make_inputs(rows, dim, slots, 500, dtype, queue_dtype, device, seed)
                results.append(_numerics_case(report, backend, margin_name, margin, inputs, what))
    report.data["numerics"] = {"rows": rows, "dim": dim, "queue_size": slots, "cases": results}


def _numerics_case(report, backend, margin_name, margin, inputs, what):
    x, k, y, w, yq = inputs
    loss, grad = row_check.slice_loss_and_grad(backend, x, k, y, w, yq, margin, True)
    exact_loss, exact_grad = row_check.slice_loss_and_grad("float64", *inputs, margin, True)
    roundings = (gemm_rounding(backend, x.dtype, w.dtype, k.dtype), row_check.EXACT)
    verdict = row_check.compare(loss, grad, exact_loss, exact_grad, inputs, margin, roundings)
    case = {"backend": backend, "embeddings": name(x.dtype), "queue": name(w.dtype), "margin": margin_name,
            "against": "float64", "status": "passed" if verdict.ok else "failed",
            "loss_error": finite(verdict.loss_error), "loss_bound": finite(verdict.loss_bound),
            "grad_error": finite(verdict.grad_error), "grad_bound": finite(verdict.grad_bound),
            "max_loss_error_vs_float64": finite((loss.double() - exact_loss).abs().max().item()),
            "rows_near_threshold": verdict.rows_near_threshold}
    if not verdict.ok:
        report.fail(f"{what}/{margin_name}", verdict.reason)
    return case
