#!/usr/bin/env python
"""The seesaw kernel's schedule, simulated: its mbarrier protocol checked and its
clocks per tile estimated, without a GPU.

    python benchmarks/seesaw_schedule.py                      # D=512 and 256, the launch's ring depths
    python benchmarks/seesaw_schedule.py --dim 512 --stages 2,3 --softmax 1100 --latency 300,600,1000

dcq_ops/triton/hopper_seesaw_kernel.py's two consumer warpgroups are written out here step
for step (``consumer``: the same waits, arrivals, loads and wgmma groups, in the same
order, with the same phase formulas) and run against each other on a model SM:

- mbarriers with the hardware's parity rule (a wait on parity p passes while the
  barrier's current phase has the other parity), so a phase formula that lets a
  wait pass on the wrong completion, or a protocol that deadlocks, is caught: every
  wait must pass on exactly the completion it stands for (``ProtocolError``);
- one tensor-core queue shared by both warpgroups, in issue order: the S GEMM
  (``m64n64k16``, D/16 of them, 32 clocks each) and each half of P W
  (``m64n{D/2}k16``, 4 of them); wgmma groups complete in order;
- the non-MMA instructions of an iteration (the softmax and its bookkeeping, read
  from the SASS: ``--softmax``) issued at one instruction a clock per warp, halved
  while both warpgroups issue at once (they share the four schedulers);
- TMA loads: L2 latency plus the tile's bytes at one SM's fill rate, one after
  another on that port (cycle_model.HOPPER's assumptions).

The steady-state clocks per tile (the last half of the tiles) then give the fraction of
the bf16 peak: the ideal is the tensor cores busy all the time (2 x 64 x 64 x D x 2
FLOPs a tile). What the simulation leaves out: issue latencies and dependent-
instruction stalls, shared-memory bank conflicts, the merge kernel, other CTAs.
Compile-only like the rest: a GPU measures it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field

from pathlib import Path

from cycle_model import HOPPER

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dcq_ops.triton.hopper_seesaw import halves as halves_of  # noqa: E402  (the kernel's rule itself)

BLOCK_M = BLOCK_K = 64
# The consumers' orders: "kernel", the kernel's ("split" where a tile arrives in two
# halves of D, else "seesaw"); "seesaw", S_t in one chain issued before P_{t-1} W_{t-1},
# so it runs under the other consumer's softmax; "split", S_t in two halves around
# P_{t-1} W_{t-1}, which releases tile t - 1 under S_t's second half; "release-first",
# an alternative not built (P_{t-1} W_{t-1} first, tile t - 1 released under S_t).
ORDERS = ("kernel", "seesaw", "split", "release-first")
# Who loads tile t + STAGES into tile t's buffer: "other", the kernel's (the consumer that
# does not own tile t, once the owner has released it); "owner", the kernel's protocol
# before (the owner, once the other consumer has released it: the owner then waits for
# the other's P_t W_t before its own next tile).
LOADERS = ("other", "owner")


class ProtocolError(RuntimeError):
    """The simulated protocol deadlocked, or a wait passed on another completion than its own."""


@dataclass
class Barrier:
    """An mbarrier: ``completions`` so far and when each happened."""

    name: str
    completions: list = field(default_factory=list)

    def passes(self, parity: int, wanted: int, now: float) -> bool:
        """Whether a wait on ``parity`` passes now (the hardware's rule), checked against
        the completion ``wanted`` (0-based) it stands for."""
        done = sum(1 for c in self.completions if c <= now)
        passed = (done & 1) != parity
        if passed and done != wanted + 1:
            raise ProtocolError(f"a wait on {self.name} (parity {parity}) for completion {wanted} passed after "
                                f"{done} completions")
        return passed


@dataclass
class Machine:
    """The SM's shared resources: the tensor-core queue and the L2 port."""

    hw: dict
    tensor_free: float = 0.0
    port_free: float = 0.0
    tensor_busy: float = 0.0

    def mma(self, now: float, clocks: float) -> float:
        start = max(now, self.tensor_free)
        self.tensor_free = start + clocks
        self.tensor_busy += clocks
        return self.tensor_free

    def load(self, now: float, nbytes: int) -> float:
        start = max(now, self.port_free)
        self.port_free = start + nbytes / self.hw["l2_port_bytes_per_clock"]
        return self.port_free + self.hw["l2_latency_clocks"]


def consumer(parity: int, tiles: int, stages: int, softmax: float, s_clocks: float, pw_clocks: float,
             order: str = "kernel", loader: str = "other"):
    """Consumer warpgroup ``parity``'s program, as hopper_seesaw_kernel._consumer runs it with
    the gradient (``order`` "kernel", ``loader`` "other"): a sequence of steps (kind,
    arguments). A wait is (barrier, index, the parity the kernel waits on, the
    completion it stands for); the parities are the kernel's formulas. The ready
    barrier of half h of buffer b is ready[h * stages + b]."""
    other = 1 - parity
    halves = halves_of(stages)
    if order == "kernel":
        order = "split" if halves == 2 else "seesaw"

    def wait_tile(t, half):
        yield ("wait", "ready", half * stages + t % stages, (t // stages) & 1, t // stages)

    def wait_whole_tile(t):
        for half in range(halves):
            yield from wait_tile(t, half)

    def own_tile_end(t):
        yield ("mma", pw_clocks)
        yield ("wait_mma",)
        if loader == "owner" and t + stages < tiles:
            yield ("wait", "released", t % stages, (t // stages) & 1, t // stages)
            yield ("load", t + stages)
        elif loader == "other":
            yield ("arrive", "released", t % stages, t)

    def release(t):
        """The other consumer's tile t done here (its P W waited for)."""
        if loader == "owner":
            yield ("arrive", "released", t % stages, t)
        elif t + stages < tiles:
            yield ("wait", "released", t % stages, (t // stages) & 1, t // stages)
            yield ("load", t + stages)

    if parity == 0:
        yield from wait_whole_tile(0)
        yield ("mma", s_clocks)
        yield ("wait_mma",)
        yield ("issue", softmax)
        yield ("arrive", "handoff", 0, 0)
        yield from own_tile_end(0)
    own_tiles = (tiles - parity + 1) // 2
    for j in range(1 - parity, own_tiles):
        t = 2 * j + parity
        if order == "seesaw":
            yield from wait_whole_tile(t)
            yield ("mma", s_clocks)
            yield ("wait", "handoff", other, (j - 1 + parity) & 1, (t - 1 - other) // 2)
            yield ("mma", pw_clocks)
            yield ("wait_mma",)
            yield from release(t - 1)
        elif order == "split":
            yield from wait_tile(t, 0)
            yield ("mma", s_clocks / 2)
            yield ("wait", "handoff", other, (j - 1 + parity) & 1, (t - 1 - other) // 2)
            yield ("mma", pw_clocks)
            yield from wait_tile(t, halves - 1)
            yield ("mma", s_clocks / 2)
            yield ("wait_mma_but_last",)
            yield from release(t - 1)
            yield ("wait_mma",)
        else:  # "release-first": P_{t-1} W_{t-1} before S_t, tile t - 1 released under S_t
            yield ("wait", "handoff", other, (j - 1 + parity) & 1, (t - 1 - other) // 2)
            yield ("mma", pw_clocks)
            yield from wait_whole_tile(t)
            yield ("mma", s_clocks)
            yield ("wait_mma_but_last",)
            yield from release(t - 1)
            yield ("wait_mma",)
        yield ("issue", softmax)
        yield ("arrive", "handoff", parity, t)
        yield from own_tile_end(t)
    if (tiles - 1) % 2 == other:
        yield ("wait", "handoff", other, ((tiles - 1) // 2) & 1, (tiles - 1 - other) // 2)
        yield ("mma", pw_clocks)
        yield ("wait_mma",)


def simulate(tiles: int, stages: int, dim: int = 512, softmax: float = 1100.0, hardware: dict | None = None,
             element_bytes: int = 2, order: str = "kernel", loader: str = "other") -> dict:
    """Run both consumers over ``tiles`` tiles with a ring of ``stages`` buffers.

    Returns
    -------
    dict
        ``clocks`` (to the last step), ``clocks_per_tile`` (steady state: the second
        half of the tiles, from the hand-overs' times), ``fraction_of_peak`` (the ideal
        tensor-core clocks a tile over that), ``tensor_idle`` (fraction of the steady
        state the tensor cores wait) and ``load_waits`` (clocks the consumers spent
        waiting for tiles to arrive).

    Raises
    ------
    ProtocolError
        A deadlock, or a wait that passed on another completion than its own.
    """
    hw = dict(HOPPER, **(hardware or {}))
    if tiles < 1 or stages < 2 or order not in ORDERS or loader not in LOADERS:
        raise ValueError(f"tiles must be at least 1, stages at least 2, order one of {ORDERS} and loader one of "
                         f"{LOADERS}, got {tiles}, {stages}, {order!r} and {loader!r}")
    flops = hw["mma_flops_per_clock"]
    s_clocks = (dim // 16) * 2 * BLOCK_M * BLOCK_K * 16 / flops
    pw_clocks = (BLOCK_K // 16) * 2 * BLOCK_M * (dim // 2) * 16 / flops
    tile_bytes = BLOCK_K * dim * element_bytes
    machine = Machine(hw)
    halves = halves_of(stages)
    barriers = {(name, i): Barrier(f"{name}[{i}]") for name in ("ready", "released", "handoff")
                for i in range(2 * max(stages, 2))}

    def load(now: float, t: int) -> None:
        """Tile t's TMA copies, each half of D completing on its own barrier."""
        for half in range(halves):
            barriers[("ready", half * stages + t % stages)].completions.append(machine.load(now, tile_bytes // halves))

    handoff_times: dict = {}
    for t in range(min(stages, tiles)):  # the prologue's loads, before the fork
        load(0.0, t)
    programs = [consumer(p, tiles, stages, softmax, s_clocks, pw_clocks, order, loader) for p in (0, 1)]
    step = [next(p, None) for p in programs]
    pending = [0.0, 0.0]   # completion of the last wgmma group each issued
    previous = [0.0, 0.0]  # and of the one before
    issue_left = [0.0, 0.0]
    load_waits = [0.0, 0.0]
    now = 0.0
    while any(s is not None for s in step):
        for p in (0, 1):
            while step[p] is not None:
                kind = step[p][0]
                if kind == "issue":
                    if issue_left[p] == 0.0:
                        issue_left[p] = step[p][1]
                    break  # advanced below, with the time
                if kind == "wait":
                    _, name, index, parity, wanted = step[p]
                    if not barriers[(name, index)].passes(parity, wanted, now):
                        break
                elif kind == "wait_mma":
                    if pending[p] > now:
                        break
                elif kind == "wait_mma_but_last":
                    if previous[p] > now:
                        break
                elif kind == "mma":
                    previous[p] = pending[p]
                    pending[p] = machine.mma(now, step[p][1])
                elif kind == "arrive":
                    _, name, index, tile = step[p]
                    barriers[(name, index)].completions.append(now)
                    if name == "handoff":
                        handoff_times[tile] = now
                elif kind == "load":
                    load(now, step[p][1])
                step[p] = next(programs[p], None)
        # Jump to the next event: a barrier completion, a wgmma group's end, or the end of
        # an issue step (the warpgroups issuing at once share the schedulers evenly).
        issuing = [p for p in (0, 1) if step[p] is not None and step[p][0] == "issue"]
        waits = [(pending if step[p][0] == "wait_mma" else previous)[p] for p in (0, 1)
                 if step[p] is not None and step[p][0] in ("wait_mma", "wait_mma_but_last")]
        times = [c for b in barriers.values() for c in b.completions if c > now] + [w for w in waits if w > now]
        times += [now + issue_left[p] * len(issuing) for p in issuing]
        if not times:
            if any(s is not None for s in step):
                raise ProtocolError(f"deadlock at clock {now:.0f}: consumer steps {step}")
            break
        later = min(times)
        for p in (0, 1):  # blocked on a tile that has not arrived
            if step[p] is not None and step[p][:2] == ("wait", "ready"):
                load_waits[p] += later - now
        for p in issuing:
            issue_left[p] -= (later - now) / len(issuing)
            if issue_left[p] <= 1e-9:
                issue_left[p] = 0.0
                step[p] = next(programs[p], None)
        now = later
    clocks = max(now, machine.tensor_free)
    first = tiles // 2
    if tiles >= 8:
        per_tile = (handoff_times[tiles - 1] - handoff_times[first]) / (tiles - 1 - first)
    else:
        per_tile = clocks / tiles
    ideal = s_clocks + 2 * pw_clocks
    return dict(tiles=tiles, stages=stages, dim=dim, softmax=softmax, latency=hw["l2_latency_clocks"],
                clocks=round(clocks), clocks_per_tile=round(per_tile), ideal_per_tile=round(ideal),
                fraction_of_peak=round(ideal / per_tile, 3), tensor_idle=round(1 - ideal / per_tile, 3),
                tensor_busy=round(machine.tensor_busy),
                load_waits=[round(w) for w in load_waits])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dim", default="512,256", help="padded D values (comma-separated)")
    parser.add_argument("--stages", default="", help="ring depths (default: the launch's, hopper_seesaw.stages)")
    parser.add_argument("--softmax", default="1100", help="non-MMA instructions of one consumer iteration")
    parser.add_argument("--latency", default="300,600,1000", help="L2 latencies in clocks")
    parser.add_argument("--tiles", type=int, default=64)
    parser.add_argument("--order", choices=ORDERS, default="kernel",
                        help="the consumers' order (see ORDERS): the kernel's by default")
    parser.add_argument("--loader", choices=LOADERS, default="other",
                        help="who loads the next tile into a released buffer: the kernel's rule, or the owner")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    args = parser.parse_args(argv)
    try:
        dims = [int(d) for d in args.dim.split(",")]
        stage_list = [int(s) for s in args.stages.split(",")] if args.stages else None
        softmaxes = [float(s) for s in args.softmax.split(",")]
        latencies = [int(x) for x in args.latency.split(",")]
        if args.tiles < 8 or any(d < 32 or d % 32 for d in dims) or any(s < 2 for s in stage_list or [2]) or \
                any(x < 0 for x in latencies + softmaxes):
            raise ValueError("need --tiles >= 8, D a multiple of 32, stages >= 2, non-negative clocks")
    except ValueError as exc:
        parser.print_usage(sys.stderr)
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    if stage_list is None:
        from dcq_ops.triton import hopper_seesaw
    results = []
    for dim in dims:
        for stages in stage_list or [hopper_seesaw.stages(dim)]:
            for softmax in softmaxes:
                for latency in latencies:
                    results.append(simulate(args.tiles, stages, dim, softmax, dict(l2_latency_clocks=latency),
                                            order=args.order, loader=args.loader))
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    for r in results:
        print(f"D={r['dim']} stages {r['stages']} softmax {r['softmax']:.0f} latency {r['latency']}: "
              f"{r['clocks_per_tile']} clocks a tile (ideal {r['ideal_per_tile']}), {r['fraction_of_peak']:.0%} of "
              f"peak; waits for tiles {r['load_waits']} clocks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
