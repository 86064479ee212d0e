"""The compiled-code report's readers (benchmarks/sass_counts.py, benchmarks/cycle_model.py)
on small SASS texts whose counts are known by hand, and the report itself
(benchmarks/compiled.py) on small kernels: a spill fails it, ptxas's warnings and the
cubins are kept."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import cycle_model  # noqa: E402
import sass_counts  # noqa: E402

# A loop as nvdisasm -c prints it: a cp.async wait at the top, two wgmma (the first
# with both operands in shared memory, the second with A from registers), each waited
# for, two exponentials, a barrier, ptxas's @!PT padding (never executed), four
# 16-byte cp.async of the next tile and one commit at the bottom, then the back-edge.
SNIPPET = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   DEPBAR.LE SB0, 0x0 ;
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   WARPGROUP.ARRIVE ;
        /*0040*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0060*/                   MUFU.EX2 R4, R4 ;
        /*0070*/                   MUFU.EX2 R5, R5 ;
        /*0080*/                   FMUL R6, R4, R5 ;
        /*0090*/              @!PT LDS RZ, [RZ] ;
        /*00a0*/                   STS.64 [R2+0x100], R4 ;
        /*00b0*/                   WARPGROUP.ARRIVE ;
        /*00c0*/                   HGMMA.64x256x16.F32.BF16 R32, R8, gdesc[UR8].tnspB, R32, gsb0 ;
        /*00d0*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*00e0*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR60][R10.64], P1 ;
        /*00f0*/                   LDGSTS.E.BYPASS.128 [R3+0x400], desc[UR60][R12.64], P1 ;
        /*0100*/                   LDGSTS.E.BYPASS.128 [R3+0x800], desc[UR60][R14.64], P1 ;
        /*0110*/                   LDGSTS.E.BYPASS.128 [R3+0xc00], desc[UR60][R16.64], P1 ;
        /*0120*/                   LDGDEPBAR ;
        /*0130*/                   ISETP.GE.AND P0, PT, R0, R7, PT ;
        /*0140*/              @!P0 BRA `(.L_x_0) ;
        /*0150*/                   EXIT ;
.L_x_1:
        /*0160*/                   BRA `(.L_x_1);
"""


def test_loops_found_by_their_back_edge():
    found = sass_counts.loops(SNIPPET)
    # The loop .L_x_0, and the trap at the end (a branch to itself) which holds no MMA.
    assert [loop.label for loop in found] == [".L_x_0", ".L_x_1"]
    assert sass_counts.mma_loop(SNIPPET).label == ".L_x_0"
    assert sass_counts.load_loop(SNIPPET).label == ".L_x_0"


def test_sass_counts_of_one_iteration():
    c = sass_counts.count(sass_counts.mma_loop(SNIPPET).body)
    assert c["hgmma"] == 2 and c["hgmma_shapes"] == {"64x32x16": 1, "64x256x16": 1}
    assert c["hgmma_a_in_registers"] == 1
    assert c["hgmma_flops"] == 2 * 64 * 32 * 16 + 2 * 64 * 256 * 16
    # A (64x16) and B (32x16) of the first from shared memory, only B (256x16) of the second.
    assert c["hgmma_smem_bytes"] == (64 * 16 + 32 * 16) * 2 + 256 * 16 * 2
    assert (c["warpgroup_depbar"], c["warpgroup_arrive"], c["depbar_per_hgmma"]) == (2, 2, 1.0)
    assert (c["ldgsts"], c["ldgsts_bytes"], c["ldgdepbar"], c["depbar"]) == (4, 64, 1, 1)
    assert (c["mufu_ex2"], c["mufu"], c["bar_sync"], c["utmaldg"]) == (2, 2, 1, 0)
    assert c["shared_bytes"] == 8  # the STS.64; the @!PT LDS never executes
    # 19 instructions executed (the @!PT padding not counted), 2 of them HGMMA, 4 WARPGROUP.*.
    assert c["instructions"] == 19 and c["non_mma"] == 13
    where = sass_counts.positions(sass_counts.mma_loop(SNIPPET).body)
    assert where == dict(length=19, first_load=12, last_load=15, first_wait=0, outstanding_groups_allowed=0)


def test_cycle_model_of_the_snippet():
    """Every component by hand, at 8 warps (two warpgroups) and a 64 x 64 tile of D = 512."""
    hw = cycle_model.HOPPER
    r = cycle_model.cycle_model(SNIPPET, 64, 64, 512, warps=8)
    first = max(2 * 64 * 32 * 16 / 4096, (64 * 16 + 32 * 16) * 2 / 128)  # 24: shared-memory bound
    second = max(2 * 64 * 256 * 16 / 4096, 256 * 16 * 2 / 128)  # 128: tensor-core bound
    assert first == 24 and second == 128
    assert r["components"]["mma"] == 2 * (first + second)
    assert r["components"]["mma_ideal"] == 2 * 2 * 64 * 64 * 512 / 4096
    assert r["components"]["mufu"] == 2 * 256 / 16
    assert r["components"]["issue"] == 13 * 8 / 4
    tile_bytes = 64 * 512 * 2 + 64 * 8
    load = hw["l2_latency_clocks"] + tile_bytes / hw["l2_port_bytes_per_clock"]
    smem = ((64 * 16 + 32 * 16) * 2 + 256 * 16 * 2) * 2 / 128 + tile_bytes / 128 + 8 * 256 / 128
    l2 = tile_bytes / hw["l2_bytes_per_clock"]
    assert r["components"]["smem"] == round(smem) and r["components"]["l2"] == round(l2)
    # Serialized (a wait per wgmma); the last load is instruction 15 of 19 and the wait
    # instruction 0 of the next iteration: 4/19 of an iteration overlaps the load.
    assert r["serialized"]
    busy = 2 * (first + second) + max(13 * 8 / 4, 2 * 256 / 16)  # issue and MUFU overlap each other
    exposed = load - busy * (19 - 15) / 19
    assert r["components"]["exposed_load"] == round(exposed)
    assert r["clocks_per_tile"] == round(max(busy + exposed, smem, l2))
    assert r["fraction_of_peak"] == round(2048 / max(busy + exposed, smem, l2), 3)
    # The pipelined bound of the same loop: busy is the largest component alone.
    busy = max(2 * (first + second), 26, 32)
    assert r["clocks_pipelined"] == round(max(busy + load - busy * 4 / 19, smem, l2))


def test_cycle_model_pipelined_when_waits_are_few():
    """Drop the wgmma waits: no longer serialized, the model takes the pipelined bound
    (on a chip whose L2 is fast enough for the tensor cores to bound the tile)."""
    lines = [line for line in SNIPPET.splitlines() if "WARPGROUP.DEPBAR" not in line]
    fast_l2 = dict(l2_bytes_per_clock=1024, l2_port_bytes_per_clock=1024, l2_latency_clocks=0)
    # A thin tile (8 queue entries of D = 64), so that its own traffic floors stay below the MMAs.
    r = cycle_model.cycle_model("\n".join(lines), 64, 8, 64, warps=8, hardware=fast_l2)
    assert not r["serialized"] and r["counts"]["depbar_per_hgmma"] == 0
    assert r["clocks_per_tile"] == r["clocks_pipelined"] == 2 * (24 + 128) < r["clocks_serialized"]


def test_cycle_model_needs_an_mma_loop():
    with pytest.raises(ValueError, match="no loop with MMA"):
        cycle_model.cycle_model("        /*0000*/                   EXIT ;\n", 64, 64, 512)
