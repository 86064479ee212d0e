"""The child process of a Gluon sm_90 kernel's probe (dcq_ops.triton.hopper_probe):

    python -m dcq_ops.triton.hopper_probe_child --device cuda:0 '<probe class as JSON>'

runs the class's kernel (``kernel``: the seesaw or the pipelined one, asked for alone
through DCQ_OPS_SM90_KERNEL, so no other kernel stands in for it) once on seeded random
inputs that reproduce the class's per-program control flow at a small grid
(``ProbeClass.launch_shape``), synchronises, and compares the loss and gradient rows
with the loss computed in float64 from the same inputs (``row_check.exact_loss_and_grad``) within the first-contact check's bound
(``row_check.compare``). It prints its verdict as one line, ``VERDICT_PREFIX`` then JSON
(``status`` "passed" or "failed", ``what`` "passed", "wrong numbers" or "error",
``reason``, the numbers), and exits 0 when it passed, 1 otherwise. What it cannot say
itself (a hang, a crash) the parent reads from its deadline and exit status.

On a CPU device under ``TRITON_INTERPRET=1`` the launch runs the plain-Triton twin
(dcq_ops.triton.hopper_twin, the algebra of both kernels) instead, where the class's
kernel applies (the seesaw: BLOCK_M = BLOCK_K): what CI can exercise of this child.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

VERDICT_PREFIX = "DCQ_OPS_HOPPER_PROBE_VERDICT "
SEED = 29

# The margin of the probe: ArcFace at s = 64 (the largest logits the loss is used with);
# with filtering, a threshold that some planted slots exceed.
SCALE, M2, THRESHOLD = 64.0, 0.5, 0.3


def probe_inputs(probe_class, device):
    """Seeded (embeddings fp32, class weights fp32, labels, queue weights in the class's
    dtype, queue labels) of the class's launch shape: a tenth of the slots empty, a
    tenth of the same class as some row, and a quarter planted near a row (cosines
    near 1, so that rows' maxima grow along the queue and filtering has work)."""
    import torch
    import torch.nn.functional as F

    rows, slots, _ = probe_class.launch_shape()
    dim = probe_class.dim
    generator = torch.Generator().manual_seed(SEED)
    x = torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    # Positives of cosine about 0.55 (a margin logit near 5 at s = 64): the negatives carry the
    # loss, so that a wrong sum or maximum shows in it, not only in the gradient.
    k = x + 1.5 * torch.randn(rows, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4 * rows, (rows,), generator=generator)
    w = torch.randn(slots, dim, generator=generator, dtype=torch.float64)
    near = torch.rand(slots, generator=generator) < 0.25
    owner = torch.randint(0, rows, (slots,), generator=generator)
    w = torch.where(near[:, None], x[owner] + 0.3 * w / dim**0.5 * x[owner].norm(dim=1, keepdim=True), w)
    queue_labels = torch.randint(4 * rows, 8 * rows, (slots,), generator=generator)
    draw = torch.rand(slots, generator=generator)
    queue_labels = torch.where(draw < 0.1, -1, torch.where(draw < 0.2, labels[owner], queue_labels))
    dtype = getattr(torch, probe_class.dtype)
    return (x.float().to(device), k.float().to(device), labels.to(device),
            F.normalize(w, dim=1).to(dtype).to(device), queue_labels.to(device))


def run(probe_class, device_name: str) -> dict:
    """Launch the class's kernel on the class's inputs and judge it (the verdict's dict).
    ``main`` first marks the process as the probe (``hopper_probe.IN_CHILD``) and asks
    for that kernel alone (``DCQ_OPS_SM90_KERNEL``)."""
    import torch

    from dcq_ops.triton import import_ops

    device = torch.device(device_name)
    # First, so that the kernels are decorated for the interpreter on a CPU device.
    ops = import_ops(interpret=device.type != "cuda")
    from dcq_ops.margin import MarginConfig
    from dcq_ops.rounding_bound import gemm_rounding
    from dcq_ops.row_check import EXACT, compare, exact_loss_and_grad
    from dcq_ops.triton import hopper_launch

    inputs = probe_inputs(probe_class, device)
    margin = MarginConfig(scale=SCALE, m1=1.0, m2=M2, m3=0.0,
                          interclass_filtering_threshold=THRESHOLD if probe_class.filtering else 0.0)
    warps = hopper_launch.RULES[probe_class.kernel].num_warps if device.type == "cuda" else 4
    config = dict(BLOCK_M=probe_class.block_m, BLOCK_K=probe_class.block_k, num_warps=warps,
                  num_stages=probe_class.stages if device.type == "cuda" else 1)
    _, _, split_size = probe_class.launch_shape()
    launched = []
    original = hopper_launch.launch

    def counted(*args, **kwargs):
        launched.append((args[13], kwargs.get("kernel")))  # compute_grad, the kernel
        return original(*args, **kwargs)

    hopper_launch.launch = counted
    try:
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            loss, grad = ops.forward(*inputs, margin.scale, margin.m1, margin.m2, margin.m3,
                                     margin.interclass_filtering_threshold, margin.straight_through_margin,
                                     probe_class.compute_grad, split_size=split_size, config=config)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
    finally:
        hopper_launch.launch = original
    if launched != [(probe_class.compute_grad, probe_class.kernel)]:
        return {"status": "failed", "what": "error",
                "reason": f"the {probe_class.kernel} kernel did not run as the class asks (launches, gradient and "
                          f"kernel: {launched})"}
    exact_loss, exact_grad = exact_loss_and_grad(*inputs, margin, probe_class.compute_grad)
    x, k, _, w, _ = inputs
    verdict = compare(loss, grad if probe_class.compute_grad else None, exact_loss, exact_grad, inputs, margin,
                      (gemm_rounding("triton", x.dtype, w.dtype, k.dtype), EXACT))
    numbers = dict(rows_compared=verdict.rows_compared, loss_error=verdict.loss_error,
                   loss_bound=verdict.loss_bound, grad_error=verdict.grad_error, grad_bound=verdict.grad_bound)
    if verdict.ok:
        return {"status": "passed", "what": "passed", "reason": "", **numbers}
    return {"status": "failed", "what": "wrong numbers", "reason": verdict.reason, **numbers}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dcq_ops.triton.hopper_probe_child",
                                     description="Probe a Gluon sm_90 kernel for one class (a child process).")
    parser.add_argument("probe_class", help="the probe class as JSON (ProbeClass.to_json)")
    parser.add_argument("--device", default="cuda", help="the device to run on (default: cuda)")
    args = parser.parse_args(argv)
    from dcq_ops.triton.hopper_probe_class import ProbeClass
    try:
        probe_class = ProbeClass.from_json(args.probe_class)
    except ValueError as exc:
        parser.error(f"probe_class: {exc}")
    from dcq_ops.triton import hopper_probe  # (no Triton import)
    hopper_probe.IN_CHILD = True  # this process is the probe: its launch is not probed again
    os.environ["DCQ_OPS_SM90_KERNEL"] = probe_class.kernel  # that kernel alone, no chain
    start = time.perf_counter()
    try:
        verdict = run(probe_class, args.device)
    except Exception as exc:  # noqa: BLE001 - a compile or launch error is the verdict
        text = str(exc).strip()
        verdict = {"status": "failed", "what": "error",
                   "reason": f"{type(exc).__name__}: {text.splitlines()[0] if text else '(no message)'}"}
    verdict["seconds"] = round(time.perf_counter() - start, 3)
    sys.stdout.write(VERDICT_PREFIX + json.dumps(verdict, sort_keys=True) + "\n")
    sys.stdout.flush()
    return 0 if verdict["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
