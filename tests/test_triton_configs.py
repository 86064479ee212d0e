"""The Triton kernels' launch configuration for every architecture the build
targets, computed without a GPU (dcq_ops/triton/configs.py), and held against
what the compiler reported for them (benchmarks/results/compiled.json)."""

import json
from pathlib import Path

import pytest

from dcq_ops.triton.configs import (ACCUMULATOR_REGISTERS, ARCHITECTURES, TileConfig, architecture_of, block_d_of,
                                    mma_family, tile_config, tile_configs)

COMPILED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "compiled.json"

# The default (first fitting) configuration at D = 512, as (BLOCK_M, BLOCK_K, warps, stages).
EXPECTED_16BIT = {
    "sm_80": (32, 32, 8, 2),   # 163 KiB: (64, 64, 8, 2) does not fit, (32, 16, 4, 2) spills under Triton 3.6
    "sm_86": (16, 32, 4, 2),   # 99 KiB: (32, 32, 8, 2) exceeds the estimate
    "sm_89": (16, 32, 4, 2),
    "sm_90": (64, 64, 8, 2),   # 227 KiB, wgmma: the ideal work (test_sm90_default_does_the_ideal_work)
    "sm_100": (64, 32, 8, 3),  # tcgen05 stages more in shared memory: (64, 64, 8, 2) does not fit
}


def as_tuple(config: TileConfig):
    return (config.block_m, config.block_k, config.num_warps, config.num_stages)


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_default_16bit_configuration_per_architecture(name):
    architecture = ARCHITECTURES[name]
    assert as_tuple(tile_config(architecture, 2, 512)) == EXPECTED_16BIT[name]


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
@pytest.mark.parametrize("element_size,tf32", [(2, False), (4, False), (4, True)])
@pytest.mark.parametrize("dim", [64, 128, 256, 512, 100])
def test_every_chosen_configuration_fits(name, element_size, tf32, dim):
    architecture = ARCHITECTURES[name]
    configs = tile_configs(architecture, element_size, dim, tf32)
    assert configs, "there is always a configuration"
    block_d = block_d_of(dim)
    family = mma_family(architecture.capability)
    if configs == [TileConfig(16, 16, 4, 1)] and \
            configs[0].shared_bytes(block_d, element_size, family) > architecture.shared_memory_per_block_optin:
        # Nothing fits the (conservative) estimate: the smallest tile, which the compiled
        # report shows to fit in fact (fp32 at D = 512 on 99 KiB: 64 KiB, TF32: 96 KiB).
        assert element_size == 4 and dim >= 512
        return
    for config in configs:
        assert config.shared_bytes(block_d, element_size, family) <= architecture.shared_memory_per_block_optin
        assert config.accumulator_registers(block_d) <= ACCUMULATOR_REGISTERS
    # Smaller embeddings never get fewer rows per program than larger ones.
    assert configs[0].block_m >= tile_config(architecture, element_size, 2 * dim, tf32).block_m


def test_families_and_a_device_of_our_own():
    assert [mma_family(ARCHITECTURES[n].capability) for n in ("sm_80", "sm_86", "sm_89", "sm_90", "sm_100")] == \
        ["mma.sync", "mma.sync", "mma.sync", "wgmma", "tcgen05"]
    # A GPU reports its capability and opt-in shared memory: an L4-like device.
    l4 = architecture_of((8, 9), 101376)
    assert tile_config(l4, 2, 512) == tile_config(ARCHITECTURES["sm_89"], 2, 512)
    # A small part (48 KiB) still gets the smallest tile.
    assert as_tuple(tile_config(architecture_of((8, 6), 48 << 10), 2, 512)) == (16, 16, 4, 1)


# The Triton versions the compiled report must cover: torch 2.14's (3.8) and torch 2.11's (3.6).
TRITON_VERSIONS = ("3.8", "3.6")


def compiled_reports() -> dict:
    """benchmarks/results/compiled.json's report of each Triton version, keyed by version."""
    return json.loads(COMPILED.read_text())["reports"]


def _report_versions() -> list:
    try:
        return sorted(compiled_reports())
    except (OSError, ValueError, KeyError):
        return ["none: rerun python benchmarks/compiled.py"]  # the tests below then fail, saying so


def test_compiled_report_covers_both_triton_versions():
    versions = compiled_reports()
    for wanted in TRITON_VERSIONS:
        assert any(v.startswith(wanted + ".") for v in versions), f"no report of Triton {wanted}: {sorted(versions)}"


@pytest.mark.parametrize("version", _report_versions())
def test_sm90_default_does_the_ideal_work(version):
    """On sm_90 the 16-bit defaults issue each MMA once (the first dot laid out
    [4, 2]: each warpgroup half of BLOCK_K) and about one exponential a logit, in
    the report of every Triton version; chain_break stayed a run-time value."""
    entries = compiled_reports()[version]["entries"]
    for dtype in ("bf16", "fp16"):
        for e in entries:
            if e["target"] == "sm_90" and e["kernel"] == "queue_pass" and e["dtype"] == dtype and e["default"]:
                assert e["ok"] and e["mma_flops_over_ideal"] == 1.0 and e["exponentials_per_logit"] <= 1.125, e
                assert e["first_dot_warps_per_cta"] == [4, 2] and e["chain_break"].startswith("i32"), e


@pytest.mark.parametrize("version", _report_versions())
def test_compiled_report_agrees_with_the_estimates(version):
    """benchmarks/compiled.py compiled every configuration chosen here for sm_80 and
    sm_90 (and sm_86, sm_100): none spills, none exceeds the shared memory, and the
    estimate used to choose is an upper bound of what the compiler allocated."""
    report = compiled_reports()[version]
    entries = [e for e in report["entries"] if e["kernel"] == "queue_pass" and e["BLOCK_D"] == 512]
    targets = {e["target"] for e in entries}
    assert {"sm_80", "sm_90"} <= targets
    for target in targets:
        architecture = ARCHITECTURES[target]
        for dtype, element_size, tf32 in (("bf16", 2, False), ("fp16", 2, False), ("fp32", 4, False),
                                          ("tf32", 4, True)):
            chosen = {as_tuple(c) for c in tile_configs(architecture, element_size, 512, tf32)}
            compiled = {(e["BLOCK_M"], e["BLOCK_K"], e["num_warps"], e["num_stages"])
                        for e in entries if e["target"] == target and e["dtype"] == dtype}
            assert chosen == compiled, f"{target} {dtype}: rerun python benchmarks/compiled.py"
    for e in entries:
        limit = ARCHITECTURES[e["target"]].shared_memory_per_block_optin
        assert e["ok"] and e["spill_bytes"] == 0 and e["shared"] <= limit, e
        assert e["shared"] <= e["shared_estimate"], e  # the estimate is an upper bound
