"""``python -m dcq_ops.check``, part 3: ``dcq_ops.warmup`` of each fused backend and queue
dtype (the first-contact check), its outcomes (a demotion is a failure of the command, with
its reason), the Gluon sm_90 kernels' probes (``hopper_probe``: a failed one is a failure
too) and ``dcq_ops.backends()`` after it."""

from __future__ import annotations

import torch

import dcq_ops
from dcq_ops import first_contact
from dcq_ops.backends import FUSED_BACKENDS, select_backend, why_unavailable
from dcq_ops.check.report import Report, finite, name


def first_contact_check(report: Report, device: torch.device, seed: int) -> None:
    """The warm-up of every fused backend and queue dtype, with and without the gradient, at a
    batch of whole row blocks and one with a tail (another launch plan)."""
    rows, dim, slots = (512, 512, 1 << 16) if device.type == "cuda" else (64, 64, 1000)
    cases = []
    if first_contact.skip_requested():
        report.skip("first_contact", f"{first_contact.SKIP_ENV} is set")
    for backend in FUSED_BACKENDS:
        missing = why_unavailable(backend, device)
        if missing is not None:
            report.skip(f"first_contact/{backend}", missing)
            continue
        for queue_dtype in (torch.bfloat16, torch.float16, torch.float32):
            try:
                select_backend(device, backend, queue_dtype=queue_dtype)
            except (TypeError, RuntimeError) as exc:
                report.skip(f"first_contact/{backend}/{name(queue_dtype)}", str(exc))
                continue
            for outcome in dcq_ops.warmup([rows, rows - 3], dim, slots, queue_dtype=queue_dtype, device=device,
                                          backend=backend, evaluation=True, seed=seed):
                cases.append({key: (finite(value) if isinstance(value, float) else value)
                              for key, value in outcome.as_dict().items()})
                if outcome.status in ("demoted", "failed"):
                    report.fail(f"first_contact/{backend}/{name(queue_dtype)}", outcome.reason)
    # The Gluon sm_90 kernels' probes met by the warm-up (dcq_ops.triton.hopper_probe): a
    # failed one runs the next kernel of the chain, a demotion like the others.
    from dcq_ops.triton import hopper_probe
    probes = hopper_probe.verdicts()
    for probe in probes:
        if probe["status"] != "passed":
            report.fail("first_contact/hopper_probe", f"{probe['class_words']}: {probe['what']}: {probe['reason']}")
    report.data["first_contact"] = {"rows": rows, "dim": dim, "queue_size": slots, "batch_sizes": [rows, rows - 3], "outcomes": cases,
                                    "hopper_probe": probes, "backends_after": dcq_ops.backends(device)}
