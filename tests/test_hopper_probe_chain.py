"""The Gluon sm_90 kernels' selection behind their probes (dcq_ops/triton/hopper_launch.py):
DCQ_OPS_SM90_KERNEL's choices, the default's ranked chain (the seesaw, then the pipelined
kernel, then the classic one, each Gluon kernel where it applies and its own probe cleared
the class), an explicit choice without the chain, and the probe class keyed on the kernel.
The children are fakes (tests/hopper_probe_fakes.py) that pass or fail by the kernel named
in the class they are given; hopper_launch runs its GPU branch on CPU tensors
(``as_on_sm90``). The probe itself: tests/test_hopper_probe.py."""

import json
import runpy
import sys
import warnings
from pathlib import Path

import pytest
import torch

ON_CUDA = torch.cuda.is_available()

from dcq_ops.triton import import_ops  # noqa: E402  (sets TRITON_INTERPRET for Triton's first import)

try:
    import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

import dcq_ops  # noqa: E402
from dcq_ops import demotions  # noqa: E402
from dcq_ops.triton import hopper, hopper_launch, hopper_probe, hopper_seesaw, kernels  # noqa: E402
from dcq_ops.triton.hopper_probe_class import ProbeClass, cdiv  # noqa: E402

from hopper_probe_fakes import (_clean, fake_child, passing_child, probe_warnings, spawned,  # noqa: E402,F401
                                verdict_line)


@pytest.fixture
def as_on_sm90(monkeypatch):
    """hopper_launch as on an sm_90 GPU (not interpreted): its GPU branch runs on CPU tensors."""
    if not hopper.AVAILABLE:
        pytest.skip("this Triton has no Gluon")
    monkeypatch.setattr(hopper_launch, "INTERPRETED", False)
    monkeypatch.delenv(hopper_launch.ENV, raising=False)


def sm90_operands(rows=100, slots=1000, dim=64):
    q = torch.zeros(rows, dim, dtype=torch.bfloat16)
    w = torch.zeros(slots, dim, dtype=torch.bfloat16)
    return q, w


SPLIT, TILE = 2 * hopper.BLOCK_K, hopper.BLOCK_K


