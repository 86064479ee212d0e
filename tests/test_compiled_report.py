"""The compiled-code report's readers (benchmarks/sass_counts.py, benchmarks/cycle_model.py)
on small SASS texts whose counts are known by hand, and the report itself
(benchmarks/compiled.py) on small kernels: a spill fails it, ptxas's warnings and the
cubins are kept."""

from __future__ import annotations

import re
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


def test_mma_sync_counted_per_warp():
    """mma.sync loops (sm_90's thin configurations): each HMMA is one warp's m16n8k16 (or
    m16n8k8 for TF32), counted at the tensor cores' rate for every warp."""
    loop = """.L_x_7:
        /*0000*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0010*/                   HMMA.1688.F32.TF32 R16, R20, R22, R16 ;
        /*0020*/                   FADD R0, R0, 1 ;
        /*0030*/              @!P0 BRA `(.L_x_7) ;
"""
    c = sass_counts.count(sass_counts.mma_loop(loop).body)
    assert (c["hmma"], c["hmma_flops"], c["hgmma"], c["non_mma"]) == (2, 2 * 16 * 8 * 16 + 2 * 16 * 8 * 8, 0, 2)
    r = cycle_model.cycle_model(loop, 16, 8, 16, warps=4)
    assert r["components"]["mma"] == round(c["hmma_flops"] * 4 / 4096)
    assert not r["serialized"]


def test_cycle_model_needs_an_mma_loop():
    with pytest.raises(ValueError, match="no loop with MMA"):
        cycle_model.cycle_model("        /*0000*/                   EXIT ;\n", 64, 64, 512)


# ----------------------------------------------------------------------------
# The report, on the sm_90 bf16 default (compiled as a GPU run would; no GPU needed)


