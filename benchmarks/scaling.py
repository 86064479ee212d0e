#!/usr/bin/env python
"""How DCQLoss's multi-rank modes scale: gathered vs sharded on 1, 2 and 4 ranks
(gloo on the CPU), queue sizes from 10^4 to 2*10^6 slots.

    python benchmarks/scaling.py                  # the default sweep, results/scaling_cpu.*
    python benchmarks/scaling.py --worlds 1,2 --queue-sizes 10000,100000 --out /tmp/scaling

For every (mode, ranks, queue size) it reports, per rank:

- ``step_ms``: one training step of the loss (forward with the enqueue, then the
  backward), a barrier closing each step so that the time is the slowest rank's;
  the median over ``--repeats`` steps after ``--warmup`` untimed ones, with the
  same number of steps on every rank (ranks must call the collectives together);
- ``queue_mib``: the queue this rank holds (weights, labels, pointer);
- ``sent_bytes``: the bytes this rank sends per step, counted at the package's
  collectives (dcq_ops.parallel.collectives' traffic counter, which charges each
  collective what a ring algorithm sends from one rank) during one extra step.

One rank runs the single-process path (both modes resolve to "none": no
communication), the baseline of the ratios. The ranks share the machine's cores:
each gets ``cores // ranks`` torch threads (at least one), so a step on 4 ranks of
a 2-core machine is slower than on 1 even without communication; read the
per-step bytes and memory as the transferable result, and the times as this
machine's. docs/distributed.md turns the bytes into a model for NCCL on 8-512 GPUs.

Writes ``<out>.json`` (meta block + rows), ``<out>.csv`` and ``<out>.png``.
Exits 0 on success, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import socket
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (GIB, MIB, NOISY_LEGEND, NOISY_MARK, RESULTS_DIR, available_ram, describe, format_table,  # noqa: E402
                    meta, pyplot, time_stable, write_csv, write_json)

MODES = ("gathered", "sharded")
COLUMNS = ["mode", "ranks", "queue_size", "dim", "rows_per_rank", "threads_per_rank", "status", "median_ms",
           "min_ms", "max_ms", "stable", "queue_mib", "sent_bytes", "model_bytes"]
NUM_CLASSES = 10 ** 7  # labels drawn from many classes: few exclusions, as on a real set


def int_list(text: str) -> list[int]:
    try:
        values = [int(float(v)) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of integers, got {text!r}") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worlds", type=int_list, default=[1, 2, 4], help="numbers of ranks (default 1,2,4)")
    p.add_argument("--modes", default="gathered,sharded", help="gathered and/or sharded (default both)")
    p.add_argument("--queue-sizes", type=int_list, default=[10 ** 4, 10 ** 5, 10 ** 6, 2 * 10 ** 6],
                   help="queue sizes K, global (default 1e4,1e5,1e6,2e6)")
    p.add_argument("--dim", type=int, default=128, help="embedding size D (default 128: 2e6 slots are 1 GiB "
                                                         "in fp32, so 4 gathered ranks fit 24 GiB)")
    p.add_argument("--rows", type=int, default=64, help="batch rows per rank (default 64)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration (default 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed steps per configuration (default 3)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="per world size (default 1800)")
    p.add_argument("--out", default=str(RESULTS_DIR / "scaling_cpu"),
                   help="output path without suffix (default benchmarks/results/scaling_cpu)")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or any(m not in MODES for m in modes):
        p.error(f"--modes must be a comma-separated subset of {','.join(MODES)}, got {args.modes!r}")
    args.modes = modes
    for name in ("dim", "rows", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not args.timeout_s > 0:
        p.error(f"--timeout-s must be > 0, got {args.timeout_s}")
    if any(k < max(args.worlds) * args.rows for k in args.queue_sizes):
        p.error(f"every queue size must hold one step's gathered batch ({max(args.worlds)} ranks x {args.rows} "
                f"rows), got {args.queue_sizes}")
    return args


# --------------------------------------------------------------------------- the model of the bytes


def model_bytes(mode: str, world: int, rows: int, dim: int, value_bytes: int = 4, acc_bytes: int = 4) -> int:
    """The bytes one rank sends per training step, by docs/distributed.md's table,
    charged as a ring algorithm charges each rank (dcq_ops.parallel.collectives): an
    all-gather of an input of b bytes sends (W-1) b, a reduce-scatter (W-1)/W of its
    input, an all-reduce 2 (W-1)/W of its tensor. Equal batches of ``rows`` per rank
    (the capacity agreed at the first step is then ``rows``: no padding).

    - every step, both modes: the header, HEADER_FIELDS int64 per rank, all-gathered;
    - gathered: the labels (int64) and the class weights, all-gathered for the enqueue;
    - sharded: the embeddings and labels, all-gathered for the loss; the row maxima,
      all-reduced (MAX); the row sums and gradient accumulators (accumulation dtype),
      reduce-scattered; the class weights, all-gathered for the enqueue (the labels
      gathered for the loss are reused)."""
    from dcq_ops.parallel.strategy import HEADER_FIELDS

    if world == 1:
        return 0
    peers, total = world - 1, world * rows
    header = peers * len(HEADER_FIELDS) * 8
    labels = peers * rows * 8
    vectors = peers * rows * dim * value_bytes  # one [rows, D] input, all-gathered
    if mode == "gathered":
        return header + labels + vectors
    maxima = 2 * peers * total * acc_bytes / world
    sums = peers * total * (dim + 1) * acc_bytes / world
    return round(header + 2 * vectors + labels + maxima + sums)


# Collectives per training step and the ring steps each takes (W-1 for an all-gather or a
# reduce-scatter, 2 (W-1) for an all-reduce): what the latency term of the projection counts.
RING_STEPS = {"gathered": (1, 1, 1), "sharded": (1, 1, 1, 2, 1, 1)}


def projection(*, worlds=(8, 16, 64, 128, 512), rows: int = 128, dim: int = 512, value_bytes: int = 2,
               nvlink_gbs: float = 360.0, network_gbs: float = 45.0, nvlink_hop_us: float = 2.0,
               network_hop_us: float = 6.0, classes=(10 ** 7, 10 ** 8), sample_rate: float = 0.1) -> list[dict]:
    """NCCL on W GPUs, from the byte model the CPU run verifies (``model_bytes``): the
    communication time of one step, ``sum over collectives of ring steps x hop latency +
    bytes sent by a rank / link bandwidth``, and the queue memory per GPU. Assumptions
    (the defaults, all arguments): ``rows`` per GPU, bf16 embeddings and class weights,
    fp32 accumulation; one node of 8 GPUs on NVLink (``nvlink_gbs``: the bus bandwidth an
    H100/H200 ring all-gather reaches, GB/s), more than 8 on a network of one 400 Gb/s
    NIC per GPU (``network_gbs``); per-hop latencies ``nvlink_hop_us`` / ``network_hop_us``."""
    out = []
    for world in worlds:
        bandwidth, hop = (nvlink_gbs, nvlink_hop_us) if world <= 8 else (network_gbs, network_hop_us)
        for mode in MODES:
            sent = model_bytes(mode, world, rows, dim, value_bytes=value_bytes)
            latency_us = sum(RING_STEPS[mode]) * (world - 1) * hop
            row = {"mode": mode, "gpus": world, "rows_per_gpu": rows, "dim": dim, "sent_mib": sent / MIB,
                   "link_gbs": bandwidth, "comm_ms": (latency_us * 1e-6 + sent / (bandwidth * 1e9)) * 1e3}
            for c in classes:
                slots = math.ceil(sample_rate * c)
                held = slots if mode == "gathered" else math.ceil(slots / world)
                row[f"queue_gib_{c:.0e}_classes"] = held * (dim * value_bytes + 8) / GIB
            out.append(row)
    return out


# --------------------------------------------------------------------------- one rank


def _queue_bytes(queue) -> int:
    return sum(t.numel() * t.element_size() for t in (queue.weights, queue.labels, queue.ptr))


def _one_config(mode: str, queue_size: int, args, rank: int, world: int) -> dict:
    import dcq_ops
    from dcq_ops.parallel import collectives

    loss_fn = dcq_ops.DCQLoss(None, args.dim, NUM_CLASSES, queue_size=queue_size, distributed=mode,
                              validate="async")
    g = torch.Generator().manual_seed(1234 + rank)
    # A full queue: every slot a negative (random unit vectors of no class), in blocks
    # of at most the queue size the prefill takes at once.
    filler = torch.Generator().manual_seed(99)  # the same on every rank: gathered queues must agree
    block = min(queue_size, 1 << 16)
    for start in range(0, queue_size, block):
        n = min(block, queue_size - start)
        loss_fn.prefill(torch.randn(n, args.dim, generator=filler))

    x = torch.randn(args.rows, args.dim, generator=g).requires_grad_()
    labels = torch.randint(0, NUM_CLASSES, (args.rows,), generator=g)
    k = torch.randn(args.rows, args.dim, generator=g)

    def step():
        x.grad = None
        loss_fn(x, labels, k).backward()
        if world > 1:
            dist.barrier()

    timing = time_stable(step, warmup=args.warmup, min_samples=args.repeats, max_samples=args.repeats,
                         budget_s=float("inf"))  # a fixed count: every rank stops at the same step
    with collectives.traffic() as sent:
        step()
    loss_fn.check()
    row = {"mode": mode if world > 1 else "none", "ranks": world, "queue_size": queue_size, "dim": args.dim,
           "rows_per_rank": args.rows, "threads_per_rank": torch.get_num_threads(), "status": "ok",
           **timing.fields("ms"), "queue_mib": _queue_bytes(loss_fn.queue) / MIB,
           "sent_bytes": round(sent.bytes),
           "sent_by_collective": {kind: round(b) for kind, (_, b) in sent.by_kind.items()}, "model_bytes": model_bytes(mode, world, args.rows, args.dim)}
    del loss_fn
    return row


def _worker(rank: int, world: int, port: int, args, result_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=600))
    rows = []
    try:
        modes = args.modes if world > 1 else args.modes[:1]  # one rank: both modes are "none"
        for queue_size in args.queue_sizes:
            for mode in modes:
                row = _one_config(mode, queue_size, args, rank, world)
                if rank == 0:
                    print(f"  {row['mode']:8s} ranks={world} K={queue_size:>8d}: {row['median_ms']:9.1f} ms/step, "
                          f"{row['sent_bytes']:>9d} B sent/step, queue {row['queue_mib']:.1f} MiB/rank", flush=True)
                rows.append(row)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(result_path, "w") as f:
            json.dump(rows, f)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_world(world: int, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "rows.json")
        context = mp.start_processes(_worker, args=(world, _free_port(), args, path), nprocs=world, join=False,
                                     start_method="spawn")
        deadline = time.monotonic() + args.timeout_s
        while not context.join(timeout=5):
            if time.monotonic() > deadline:
                for p in context.processes:
                    p.kill()
                raise TimeoutError(f"{world} ranks did not finish within --timeout-s {args.timeout_s:g}")
        with open(path) as f:
            return json.load(f)


# --------------------------------------------------------------------------- report


def plot(rows: list[dict], path) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, (ax_time, ax_bytes, ax_mem) = plt.subplots(1, 3, figsize=(15, 4.2))
    for key in sorted({(r["mode"], r["ranks"]) for r in rows}, key=lambda t: (t[1], t[0])):
        sel = sorted((r for r in rows if (r["mode"], r["ranks"]) == key), key=lambda r: r["queue_size"])
        label = f"{key[0]}, {key[1]} rank{'s' if key[1] > 1 else ''}"
        ks = [r["queue_size"] for r in sel]
        style = "-o" if key[0] != "sharded" else "--s"
        ax_time.plot(ks, [r["median_ms"] for r in sel], style, label=label)
        if key[1] > 1:  # one rank sends nothing (a log axis has no 0)
            ax_bytes.plot(ks, [r["sent_bytes"] for r in sel], style, label=label)
        ax_mem.plot(ks, [r["queue_mib"] for r in sel], style, label=label)
    for ax, title in ((ax_time, "step time (ms)"), (ax_bytes, "bytes sent per step per rank"),
                      (ax_mem, "queue memory per rank (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("queue size K (slots)")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(rows: list[dict]) -> str:
    head = ["mode", "ranks", "K", "ms/step", "queue MiB/rank", "sent B/step/rank", "model B"]
    body = [[r["mode"], str(r["ranks"]), f"{r['queue_size']:,}",
             f"{r['median_ms']:.1f}" + ("" if r["stable"] else NOISY_MARK), f"{r['queue_mib']:.1f}",
             f"{r['sent_bytes']:,}", f"{r['model_bytes']:,}"] for r in rows]
    return format_table(head, body, left=1)


def projection_table(projected: list[dict]) -> str:
    memory = [k for k in projected[0] if k.startswith("queue_gib_")]
    head = ["mode", "GPUs", "MiB sent/step/GPU", "link GB/s", "comm ms/step"] + [
        f"queue GiB/GPU, {float(k.split('_')[2]):.0e} classes" for k in memory]
    body = [[r["mode"], str(r["gpus"]), f"{r['sent_mib']:.2f}", f"{r['link_gbs']:g}", f"{r['comm_ms']:.2f}"]
            + [f"{r[k]:.2f}" for k in memory] for r in projected]
    return format_table(head, body, left=1)


def main(argv=None) -> int:
    args = parse_args(argv)
    import dcq_ops  # noqa: F401 - imported here too, so that the meta block names its version
    need = max(args.queue_sizes) * (args.dim * 4 + 8) * max(args.worlds)
    free = available_ram()
    if free is not None and need > 0.8 * free:
        print(f"error: the largest gathered configuration needs about {need / GIB:.1f} GiB of queues, and "
              f"{free / GIB:.1f} GiB are available: lower --queue-sizes, --dim or --worlds", file=sys.stderr)
        return 2
    rows = []
    for world in args.worlds:
        print(f"== {world} rank{'s' if world > 1 else ''}", flush=True)
        rows += run_world(world, args)
    m = meta("scaling.py", argv, backend="gloo")
    out = args.out
    projected = projection()
    write_json(out + ".json", {"rows": rows, "nccl_projection": projected,
                               "nccl_projection_assumptions": projection.__doc__.split("Assumptions", 1)[1].strip()},
               m)
    write_csv(out + ".csv", rows, COLUMNS)
    plot(rows, out + ".png")
    print(describe(m))
    print(table(rows))
    if not all(r["stable"] for r in rows):
        print(NOISY_LEGEND)
    print("\n# projection to NCCL (the byte model above; assumptions in projection())")
    print(projection_table(projected))
    print(f"wrote {out}.json, {out}.csv, {out}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