def choose(q, w, split=SPLIT, tile=TILE, config=None, capability=(9, 0), **branches):
    """hopper_launch.choose_kernel at the Gluon kernels' tile (64 x 64), with the warnings it gave."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        kernel = hopper_launch.choose_kernel(q, w, split, tile, tile, config, capability, **branches)
    return kernel, probe_warnings(record)


def failing_for(monkeypatch, *kernels_failing):
    """A child that crashes (SIGABRT) for a class of these kernels and passes for the others."""
    fake_child(monkeypatch, "import json, os, sys\n"
                            f"if json.loads(sys.argv[-1])['kernel'] in {list(kernels_failing)!r}:\n"
                            "    os.abort()\n" + verdict_line(status="passed", what="passed", reason=""))


# ----------------------------------------------------------------------------
# The choices


def test_the_choices_and_a_bad_value(monkeypatch):
    assert hopper_launch.CHOICES == ("classic", "pipelined", "seesaw")
    for choice in hopper_launch.CHOICES:
        monkeypatch.setenv(hopper_launch.ENV, f" {choice.upper()} ")
        assert hopper_launch.selected_kernel() == choice
    assert hopper_launch.chain() == ("seesaw",)
    monkeypatch.setenv(hopper_launch.ENV, "ranked")  # the default's name is no value of the variable
    with pytest.raises(ValueError, match="DCQ_OPS_SM90_KERNEL must be one of classic, pipelined, seesaw, "
                                         "got 'ranked'"):
        hopper_launch.selected_kernel()


def test_the_rules_are_the_kernels_own():
    """One entry per Gluon kernel, read from its module: the seesaw's warps are its two
    consumer warpgroups, its tile square."""
    seesaw, pipelined = hopper_launch.RULES["seesaw"], hopper_launch.RULES["pipelined"]
    assert (seesaw.block_m, seesaw.block_k, seesaw.stages) == (hopper_seesaw.BLOCK_M, hopper_seesaw.BLOCK_K,
                                                                hopper_seesaw.stages)
    assert seesaw.num_warps == 2 * hopper_seesaw.NUM_WARPS == 8 and seesaw.square and not pipelined.square
    assert (pipelined.block_m, pipelined.block_k, pipelined.num_warps, pipelined.stages(512)) == (
        hopper.BLOCK_M, hopper.BLOCK_K, hopper.NUM_WARPS, hopper.STAGES)
    assert set(hopper_launch.RULES) == set(hopper_launch.CHAIN) == {"seesaw", "pipelined"}


# ----------------------------------------------------------------------------
# The default's chain


def test_the_seesaw_heads_the_sm90_default_behind_its_probe(monkeypatch, as_on_sm90, spawned):
    assert hopper_launch.selected_kernel() == hopper_launch.RANKED
    assert hopper_launch.chain() == ("seesaw", "pipelined")
    passing_child(monkeypatch)
    q, w = sm90_operands()
    assert choose(q, w, compute_grad=True, filtering=False) == ("seesaw", [])
    assert spawned == [hopper_launch.probe_class("seesaw", q, w, SPLIT, True, False)]
    last_split = 1000 % SPLIT or SPLIT
    assert spawned[0] == ProbeClass("seesaw", "bfloat16", 64, True, False, hopper_seesaw.BLOCK_M, TILE,
                                    hopper_seesaw.stages(64), 1 if 100 <= hopper_seesaw.BLOCK_M else 2,
                                    100 % hopper_seesaw.BLOCK_M != 0, 2, 2, cdiv(last_split, TILE),
                                    last_split % TILE != 0)
    # The same class again: no probe; another one (no gradient): its own.
    assert choose(q, w, compute_grad=True, filtering=False)[0] == "seesaw"
    assert choose(q, w, compute_grad=False, filtering=False)[0] == "seesaw"
    assert len(spawned) == 2 and not spawned[1].compute_grad
    # Where no Gluon kernel applies, no probe.
    assert choose(q, w, capability=(8, 0))[0] is None
    assert choose(q, w, split=SPLIT + TILE // 2)[0] is None
    assert len(spawned) == 2


def test_a_failed_seesaw_probe_moves_the_class_to_the_pipelined_kernel(monkeypatch, as_on_sm90, spawned):
    failing_for(monkeypatch, "seesaw")
    q, w = sm90_operands()
    kernel, said = choose(q, w, compute_grad=True, filtering=True)
    assert kernel == "pipelined" and [c.kernel for c in spawned] == ["seesaw", "pipelined"]
    assert spawned[1] == spawned[0]._replace(kernel="pipelined", block_m=hopper.BLOCK_M, block_k=hopper.BLOCK_K,
                                             stages=hopper.STAGES)
    assert len(said) == 1 and "the seesaw sm_90 queue-pass kernel failed its probe" in str(said[0].message)
    assert "The pipelined sm_90 kernel (if its own probe clears the class" in str(said[0].message)
    demoted = demotions.demotions()
    assert [d.fallback for d in demoted] == [hopper_probe.FALLBACK_PIPELINED] and "seesaw" in demoted[0].shape_class
    assert "SIGABRT" in dcq_ops.backends("cpu")["triton"]
    # Later launches of the class: one lookup each, no probe, no warning.
    assert choose(q, w, compute_grad=True, filtering=True) == ("pipelined", []) and len(spawned) == 2


def test_both_probes_failing_leave_the_classic_kernel(monkeypatch, as_on_sm90, spawned):
    failing_for(monkeypatch, "seesaw", "pipelined")
    q, w = sm90_operands()
    kernel, said = choose(q, w)
    assert kernel is None and [c.kernel for c in spawned] == ["seesaw", "pipelined"] and len(said) == 2
    assert [d.fallback for d in demotions.demotions()] == [hopper_probe.FALLBACK_PIPELINED, hopper_probe.FALLBACK]
    assert "the pipelined sm_90 queue-pass kernel failed" in str(said[1].message)
    assert "The classic sm_90 kernel runs this class instead" in str(said[1].message)
    assert choose(q, w) == (None, []) and len(spawned) == 2


def test_the_chain_skips_a_kernel_that_does_not_apply(monkeypatch, as_on_sm90, spawned):
    """An explicit configuration of the pipelined kernel's tile but other warps names
    neither; the seesaw's failure falls to the classic kernel where the pipelined one does
    not apply (and its warning says so)."""
    passing_child(monkeypatch)
    q, w = sm90_operands()
    config = dict(BLOCK_M=64, BLOCK_K=64, num_warps=4, num_stages=2)
    assert choose(q, w, config=config)[0] is None and spawned == []
    monkeypatch.setitem(hopper_launch.RULES, "pipelined", hopper_launch.RULES["pipelined"]._replace(max_block_d=32))
    failing_for(monkeypatch, "seesaw")
    kernel, said = choose(q, w)
    assert kernel is None and [c.kernel for c in spawned] == ["seesaw"]
    assert "The classic sm_90 kernel runs this class instead" in str(said[0].message)
    assert [d.fallback for d in demotions.demotions()] == [hopper_probe.FALLBACK]


# ----------------------------------------------------------------------------
# An explicit choice: that kernel or classic


def test_an_explicit_seesaw_failing_its_probe_runs_classic_without_probing_the_pipelined(monkeypatch, as_on_sm90,
                                                                                          spawned):
    failing_for(monkeypatch, "seesaw")
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    q, w = sm90_operands()
    kernel, said = choose(q, w)
    assert kernel is None and [c.kernel for c in spawned] == ["seesaw"] and len(said) == 1
    assert "The classic sm_90 kernel runs this class instead" in str(said[0].message)
    assert [d.fallback for d in demotions.demotions()] == [hopper_probe.FALLBACK]


def test_an_explicit_pipelined_never_runs_the_seesaw(monkeypatch, as_on_sm90, spawned):
    passing_child(monkeypatch)
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")
    q, w = sm90_operands()
    assert choose(q, w) == ("pipelined", []) and [c.kernel for c in spawned] == ["pipelined"]
    failing_for(monkeypatch, "pipelined")
    assert choose(q, w, compute_grad=False)[0] is None and [c.kernel for c in spawned] == ["pipelined"] * 2


def test_classic_forces_the_old_kernel_without_a_probe_and_bad_values_raise(monkeypatch, as_on_sm90, spawned):
    passing_child(monkeypatch)
    q, w = sm90_operands()
    monkeypatch.setenv(hopper_launch.ENV, "classic")
    assert choose(q, w)[0] is None and spawned == []
    monkeypatch.setenv(hopper_launch.ENV, "fastest")
    with pytest.raises(ValueError, match="DCQ_OPS_SM90_KERNEL must be one of classic, pipelined, seesaw, "
                                         "got 'fastest'"):
        choose(q, w)


# ----------------------------------------------------------------------------
# The class keyed on the kernel


def test_one_kernels_verdict_never_clears_the_other(monkeypatch, as_on_sm90, spawned):
    """A passed seesaw verdict (in memory and on disk) leaves the pipelined kernel's class
    unprobed, and the other way round: each kernel's first launch of the class probes it."""
    passing_child(monkeypatch)
    q, w = sm90_operands()
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    assert choose(q, w)[0] == "seesaw"
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")
    assert choose(q, w)[0] == "pipelined"
    assert [c.kernel for c in spawned] == ["seesaw", "pipelined"]
    hopper_probe.forget()  # a new process: the disk cache holds both, each under its kernel
    failing_for(monkeypatch)  # (a child would pass; none runs)
    for kernel in ("pipelined", "seesaw"):
        monkeypatch.setenv(hopper_launch.ENV, kernel)
        assert choose(q, w)[0] == kernel
    assert len(spawned) == 2 and {v["class"]["kernel"] for v in hopper_probe.verdicts()} == {"seesaw", "pipelined"}
    assert all(v["source"] == "cache" for v in hopper_probe.verdicts())
    # A failed pipelined verdict of a class neither demotes the seesaw nor answers for it.
    failing_for(monkeypatch, "pipelined")
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")
    assert choose(q, w, compute_grad=False)[0] is None
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    assert choose(q, w, compute_grad=False)[0] == "seesaw"
    monkeypatch.delenv(hopper_launch.ENV)
    assert choose(q, w, compute_grad=False) == ("seesaw", [])
    assert [(c.kernel, c.compute_grad) for c in spawned[2:]] == [("pipelined", False), ("seesaw", False)]


