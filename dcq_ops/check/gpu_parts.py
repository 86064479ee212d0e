"""``python -m dcq_ops.check``, the GPU parts: the Triton configuration and the autotuner's
pick (part 2), training steps that never synchronise (part 4), and the timings (part 5).
Each is skipped with the reason where it cannot run."""

from __future__ import annotations

import torch
import torch.nn.functional as F

import dcq_ops
from dcq_ops.backends import why_unavailable
from dcq_ops.check.numerics import MARGINS
from dcq_ops.check.report import Report, environment, finite, name


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
    section = {"gpu": torch.cuda.get_devicename(device), "architecture": architecture.name,
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
    with environment(DCQ_TRITON_AUTOTUNE="1"):
        ops.triton_dcq_cross_entropy(x, x, y, w, yq, 64.0, 1.0, 0.5, 0.0, 0.0, True, True)
        torch.cuda.synchronize(device)
    section["autotuner_call"] = "N=512, K=65536, D=512, bf16 queue, with gradient"
    section["autotuner_picks"] = {
        (f"BLOCK_M={key[0]}" if isinstance(key, tuple) else str(key)): _config_dict(best)
        for key, best in launch.autotuner_picks().items()}
    report.data["triton_configuration"] = section


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
    section = {"backend": loss_fn.resolved_backend, "queue": name(loss_fn.queue.weights.dtype),
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
    section["losses"] = [finite(v) for v in torch.stack(losses).tolist()] if losses else []
    report.data["sync_free_step"] = section


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


def _time_sm90_kernels(section: dict, fn, device: torch.device, repeats: int, flops: float) -> None:
    """On sm_90, the Triton backend once more with each queue-pass kernel forced
    (DCQ_OPS_SM90_KERNEL: the seesaw and pipelined Gluon kernels and the classic one), side
    by side with the GEMM pair; with the Gluon kernels' probe verdicts (a failed probe runs
    the classic kernel, which the verdicts then show)."""
    from dcq_ops.triton import hopper_launch, hopper_probe

    for kernel in hopper_launch.CHOICES:
        with environment(**{hopper_launch.ENV: kernel}):
            ms = _time_ms(fn, device, repeats)
        section[f"triton_{kernel}_ms"] = ms
        section[f"triton_{kernel}_tflops"] = flops / ms / 1e9
        section[f"triton_{kernel}_vs_gemm_pair"] = section["gemm_pair_ms"] / ms
    for kernel in ("pipelined", "seesaw"):
        section[f"{kernel}_vs_classic"] = section["triton_classic_ms"] / section[f"triton_{kernel}_ms"]
    section["hopper_probe"] = hopper_probe.verdicts()


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
        if backend == "triton" and torch.cuda.get_device_capability(device) == (9, 0):
            _time_sm90_kernels(section, fn, device, repeats, flops)
    if "triton_ms" in section:
        section["triton_vs_gemm_pair"] = section["gemm_pair_ms"] / section["triton_ms"]
        if "chunked_ms" in section:
            section["triton_vs_chunked"] = section["chunked_ms"] / section["triton_ms"]
    section["note"] = "ratios > 1: the fused kernel is faster; forward with the gradient, one GPU, one run"
    report.data["timing"] = section
