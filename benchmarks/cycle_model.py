"""A per-tile cycle model of a Hopper queue-pass kernel, read from its SASS.

Entry points:

    cycle_model(sass, tile_m, tile_n, dim, warps=8, ...) -> dict
    python benchmarks/cycle_model.py KERNEL.cubin --tile 64x64 --dim 512 --warps 8   # prints the dict as JSON

``sass`` is the kernel's disassembly (sass_counts.disassemble(cubin)); one tile is
tile_m rows x tile_n queue entries, both GEMMs over ``dim`` (the loss's
q W^T and P W). The model finds the loop that holds the MMAs (by its back-edge
branch), counts what one iteration issues (sass_counts.count) and turns the counts
into clocks of one SM, per tile:

- ``mma``: each HGMMA at the tensor cores' rate, or at the shared-memory rate of
  the operands it reads from shared memory, whichever is slower; times the
  warpgroups that run the loop (they share the SM's four tensor cores); each
  mma.sync (HMMA, per warp) at the tensor cores' rate (optimistic);
- ``mufu``: MUFU instructions (exponentials) of every thread at the SFUs' rate;
- ``issue``: the non-MMA instructions of every warp over the four schedulers;
- ``exposed_load``: the part of a tile's load (L2 latency + its bytes at one SM's
  L2 fill rate) that the work between its issue and its wait does not
  cover, read from where the loads and their wait sit in the loop (and, for
  cp.async, how many groups the wait lets stay in flight);
- floors that only matter once everything overlaps: ``smem`` (all shared-memory
  traffic at 128 B/clock) and ``l2`` (the tile's bytes at the L2 share).

Overlap: when the loop waits on (nearly) every wgmma it issues (``WARPGROUP.DEPBAR``
more than a quarter of ``HGMMA``), the tensor cores wait for the softmax and the
softmax for the tensor cores: busy = mma + max(issue, mufu). So it is too when the
loop issues no exponential while one of its own wgmma groups is in flight
(sass_counts.exponentials_under_mma; ``softmax_under_mma``): its warps run the
softmax between the GEMMs, and no other warps run MMAs meanwhile (the loop's
warpgroups move in step). Otherwise the model takes the pipelined
busy = max(mma, issue, mufu). A tile then costs
max(busy + exposed load, smem, l2); both bounds are reported, ``clocks_per_tile``
is the one the structure says.

Warp-specialized consumers that take the tiles in turn (``interleave``, the seesaw
of dcq_ops/triton/hopper_seesaw_kernel.py): the model reads one consumer's innermost MMA
loop (one tile an iteration, ``warps`` its own) for the counts, but how the two
consumers' GEMMs, softmax and loads overlap is not in one loop's SASS: the clocks
a tile come from benchmarks/seesaw_schedule.py, which runs the kernel's protocol
step for step on these rates with the loop's non-MMA instructions as each
iteration's issue work (``clocks_pipelined``; the serialized bound beside it).

The hardware numbers are in HOPPER with their sources; anything not published is
marked an assumption there. The model ranks kernels and tells where the clocks go;
only a GPU measures them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sass_counts import (count, disassemble, exponentials_under_mma, hgmma_shape, instructions, load_loop, loops,
                         mma_loop, positions)

# H100 SXM5 (132 SMs); peak rates per SM and clock.
HOPPER = dict(
    name="H100 SXM5",
    sms=132,
    clock_ghz=1.83,  # the boost clock NVIDIA's peak figures are quoted at (H100 whitepaper)
    # 989.4 TFLOP/s dense bf16/fp16 = 132 SMs x 1.83 GHz x 4096: 1024 FLOP/clock per tensor core, 4 per SM.
    mma_flops_per_clock=4096,
    # 32 banks x 4 B (CUDA C++ Programming Guide, shared memory of compute capability 9.0).
    smem_bytes_per_clock=128,
    # exp2 and the other MUFU functions: 16 results/clock/SM for compute capability 9.0
    # (CUDA C++ Programming Guide, "Arithmetic Instructions", throughput table).
    mufu_per_clock=16,
    # 4 warp schedulers per SM, one instruction per clock each (H100 whitepaper, SM diagram).
    schedulers=4,
    # ASSUMPTIONS (not published by NVIDIA): the SM's share of L2 bandwidth when every SM
    # reads at once (32 B/clock = 7.7 TB/s over 132 SMs at 1.83 GHz; chips-and-cheese
    # measured about 5.5 TB/s on the 114-SM H100 PCIe, 27.5 B/clock/SM): the floor of a
    # kernel whose loads all overlap; the rate at which one SM fills a tile while the
    # others compute (64 B/clock, one L2 port), and the latency of an L2 hit under load
    # (unloaded about 260-300 clocks in microbenchmarks): the time of one exposed load.
    l2_bytes_per_clock=32,
    l2_port_bytes_per_clock=64,
    l2_latency_clocks=600,
)

# The problem the fractions of peak are quoted at (benchmarks/NOTES.md).
BENCHMARK_SHAPE = dict(rows=4096, queue_size=2**20, dim=512)


def _clocks_of_instructions(instructions: int, warps: int, hw: dict) -> float:
    return instructions * warps / hw["schedulers"]


def cycle_model(sass: str, tile_m: int, tile_n: int, dim: int, warps: int = 8, *, mma_warpgroups: int | None = None,
                tiles_per_iteration: float = 1, num_stages: int = 2, element_bytes: int = 2, label_bytes: int = 8,
                gemms: int = 2, interleave: int = 1, hardware: dict | None = None) -> dict:
    """The estimated clocks of one SM per tile_m x tile_n tile, broken down (see the
    module docstring), and the fraction of the bf16 peak they give.

    Parameters
    ----------
    sass : str
        The kernel's SASS (``nvdisasm -c``).
    tile_m, tile_n, dim : int
        Rows and queue entries of a tile, and the GEMMs' depth D.
    warps : int
        Warps that run the MMA loop (issue slots and exponentials are theirs).
    mma_warpgroups : int, optional
        Warpgroups that issue the loop's HGMMAs (default warps // 4).
    tiles_per_iteration : float
        Tiles one iteration of the MMA loop completes (1 for one tile a trip).
    num_stages : int
        Depth of the load ring; used when the loads are issued by other warps (a
        producer) or by TMA in the MMA loop: the load of a tile is then in flight
        for num_stages - 1 iterations.
    element_bytes, label_bytes : int
        Bytes of one queue element and of one queue label (the tile's load).
    gemms : int
        GEMMs per tile in the ideal (2 with the gradient, 1 without).
    interleave : int
        Warpgroups that take the tiles in turn, each running its own copy of the
        MMA loop on its own tiles (2 for the seesaw, dcq_ops.triton.hopper_seesaw;
        ``warps`` is then one copy's). The loop read is the innermost one with the
        most MMA instructions (not the dispatch loop of the warp-specialized
        partitions around the copies); the clocks a tile come from
        benchmarks/seesaw_schedule.py's run of the protocol (2 consumers, the
        gradient, 64 x 64 tiles, ``num_stages`` buffers), which decides how the
        loads and the consumers' work overlap.
    hardware : dict, optional
        Rates as in HOPPER (the default).

    Returns
    -------
    dict
        ``counts`` (per thread per iteration, sass_counts.count), ``components``
        (clocks per tile: mma, mma_ideal, mufu, issue, exposed_load, smem, l2),
        ``serialized`` (bool: the MMAs and the softmax do not overlap, see the module
        docstring), ``softmax_under_mma`` (exponentials issued with a wgmma in
        flight, per iteration), ``clocks_serialized``, ``clocks_pipelined``,
        ``clocks_per_tile``, ``fraction_of_peak`` (ideal MMA clocks / clocks per tile),
        ``ms_at_benchmark`` (N=4096, K=2^20, D=512 at that fraction), ``assumptions``.
    """
    hw = dict(HOPPER, **(hardware or {}))
    loop = _innermost_mma_loop(sass) if interleave > 1 else mma_loop(sass)
    if loop is None:
        raise ValueError("no loop with MMA instructions in this SASS")
    c = count(loop.body)
    warpgroups = mma_warpgroups if mma_warpgroups is not None else max(1, warps // 4)
    threads = 32 * warps
    per_tile = 1.0 / tiles_per_iteration

    # Tensor cores: each HGMMA at the slower of its FLOPs and its shared-memory operands.
    mma = 0.0
    for ins in instructions(loop.body):
        shape = hgmma_shape(ins)
        if shape:
            mma += max(shape["flops"] / hw["mma_flops_per_clock"], shape["smem_bytes"] / hw["smem_bytes_per_clock"])
    mma *= warpgroups
    # mma.sync (HMMA, one per warp, operands in registers): at the tensor cores' rate, an
    # optimistic assumption (Hopper runs it below wgmma's peak); it needs no wgmma waits.
    mma += c["hmma_flops"] * warps / hw["mma_flops_per_clock"]
    ideal = gemms * 2 * tile_m * tile_n * dim / hw["mma_flops_per_clock"]
    mufu = c["mufu"] * threads / hw["mufu_per_clock"]
    issue = _clocks_of_instructions(c["non_mma"], warps, hw)

    # Per iteration: the tiles it loads, and the floors of all its shared-memory and L2 traffic.
    tile_bytes = tile_n * dim * element_bytes + tile_n * label_bytes
    load_time = hw["l2_latency_clocks"] + tiles_per_iteration * tile_bytes / hw["l2_port_bytes_per_clock"]
    smem = (c["hgmma_smem_bytes"] * warpgroups + tiles_per_iteration * tile_bytes
            + c["shared_bytes"] * threads) / hw["smem_bytes_per_clock"]
    l2 = tiles_per_iteration * tile_bytes / hw["l2_bytes_per_clock"]

    # How many iterations of work lie between a load's issue and its wait.
    loads = None if interleave > 1 else load_loop(sass)
    if interleave > 1:
        ahead, structure = 0.0, ""  # the schedule simulation below decides
    elif loads is None:
        ahead, structure = 0.0, "no asynchronous tile load in a loop"
    elif loads.start != loop.start:
        ahead = num_stages - 1
        structure = f"loads in another loop (a producer): {ahead} iteration(s) ahead"
    else:
        where = positions(loop.body)
        if where["outstanding_groups_allowed"] is not None:
            groups = max(1, c["ldgdepbar"])
            distance = 1 + where["outstanding_groups_allowed"] // groups
            structure = (f"cp.async: {c['ldgsts']} LDGSTS and {groups} commit group(s) an iteration, the wait "
                         f"allows {where['outstanding_groups_allowed']} outstanding: consumed {distance} "
                         "iteration(s) after issue")
        else:
            distance = max(1, num_stages - 1)
            structure = f"TMA in the MMA loop: consumed {distance} iteration(s) after issue (num_stages - 1)"
        if where["first_wait"] is None:
            ahead = distance
            structure += "; no wait found in the loop"
        else:
            # The part of an iteration between the last load's issue and the first wait.
            span = where["length"]
            after_issue = where["first_wait"] - where["last_load"]
            if after_issue < 0:  # the wait at the top, the loads later: it waits on the previous iteration's
                after_issue += span
            ahead = distance - 1 + after_issue / span
            structure += (f"; the last load is instruction {where['last_load']} of {span}, the wait instruction "
                          f"{where['first_wait']}")

    def per_tile_clocks(busy: float) -> tuple[float, float]:
        """(clocks, exposed load) per tile for an iteration busy this long without its loads."""
        exposed = max(0.0, load_time - ahead * busy)
        return max(busy + exposed, smem, l2) * per_tile, exposed * per_tile

    softmax_under_mma = exponentials_under_mma(loop.body)
    serialized = c["hgmma"] > 0 and (c["warpgroup_depbar"] > c["hgmma"] / 4
                                     or (interleave == 1 and c["mufu_ex2"] > 0 and softmax_under_mma == 0))
    serial, exposed_serial = per_tile_clocks(mma + max(issue, mufu))
    pipelined, exposed_pipelined = per_tile_clocks(max(mma, issue, mufu))
    if interleave > 1:
        if (interleave, gemms, tile_m, tile_n) != (2, 2, 64, 64):
            raise ValueError(f"the schedule of consumers taking the tiles in turn is simulated for 2 consumers with "
                             f"the gradient on 64 x 64 tiles, got interleave={interleave}, gemms={gemms}, tile "
                             f"{tile_m} x {tile_n}")
        from seesaw_schedule import simulate  # benchmarks/seesaw_schedule.py

        run = simulate(64, num_stages, dim, softmax=max(issue, mufu), hardware=hw, element_bytes=element_bytes)
        pipelined = max(run["clocks_per_tile"], smem, l2)
        # Here "exposed" is what the schedule adds to its busiest resource: the loads
        # that show and the chain through the hand-over.
        exposed_pipelined = max(0.0, pipelined - max(mma, issue, mufu, smem, l2))
        structure = (f"{interleave} consumer warpgroups take the tiles in turn, a ring of {num_stages} buffers: "
                     f"benchmarks/seesaw_schedule.py gives {run['clocks_per_tile']} clocks a tile with "
                     f"{max(issue, mufu):.0f} issue clocks an iteration; exposed_load is what the schedule adds "
                     "to the busiest resource (loads that show, the chain through the hand-over)")
    clocks, exposed = (serial, exposed_serial) if serialized else (pipelined, exposed_pipelined)
    components = dict(mma=round(mma * per_tile), mma_ideal=round(ideal), mufu=round(mufu * per_tile),
                      issue=round(issue * per_tile), exposed_load=round(exposed), smem=round(smem * per_tile),
                      l2=round(l2 * per_tile), load_time=round(load_time * per_tile))
    fraction = ideal / clocks
    shape = BENCHMARK_SHAPE
    flops = gemms * 2 * shape["rows"] * shape["queue_size"] * shape["dim"]
    peak = hw["sms"] * hw["clock_ghz"] * 1e9 * hw["mma_flops_per_clock"]
    return dict(
        tile=f"{tile_m}x{tile_n}", dim=dim, warps=warps, mma_warpgroups=warpgroups,
        counts=c, load_structure=structure, components=components, serialized=serialized,
        softmax_under_mma=softmax_under_mma,
        clocks_serialized=round(serial), clocks_pipelined=round(pipelined), clocks_per_tile=round(clocks),
        fraction_of_peak=round(fraction, 3),
        ms_at_benchmark=round(flops / (peak * fraction) * 1e3, 2),
        mma_flops_over_ideal=round((c["hgmma_flops"] * warpgroups + c["hmma_flops"] * warps) * per_tile
                                   / (ideal * hw["mma_flops_per_clock"]), 3),
        exponentials_per_logit=round(c["mufu_ex2"] * threads * per_tile / (tile_m * tile_n), 3),
        assumptions=(f"{hw['name']}: {hw['mma_flops_per_clock']} MMA FLOP/clock/SM, {hw['smem_bytes_per_clock']} B/"
                     f"clock shared memory, {hw['mufu_per_clock']} MUFU/clock, {hw['schedulers']} schedulers; "
                     f"assumed L2 {hw['l2_bytes_per_clock']} B/clock/SM shared, {hw['l2_port_bytes_per_clock']} B/clock "
                     f"for one SM's tile, {hw['l2_latency_clocks']} clocks latency; one CTA per SM; merge kernel and wave tails not counted"),
    )


def _innermost_mma_loop(sass: str):
    """The loop with the most MMA instructions among those that hold no other loop."""
    found = loops(sass)
    inner = [lp for lp in found if not any(o is not lp and lp.start <= o.start and o.end <= lp.end for o in found)]
    candidates = [(count(lp.body)["hgmma"] + count(lp.body)["hmma"], lp) for lp in inner]
    candidates = [c for c in candidates if c[0] > 0]
    return max(candidates, key=lambda c: c[0])[1] if candidates else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="per-tile cycle model of a Hopper kernel, read from its cubin")
    parser.add_argument("cubin", type=Path)
    parser.add_argument("--tile", default="64x64", help="tile_m x tile_n")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--warps", type=int, default=8, help="warps that run the MMA loop")
    parser.add_argument("--mma-warpgroups", type=int, default=None)
    parser.add_argument("--tiles-per-iteration", type=float, default=1)
    parser.add_argument("--num-stages", type=int, default=2)
    parser.add_argument("--interleave", type=int, default=1, help="warpgroups taking the tiles in turn (seesaw: 2)")
    args = parser.parse_args(argv)
    try:
        tile_m, tile_n = (int(v) for v in args.tile.lower().split("x"))
    except ValueError:
        parser.error(f"--tile must be MxN, e.g. 64x64, got {args.tile!r}")
    result = cycle_model(disassemble(args.cubin.read_bytes()), tile_m, tile_n, args.dim, args.warps,
                         mma_warpgroups=args.mma_warpgroups, tiles_per_iteration=args.tiles_per_iteration,
                         num_stages=args.num_stages, interleave=args.interleave)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
