"""benchmarks/seesaw_schedule.py: the seesaw kernel's mbarrier protocol, simulated with
the hardware's parity rule, neither deadlocks nor lets a wait pass on another
completion than its own, at every ring depth the launch uses and every tile count up to
several periods; the checker catches a wrong phase formula; the clocks per tile follow
the resources (tensor-bound when nothing else costs, the loads exposed at two buffers
and covered at three); the command exits 2 on bad arguments."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import seesaw_schedule  # noqa: E402
from seesaw_schedule import LOADERS, ORDERS, ProtocolError, simulate  # noqa: E402


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("stages", [2, 3, 4])
def test_the_protocol_completes_with_every_wait_on_its_own_completion(stages, order, loader):
    """Every tile count from 1 (no loop) to past three periods of the phases (lcm(2 STAGES,
    4)): both consumers finish, every wait having passed on its own completion, and the
    tensor cores did each tile's two GEMMs once."""
    for tiles in range(1, 3 * 12 + 2):
        result = simulate(tiles, stages, dim=128, softmax=300.0, order=order, loader=loader)
        assert result["tensor_busy"] == tiles * result["ideal_per_tile"]


def test_a_wrong_phase_formula_is_caught(monkeypatch):
    """The ready barrier waited on with the two-buffer formula ((t // 2) & 1) while the ring
    has three buffers: a wait passes on another completion (or never): ProtocolError."""
    original = seesaw_schedule.consumer

    def wrong(parity, tiles, stages, *args, **kwargs):
        for step in original(parity, tiles, stages, *args, **kwargs):
            if step[:2] == ("wait", "ready"):
                t = step[4] * stages + step[2]  # the tile: its use of the buffer, and the buffer
                step = ("wait", "ready", step[2], (t // 2) & 1, step[4])
            yield step

    monkeypatch.setattr(seesaw_schedule, "consumer", wrong)
    with pytest.raises(ProtocolError):
        simulate(20, 3, dim=128, softmax=300.0)


def test_the_clocks_follow_the_resources():
    """Nothing but the GEMMs costing (no latency, an instant port, no softmax): the tensor
    cores never wait (2 x 64 x 64 x 512 x 2 FLOPs a tile at 4,096 a clock: 2,048 clocks).
    With the loads' real cost at D = 512, two buffers wait for tiles and three do not; the
    kernel's loader (the consumer that finishes a tile second) beats the owner loading."""
    free = dict(l2_latency_clocks=0, l2_port_bytes_per_clock=1e12)
    ideal = simulate(64, 2, dim=512, softmax=0.0, hardware=free)
    assert ideal["clocks_per_tile"] == ideal["ideal_per_tile"] == 2048 and ideal["fraction_of_peak"] == 1.0
    two, three = (simulate(64, stages, dim=512, softmax=1100.0) for stages in (2, 3))
    # A tile's load: 600 clocks of latency and 64 KiB at 64 B a clock. Three buffers
    # wait only for the prologue's three loads (one after another on the port).
    load = 600 + 64 * 512 * 2 / 64
    assert min(two["load_waits"]) > 64 * 500 and max(three["load_waits"]) < 4 * load
    assert two["clocks_per_tile"] > three["clocks_per_tile"] >= 2048
    owner = simulate(64, 2, dim=512, softmax=1100.0, loader="owner")
    assert owner["clocks_per_tile"] > two["clocks_per_tile"]


def test_the_kernels_order_is_the_faster_one_at_each_ring_depth():
    """hopper_seesaw.halves' rule, simulated: with two buffers (D = 512) the tiles arrive
    in two halves and S_t is split around P_{t-1} W_{t-1} (its first half on the first
    half of the tile; tile t - 1 released a half sooner), faster than one S chain; with
    four (D = 256) the one chain under the other consumer's softmax is faster (the
    simulation takes the kernel's rule, hopper_seesaw.halves, itself)."""
    for latency in (300, 600, 1000):
        rates = dict(l2_latency_clocks=latency)
        kernel, one_chain = (simulate(64, 2, 512, 1170.0, rates, order=o)["clocks_per_tile"]
                             for o in ("kernel", "seesaw"))
        assert kernel < one_chain, (latency, kernel, one_chain)
        kernel, split = (simulate(64, 4, 256, 1039.0, rates, order=o)["clocks_per_tile"] for o in ("kernel", "split"))
        assert kernel < split, (latency, kernel, split)


def test_the_command_exits_2_on_bad_arguments():
    script = str(ROOT / "benchmarks" / "seesaw_schedule.py")
    for bad in (["--tiles", "3"], ["--dim", "100"], ["--stages", "1"], ["--latency", "-5"], ["--order", "x"],
                ["--loader", "x"]):
        run = subprocess.run([sys.executable, script, *bad], capture_output=True, text=True, timeout=120)
        assert run.returncode == 2, (bad, run.stdout, run.stderr)
    run = subprocess.run([sys.executable, script, "--dim", "256", "--latency", "600", "--tiles", "16"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert run.returncode == 0 and "D=256 stages 4" in run.stdout, run.stdout + run.stderr