# ----------------------------------------------------------------------------
# The call site and the interpreter


@pytest.mark.skipif(ON_CUDA or not kernels.INTERPRETED, reason="launches on CPU tensors, under the interpreter")
@pytest.mark.parametrize("compute_grad, threshold", [(True, 0.0), (False, 0.2)])
def test_the_queue_pass_tells_the_selection_its_tile_and_branches(monkeypatch, compute_grad, threshold):
    """launch.queue_pass passes its tile (the seesaw needs BLOCK_M = BLOCK_K), the gradient
    and filtering (part of the probe class) to hopper_launch.choose_kernel."""
    from dcq_ops.triton import launch

    asked = []

    def no_gluon(q, w, split_size, block_m, block_k, config, capability, **kwargs):
        asked.append((block_m, block_k, kwargs))
        return None

    monkeypatch.setattr(hopper_launch, "choose_kernel", no_gluon)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q = torch.nn.functional.normalize(torch.randn(5, 16, generator=torch.Generator().manual_seed(3)), dim=1)
    launch.queue_pass(q, torch.arange(5), q.repeat(8, 1), torch.arange(40) + 10, 30.0, threshold, compute_grad,
                      config=dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1))
    assert asked == [(16, 32, {"compute_grad": compute_grad, "filtering": threshold > 0})]