def _run_report(tmp_path, patch: str, *args, gluon: bool = False):
    """benchmarks/compiled.py's main in a fresh process (this one may hold Triton in
    interpreter mode, which cannot compile), after ``patch`` (Python source run with the
    module imported as ``compiled``), on the sm_90 bf16 default's queue pass and repair,
    or (``gluon``) on the kernels compiled.py adds to the report itself (EXTRA_KERNELS:
    the Gluon sm_90 queue passes) only."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    import os
    import subprocess

    root = BENCHMARKS.parent
    out = tmp_path / "compiled.json"
    script = tmp_path / "report.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(BENCHMARKS)!r}, {str(root)!r}]\n"
        "import compiled, kernel_variants\n"
        + ("compiled.KERNELS = []\n" if gluon else
           "compiled.KERNELS, compiled.EXTRA_KERNELS = [kernel_variants.queue_pass_variants], []\n") +
        f"{patch}\n"
        f"sys.exit(compiled.main(['--targets', '90', '--dtypes', 'bf16', '--first-only', '--out', {str(out)!r}]"
        f" + {list(args)!r}))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=900)
    import json
    report = json.loads(out.read_text()) if out.exists() else None
    return run, report


def _entries(report):
    (version_report,) = report["reports"].values()
    return version_report["entries"]


def test_report_fails_on_a_spill_of_the_repair_kernel(tmp_path):
    """The repair kernel at the queue pass's own tiles (as launched before
    launch.repair_tile: 64 x 64, 8 warps, 2 stages on sm_90) spills, and the report exits 1 on it."""
    run, report = _run_report(tmp_path, "compiled.launch.repair_tile = lambda tile, fma=False: tile")
    assert run.returncode == 1, run.stdout + run.stderr
    repairs = [e for e in _entries(report) if e["kernel"] == "repair"]
    assert len(repairs) == 2 and {e["filter"] for e in repairs} == {False, True}
    assert all(e["spill_bytes"] > 0 and not e["ok"] for e in repairs), repairs
    assert all(e["ok"] for e in _entries(report) if e["kernel"] == "queue_pass")


def test_report_keeps_ptxas_warnings_cubins_and_the_cycle_model(tmp_path):
    """Every variant of the sm_90 bf16 default compiles without a spill (the repair at
    launch.repair_tile's tiles); ptxas's C7515 advisory on the queue pass with the
    gradient is recorded; --cubins writes each kernel's cubin, named by target, kernel,
    dtype and configuration, and its entry holds the path; the cycle model is applied;
    with --specializations every launch of kernel_variants.LAUNCHES compiles one of these
    kernels (the entries name them), so none is added."""
    cubins = tmp_path / "cubins"
    run, report = _run_report(tmp_path, "", "--cubins", str(cubins), "--specializations")
    assert run.returncode == 0, run.stdout + run.stderr
    entries = _entries(report)
    kinds = sorted((e["kernel"], e["gradient"], e["filter"], e.get("specialization", "")) for e in entries)
    assert kinds == sorted([("queue_pass", g, f, "") for g in (True, False) for f in (True, False)]
                           + [("repair", True, f, "") for f in (True, False)])
    # (kernel_variants is not imported here: it takes Triton out of interpreter mode.)
    every = entries[0]["launches"]
    assert every[0] == "sizes multiples of 16" and len(every) == 6, every  # LAUNCHES: the sizes and 5 others
    assert all(e["launches"] == every for e in entries), [e["launches"] for e in entries]
    names = set()
    for e in entries:
        assert e["ok"] and e["spill_bytes"] == 0, e
        assert isinstance(e["ptxas_warnings"], list)
        path = Path(e["cubin"])
        assert path.parent == cubins and path.read_bytes()[:4] == b"\x7fELF", e
        assert path.name.startswith(f"sm_90_{e['kernel']}_bf16_m{e['BLOCK_M']}k{e['BLOCK_K']}w{e['num_warps']}")
        names.add(path.name)
    assert len(names) == len(entries)  # one file each
    with_grad = [e for e in entries if e["kernel"] == "queue_pass" and e["gradient"] and "specialization" not in e]
    for e in with_grad:
        assert any("C7515" in w for w in e["ptxas_warnings"]), e["ptxas_warnings"]
        assert e["sass_loop"]["hgmma"] == 36 and e["sass_loop"]["mufu_ex2"] == 18, e["sass_loop"]
        model = e["cycle_model"]
        assert model["serialized"] and 0 < model["fraction_of_peak"] < 1
        assert model["components"]["mma_ideal"] == 2048
    # The cubin is the kernel the report measured: its SASS gives the entry's counts again.
    e = with_grad[0]
    sass = sass_counts.disassemble(Path(e["cubin"]).read_bytes())
    assert sass_counts.count(sass_counts.mma_loop(sass).body)["hgmma"] == e["sass_loop"]["hgmma"]


def test_report_holds_the_seesaw_read_from_a_consumer_loop(tmp_path):
    """The seesaw sm_90 kernel (dcq_ops/triton/hopper_seesaw_kernel.py, the ranked chain's
    first) is in the report beside the pipelined one, bf16 with and without the
    gradient: no spill, the ideal work (FLOPs / ideal 1.0, at most 1.125 exponentials a
    logit) read per iteration of consumer 0's own loop, not of the dispatch loop around
    both consumers (which sass_counts.mma_loop picks: 44 HGMMA with the gradient), the
    same loop hopper_sass.report_seesaw reads (40 HGMMA with the gradient at D=512);
    in each consumer loop at most one wgmma wait per four HGMMA and TMA loads; the
    cycle model with the consumers taking the tiles in turn; its cubins next to the
    pipelined kernel's, under names of their own."""
    cubins = tmp_path / "cubins"
    seesaw_json = tmp_path / "report_seesaw.json"
    patch = ("import json, hopper_sass\n"
             f"json.dump(hopper_sass.report_seesaw('bf16', 512, True), open({str(seesaw_json)!r}, 'w'))")
    run, report = _run_report(tmp_path, patch, "--cubins", str(cubins), gluon=True)
    assert run.returncode == 0, run.stdout + run.stderr
    entries = _entries(report)
    seesaw = [e for e in entries if e["kernel"] == "hopper_seesaw_queue_pass"]
    assert sorted(e["gradient"] for e in seesaw) == [False, True], [e["kernel"] for e in entries]
    assert any(e["kernel"].startswith("hopper_queue_pass") for e in entries)
    import json
    reference = json.loads(seesaw_json.read_text())
    for e in seesaw:
        assert e["ok"] and e["spill_bytes"] == 0 and "error" not in e, e
        assert (e["target"], e["dtype"], e["BLOCK_M"], e["BLOCK_K"], e["num_warps"]) == ("sm_90", "bf16", 64, 64, 8)
        assert e["default"] and e["chain_rank"] == 0, e
        assert e["mma_flops_over_ideal"] == 1.0 and e["exponentials_per_logit"] <= 1.125, e
        assert not [w for w in e["ptxas_warnings"] if re.search(r"C751[056]", w)], e["ptxas_warnings"]
        loops = e["consumer_loops"]
        assert len(loops) == 2, loops  # one per consumer warpgroup
        for loop in loops:
            assert loop["warpgroup_depbar"] * 4 <= loop["hgmma"] and loop["utmaldg"] > 0, loops
            assert loop["local_accesses"] == 0, loops
        hgmma = 40 if e["gradient"] else 32  # one tile's S GEMM, half of two tiles' P W
        assert e["sass_loop"]["hgmma"] == loops[0]["hgmma"] == e["mma_instructions_per_iteration"] == hgmma, e
        # The cubin is the kernel measured: its consumer 0 loop holds the entry's counts
        # (with the gradient the loop with the most MMAs, the old reading, does not).
        path = Path(e["cubin"])
        assert path.parent == cubins and path.name.startswith("sm_90_hopper_seesaw_queue_pass_bf16_m64k64w8"), e
        sass = sass_counts.disassemble(path.read_bytes())
        inner = [lp for lp in sass_counts.loops(sass) if sass_counts.count(lp.body)["hgmma"]
                 and not any(o.start > lp.start and o.end <= lp.end for o in sass_counts.loops(sass))]
        assert sass_counts.count(min(inner, key=lambda lp: lp.start).body)["hgmma"] == hgmma
        if e["gradient"]:
            assert sass_counts.count(sass_counts.mma_loop(sass).body)["hgmma"] != hgmma
            assert e["sass_loop"]["hgmma"] == reference["per_iteration"]["hgmma"] == 40, reference
            assert e["mma_flops_over_ideal"] == reference["mma_flops_over_ideal"]
            assert e["exponentials_per_logit"] == reference["exponentials_per_logit"]
            model = e["cycle_model"]
            assert model["components"]["mma_ideal"] == 2048 and not model["serialized"], model
            assert model["clocks_per_tile"] == reference["cycle_model"]["clocks_per_tile"], (model, reference)
        else:
            assert "cycle_model" not in e
    names = [Path(e["cubin"]).name for e in entries]
    assert len(set(names)) == len(entries), names
    # The summary of the defaults holds the seesaw with the gradient, the launch's first try.
    (version_report,) = report["reports"].values()
    (summary,) = [d for d in version_report["defaults"] if d["kernel"] == "hopper_seesaw_queue_pass"]
    assert summary["mma_flops_over_ideal"] == 1.0 and summary["cycle_model"]["clocks_per_tile"] > 0, summary


def test_ptxas_log_parsing():
    import triton_compile

    log = """ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized
ptxas warning : Registers are spilled to local memory in function 'k', 8 bytes spill stores, 8 bytes spill loads
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'k' for 'sm_90a'
ptxas info    : Function properties for k
    0 bytes stack frame, 24 bytes spill stores, 16 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
ptxas info    : Compile time = 392.014 ms
"""
    parsed = triton_compile.parse_ptxas_log(log)
    assert parsed["registers"] == 255 and parsed["spill_bytes"] == 24
    assert parsed["ptxas_warnings"] == [
        "(C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized",
        "Registers are spilled to local memory in function 'k', 8 bytes spill stores, 8 bytes spill loads"]


def test_every_variant_builds_its_own_dtype_and_tiles(tmp_path):
    """Each variant's build compiles the dtype, precision and tiles its entry names (no
    closure sees a later loop's values), over several dtypes and targets; compile-free:
    the builders are replaced by recorders."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    import os
    import subprocess

    script = tmp_path / "variants.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(BENCHMARKS)!r}, {str(BENCHMARKS.parent)!r}]\n"
        "import types\n"
        "import kernel_variants as kv\n"
        "calls = []\n"
        "fake = types.SimpleNamespace(asm=dict(ptx='', ttgir=''))\n"
        "kv.queue_pass = lambda dtype, precision, block_d, config, *a: calls.append((dtype, precision, config)) "
        "or (fake, 'i32')\n"
        "kv.repair = lambda dtype, precision, block_d, config, *a: calls.append((dtype, precision, config)) "
        "or (fake, 'i32')\n"
        "kv.loop_counts = kv.dot_layouts = lambda *a: {}\n"
        "bad = 0\n"
        "for arch in (80, 90):\n"
        "    for v in kv.queue_pass_variants(arch, ['bf16', 'fp16', 'fp32', 'tf32'], 512, False):\n"
        "        v.build()\n"
        "        dtype, precision, config = calls[-1]\n"
        "        want = kv.DTYPES[v.entry['dtype']]\n"
        "        e = v.entry\n"
        "        bad += (dtype, precision) != (want[0], want[2]) or (config.block_m, config.block_k, "
        "config.num_warps, config.num_stages) != (e['BLOCK_M'], e['BLOCK_K'], e['num_warps'], e['num_stages'])\n"
        "print(len(calls), bad)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    calls, bad = (int(n) for n in run.stdout.split())
    assert calls > 50 and bad == 0, run.stdout
