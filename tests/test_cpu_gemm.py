"""Who computes the CPU queue pass's fp32 tile GEMMs (ATen's BLAS, or the
package's own AVX-512 kernels, cpu/tile_gemm*.cpp): each provider this CPU can
run gives the loss and gradient within the error model, on shapes that take
every path of the own kernels (whole and partial 64-slot panels, whole and
partial 16 x 16 transposes, 1 to 6 row register blocks, reductions longer than
one 128-step pass); the choice is made once per process, can be named by
DCQ_OPS_CPU_GEMM, and a bad name is refused clearly. The numerics tests of
tests/test_chunked.py run again per provider in tests/test_cpu_dispatch.py."""

import os
import subprocess
import sys

import pytest
import torch

import dcq_ops
from error_model import assert_backend_within, loss_and_grad
from inputs import MARGINS, make_inputs

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")

PROVIDERS = ["aten", "avx512"]


def chunked(*args, **kwargs):
    return dcq_ops.dcq_cross_entropy(*args, **kwargs, backend="chunked")


@pytest.fixture
def provider(request):
    """Runs the test with request.param as the process's provider, then restores the choice."""
    name = request.param
    if name not in dcq_ops.cpu_gemm_providers():
        pytest.skip(f"this CPU cannot run the {name} GEMMs")
    saved = dcq_ops.cpu_gemm_provider()
    dcq_ops.set_cpu_gemm_provider(name)
    yield name
    dcq_ops.set_cpu_gemm_provider(saved)


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
@pytest.mark.parametrize("rows, dim, slots, chunk", [
    (50, 160, 448, 128),   # whole panels and transposes; row blocks of 6 then 2; dims past one 128-step pass
    (37, 45, 203, 0),      # partial everything: a 11-slot panel, a 13-dim tail, a 1-row block
    (7, 300, 130, 64),     # a 300-dim reduction (three passes), a 2-slot last chunk
    (13, 16, 1000, 0),     # the plan's own chunk width
])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_provider_within_the_error_model(provider, rows, dim, slots, chunk, threads):
    inputs = make_inputs(rows=rows, dim=dim, slots=slots, num_classes=3 * slots, empty=slots // 10, seed=rows + dim)
    margin = MARGINS["arcface"]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        # the op itself, to name the chunk width (0: the plan's own)
        loss, grad = torch.ops.dcq_ops.dcq_cross_entropy(*inputs, margin["scale"], margin.get("m1", 1.0),
                                                         margin.get("m2", 0.0), margin.get("m3", 0.0), 0.0, False,
                                                         True, chunk)
    finally:
        torch.set_num_threads(saved)
    assert_backend_within(loss, grad, inputs, margin, what=f"{provider}, {rows}x{dim}x{slots}, {threads} threads")


@pytest.mark.parametrize("provider", PROVIDERS, indirect=True)
def test_nonfinite_queue_slot_keeps_other_rows_finite(provider):
    """A NaN slot that every row excludes (its class is every row's class) must not
    reach the gradient through the second GEMM (0 * NaN), whichever GEMM runs."""
    inputs = list(make_inputs(rows=9, dim=70, slots=130, num_classes=400, empty=0, seed=3))
    x, k, y, w, yq = inputs
    y[:] = 5
    w = w.clone()
    w[17] = float("nan")
    yq = yq.clone()
    yq[17] = 5
    loss, grad = loss_and_grad(chunked, (x, k, y, w, yq), MARGINS["arcface"])
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_choice_is_one_of_the_available_providers():
    available = dcq_ops.cpu_gemm_providers()
    assert available[0] == "aten" and set(available) <= set(PROVIDERS)
    assert dcq_ops.cpu_gemm_provider() in available


def run_python(code, **env):
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, **env))


def test_probe_measures_every_available_provider_once():
    code = ("import dcq_ops, json; first = dcq_ops.cpu_gemm_provider(); probe = dcq_ops.cpu_gemm_probe(); "
            "print(json.dumps([first, dcq_ops.cpu_gemm_provider(), probe, dcq_ops.cpu_gemm_providers()]))")
    run = run_python(code, DCQ_OPS_CPU_GEMM="auto")
    assert run.returncode == 0, run.stderr
    import json
    first, again, probe, available = json.loads(run.stdout.strip().splitlines()[-1])
    assert first == again
    if available == ["aten"]:
        assert first == "aten" and probe == {}  # nothing to choose between
    else:
        assert set(probe) == set(available) and all(1 < rate < 1e5 for rate in probe.values())  # GFLOP/s
        own_not_clearly_slower = probe["avx512"] >= 0.95 * probe["aten"]
        assert first == ("avx512" if own_not_clearly_slower else "aten")


def test_named_provider_is_used_without_a_probe():
    run = run_python("import dcq_ops; print(dcq_ops.cpu_gemm_provider(), dcq_ops.cpu_gemm_probe())",
                     DCQ_OPS_CPU_GEMM="aten")
    assert run.returncode == 0, run.stderr
    assert run.stdout.split() == ["aten", "{}"]


def test_unknown_provider_is_refused_with_the_choices():
    run = run_python("import dcq_ops; dcq_ops.cpu_gemm_provider()", DCQ_OPS_CPU_GEMM="openblas")
    assert run.returncode != 0
    assert "ValueError" in run.stderr and "DCQ_OPS_CPU_GEMM=openblas" in run.stderr and "aten" in run.stderr
    with pytest.raises(ValueError, match="unknown CPU GEMM provider"):
        dcq_ops.set_cpu_gemm_provider("mkl")
    with pytest.raises(TypeError):
        dcq_ops.set_cpu_gemm_provider(3)


def test_avx512_refused_where_the_cpu_lacks_it():
    run = run_python("import dcq_ops; dcq_ops.cpu_gemm_provider()", DCQ_OPS_CPU_GEMM="avx512",
                     ATEN_CPU_CAPABILITY="avx2")
    assert run.returncode != 0 and "has no AVX-512" in run.stderr, run.stderr