def test_under_the_interpreter_the_default_stays_classic_and_nothing_is_probed(monkeypatch, spawned):
    if not kernels.INTERPRETED:
        pytest.skip("the interpreter's default")
    monkeypatch.delenv(hopper_launch.ENV, raising=False)
    assert hopper_launch.selected_kernel() == "classic" and hopper_launch.chain() == ()
    q, w = sm90_operands()
    q, w = q.half(), w.half()
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")
    assert hopper_launch.choose_kernel(q, w, 64, 16, 32, None, None) == "pipelined"
    # The seesaw's twin only where the seesaw's own rule holds: BLOCK_M = BLOCK_K.
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    assert hopper_launch.choose_kernel(q, w, 64, 16, 32, None, None) is None
    assert hopper_launch.choose_kernel(q, w, 64, 32, 32, None, None) == "seesaw"
    assert spawned == []


# ----------------------------------------------------------------------------
# scripts/gpu_check.sh's probe step


def gpu_check_probe_step() -> str:
    """The Python of gpu_check.sh's step 1b, made to run on CPU tensors (its sm_90 gate
    passed, "cuda" read as "cpu")."""
    script = (Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh").read_text()
    step = script[script.index("# 1b."):script.index("# 2. The check command")]
    code = step[step.index("<<'EOF'\n") + len("<<'EOF'\n"):step.index("\nEOF\n")]
    gate = "if not (torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0) and hopper.AVAILABLE):"
    assert gate in code and code.count('"cuda"') == 3
    return code.replace(gate, "if False:").replace('"cuda"', '"cpu"')


@pytest.mark.skipif(not hopper.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("budget_s, failing", [(60, ()), (60, ("seesaw",)), (3, ())])
def test_gpu_checks_probe_step_probes_every_kernel_of_the_chain(monkeypatch, tmp_path, budget_s, failing, spawned):
    """Both classes of each kernel of the chain, the seesaw's first, each under the 40 s
    deadline the script exports (here 10 s: the children are fakes); a failed probe fails
    the step; a probe whose deadline no longer fits the budget is reported, not started."""
    failing_for(monkeypatch, *failing)
    monkeypatch.setenv(hopper_probe.TIMEOUT_ENV, "10")
    out = tmp_path / "hopper_probe.json"
    monkeypatch.setattr(sys, "argv", ["-", str(out), str(budget_s)])
    (tmp_path / "step.py").write_text(gpu_check_probe_step())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(SystemExit) as exit_status:
            runpy.run_path(str(tmp_path / "step.py"), run_name="__main__")
    results = json.loads(out.read_text())
    assert [r["kernel"] for r in results] == ["seesaw", "seesaw", "pipelined", "pipelined"]
    if budget_s == 3:
        assert spawned == [] and all(r["cleared"] is None for r in results) and exit_status.value.code == 0
        return
    assert [c.kernel for c in spawned] == [r["kernel"] for r in results]
    assert [(c.compute_grad, c.filtering) for c in spawned] == [(True, False), (False, True)] * 2
    assert [r["cleared"] for r in results] == [r["kernel"] not in failing for r in results]
    assert exit_status.value.code == (1 if failing else 0)
