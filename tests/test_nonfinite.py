"""Non-finite input and huge magnitudes, on every backend this machine can run
(docs/loss.md, "Numerics"):

- a NaN or ±inf in a row's embedding, in its class weight, or in a queue slot
  the row keeps makes that row's loss and gradient NaN; a non-finite slot the
  row excludes has no effect on it; a row with every slot excluded has loss 0
  and gradient 0 unless its own input is non-finite (then NaN);
- embeddings and class weights of magnitude 1e19..1e30 in fp32 give the loss
  of the unscaled ones (no overflow in the normalisation), and the queue stores
  unit rows for such keys.

The rule is computed here independently of every backend (``rule_nan_rows``);
the rows it leaves finite are held to tests/error_model.py (fp32, fp64) or
tests/bounds.py (Triton, as in tests/test_triton.py). The chunked fp32 tests
run again in a subprocess for every other CPU epilogue variant this CPU can run
(ATEN_CPU_CAPABILITY, as in tests/test_cpu_dispatch.py).
"""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, cosine_rounding, positive_slope
from dcq_ops import reference
from error_model import assert_within, loss_and_grad
from inputs import MARGINS, make_inputs

# NaN and inf inputs: numpy (the Triton interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

ON_CUDA = torch.cuda.is_available()

# As tests/test_triton.py: the interpreter is chosen when dcq_ops.triton.kernels
# is first imported, so import_ops sets the variable for that import only.
try:
    from dcq_ops.triton import import_ops

    import_ops(interpret=not ON_CUDA)
    from dcq_ops.triton import kernels as triton_kernels
except ImportError:  # Triton not installed
    triton_kernels = None

TRITON_OK = triton_kernels is not None and (ON_CUDA or triton_kernels.INTERPRETED)
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_extension = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")
needs_triton = pytest.mark.skipif(not TRITON_OK, reason="Triton missing, or imported compiled without a GPU")

VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
PLACES = ["embedding", "class_weight", "queue_slot"]
MARGIN_NAMES = ["arcface", "cosface_filtered"]  # the margin's clamps; filtering (a +inf cosine is "filtered")


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # for dcq_ops.backends' dispatch
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")


# ----------------------------------------------------------------------------
# Inputs and the rule


def base_inputs(seed=0):
    """12 rows, D = 16, 70 slots (3 splits under the Triton interpreter), 5 classes."""
    return make_inputs(rows=12, dim=16, slots=70, num_classes=5, empty=6, seed=seed)


def poisoned_inputs(place, value):
    """base_inputs with one non-finite value in `place` (one coordinate of one row)."""
    x, k, y, w, yq = (t.clone() for t in base_inputs())
    if place == "embedding":
        x[3, 5] = value
    elif place == "class_weight":
        k[7, 2] = value
    elif place == "queue_slot":
        slot = int(torch.nonzero(yq >= 0)[0])
        y[:3] = yq[slot]  # rows 0-2 exclude the slot by label; the others keep it
        w[slot, 4] = value
    return x, k, y, w, yq


def all_excluded_inputs(value=float("nan")):
    """A queue of one class c (and empty slots): rows of class c keep nothing.
    Row 0 (class c) has a non-finite embedding, row 1 (class c) is finite, the
    other rows keep every slot; an excluded, empty slot holds a NaN too."""
    x, k, y, w, yq = (t.clone() for t in base_inputs(seed=1))
    c = 3
    yq = torch.where(yq >= 0, torch.full_like(yq, c), yq)
    y[:2] = c
    y[2:] = torch.where(y[2:] == c, torch.full_like(y[2:], c + 1), y[2:])
    x[0, 1] = value
    w[int(torch.nonzero(yq < 0)[0]), 0] = float("nan")
    return x, k, y, w, yq


def rule_nan_rows(inputs):
    """The rows whose loss must be NaN: non-finite embedding or class weight, or
    a kept queue slot that is not finite."""
    x, k, y, w, yq = inputs
    kept = (yq.view(1, -1) != y.view(-1, 1)) & (yq.view(1, -1) >= 0)
    bad_slot = ~torch.isfinite(w).all(dim=1)
    return ~torch.isfinite(x).all(dim=1) | ~torch.isfinite(k).all(dim=1) | (kept & bad_slot.view(1, -1)).any(dim=1)


def cast(inputs, dtype):
    x, k, y, w, yq = inputs
    return x.to(dtype), k.to(dtype), y, w.to(dtype), yq


def to_device(inputs):
    return tuple(t.to(DEVICE) for t in inputs)


# ----------------------------------------------------------------------------
# Backends


def chunked(*args, **kwargs):
    return dcq_ops.dcq_cross_entropy(*args, **kwargs, backend="chunked")


def triton_backend(*args, **kwargs):
    return dcq_ops.dcq_cross_entropy(*args, **kwargs, backend="triton")


def check_rows(loss, grad, inputs, margin, *, dtype, what, bounds_style=False):
    """NaN rows exactly where the rule says (loss and gradient); the other rows
    finite and within the error model of the reference on the same rows."""
    expected = rule_nan_rows(inputs).to(loss.device)
    assert torch.equal(torch.isnan(loss), expected), f"{what}: NaN loss rows {torch.isnan(loss).tolist()}, " \
                                                     f"expected {expected.tolist()} (loss {loss.tolist()})"
    assert torch.equal(torch.isnan(grad).any(dim=1), expected), \
        f"{what}: NaN gradient rows {torch.isnan(grad).any(dim=1).tolist()}, expected {expected.tolist()}"
    ok = ~expected
    if not ok.any():
        return
    assert torch.isfinite(loss[ok]).all() and torch.isfinite(grad[ok]).all(), f"{what}: non-finite good rows"
    (low_loss, low_grad), (exact_loss, exact_grad) = reference_pair(inputs, margin)
    if bounds_style:  # Triton: the bounds of tests/bounds.py, as tests/test_triton.py
        x, k, _, w, _ = inputs
        w_finite = torch.where(torch.isfinite(w), w, torch.zeros_like(w))  # no slot a good row keeps
        delta = cosine_rounding(x[ok], w_finite, w.dtype)
        scale = margin["scale"]
        assert_loss_close(loss[ok], exact_loss[ok].to(loss.device), scale=scale, delta=delta, what=f"{what} loss")
        slope = positive_slope(x[ok], k[ok], margin.get("m1", 1.0), margin.get("m2", 0.0), scale,
                               margin.get("straight_through_margin", False))
        assert_grad_close(grad[ok], exact_grad[ok].to(grad.device), embeddings=x[ok], scale=scale, delta=delta,
                          slope=slope, gemm_dtype=w.dtype, what=f"{what} gradient")
        return
    assert_within(loss[ok], exact_loss[ok], low_loss[ok], dtype=dtype, what=f"{what} loss")
    assert_within(grad[ok], exact_grad[ok], low_grad[ok], dtype=dtype, what=f"{what} gradient")


_REFERENCE_CACHE = {}


def reference_pair(inputs, margin):
    """The reference on the inputs as they are and in float64, ((loss, grad), (loss, grad)),
    computed once per inputs and margin (the backends' tests share them)."""
    key = (tuple((t.dtype, tuple(t.shape), t.cpu().numpy().tobytes()) for t in inputs), tuple(sorted(margin.items())))
    if key not in _REFERENCE_CACHE:
        _REFERENCE_CACHE[key] = (loss_and_grad(reference.dcq_cross_entropy, inputs, margin),
                                 loss_and_grad(reference.dcq_cross_entropy, inputs, margin, dtype=torch.float64))
    return _REFERENCE_CACHE[key]


def scenarios():
    for place in PLACES:
        for name in VALUES:
            yield f"{place}-{name}", (lambda place=place, name=name: poisoned_inputs(place, VALUES[name]))
    for name in VALUES:
        yield f"all_excluded-{name}", (lambda name=name: all_excluded_inputs(VALUES[name]))


SCENARIOS = dict(scenarios())


# ----------------------------------------------------------------------------
# Non-finite input


def test_the_scenarios_cover_the_rule():
    """Every scenario has NaN rows and finite rows; the queue slot is kept by some
    rows and excluded by others; the all-excluded scenario has a finite row that
    keeps nothing."""
    for what, make in SCENARIOS.items():
        nan_rows = rule_nan_rows(make())
        assert nan_rows.any() and not nan_rows.all(), what
    x, k, y, w, yq = poisoned_inputs("queue_slot", float("nan"))
    assert rule_nan_rows((x, k, y, w, yq))[:3].logical_not().all()
    x, k, y, w, yq = all_excluded_inputs()
    assert not ((yq.view(1, -1) != y.view(-1, 1)) & (yq.view(1, -1) >= 0))[:2].any()


@pytest.mark.parametrize("margin_name", MARGIN_NAMES)
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_reference(scenario, margin_name):
    inputs = SCENARIOS[scenario]()
    margin = MARGINS[margin_name]
    for dtype in (torch.float32, torch.float64):
        loss, grad = loss_and_grad(reference.dcq_cross_entropy, cast(inputs, dtype), margin)
        check_rows(loss, grad, cast(inputs, dtype), margin, dtype=dtype, what=f"reference {dtype}")
    if scenario.startswith("all_excluded"):
        loss, grad = loss_and_grad(reference.dcq_cross_entropy, inputs, margin)
        assert loss[1] == 0 and torch.all(grad[1] == 0)


@needs_extension
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("dtype,margin_name", [(torch.float32, "arcface"), (torch.float32, "cosface_filtered"),
                                               (torch.float64, "cosface_filtered")], ids=str)
def test_chunked(scenario, margin_name, dtype):
    inputs = cast(SCENARIOS[scenario](), dtype)
    margin = MARGINS[margin_name]
    loss, grad = loss_and_grad(chunked, inputs, margin)
    check_rows(loss, grad, inputs, margin, dtype=dtype, what=f"chunked {dtype}")
    if scenario.startswith("all_excluded"):
        assert loss[1] == 0 and torch.all(grad[1] == 0)


def chunked_op(x, k, y, w, yq, *, chunk_size, reduction, **margin):
    """The op with an explicit chunk size (dcq_cross_entropy picks its own)."""
    assert reduction == "none"
    loss, grad = torch.ops.dcq_ops.dcq_cross_entropy(
        x.detach(), k, y, w, yq, margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0),
        margin.get("m3", 0.0), margin.get("interclass_filtering_threshold", 0.0),
        margin.get("straight_through_margin", False), True, chunk_size)
    return _WithGrad.apply(x, loss, grad)


class _WithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, loss, grad):
        ctx.save_for_backward(grad)
        return loss.clone()

    @staticmethod
    def backward(ctx, upstream):
        (grad,) = ctx.saved_tensors
        return upstream.unsqueeze(1).to(grad) * grad, None, None


@needs_extension
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_chunked_op_many_chunks(scenario):
    """The chunk loop of the CPU queue pass: non-finite values in a later chunk
    than the row's max, and in chunks the row keeps nothing of."""
    inputs = SCENARIOS[scenario]()
    margin = MARGINS["cosface_filtered"]
    for chunk_size in (7, 16, 1000):
        loss, grad = loss_and_grad(chunked_op, inputs, margin, chunk_size=chunk_size)
        check_rows(loss, grad, inputs, margin, dtype=torch.float32, what=f"chunked op chunk {chunk_size}")


@needs_triton
@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_triton(scenario, dtype):
    inputs = to_device(cast(SCENARIOS[scenario](), dtype))
    margin = MARGINS["cosface_filtered"]
    loss, grad = loss_and_grad(triton_backend, inputs, margin)
    check_rows(loss.cpu(), grad.cpu(), tuple(t.cpu() for t in inputs), margin, dtype=torch.float32,
               what=f"triton {dtype}", bounds_style=True)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_merged_partials_of_queue_slices(backend):
    """The sharded queue's path: partials of two slices, one holding the NaN
    slot, merged by dcq_ops.algebra.merge, then finalised."""
    from dcq_ops.algebra import merge
    from dcq_ops.loss_kernels import LossKernels

    if backend == "chunked" and not dcq_ops.extension_loaded():
        pytest.skip(dcq_ops.EXTENSION_ERROR)
    if backend == "triton" and not TRITON_OK:
        pytest.skip("Triton missing, or imported compiled without a GPU")
    margin = dcq_ops.MarginConfig(50.0, 1.0, 0.0, 0.3)
    kernels = LossKernels(margin, backend=backend)
    for value in VALUES.values():
        inputs = poisoned_inputs("queue_slot", value)
        x, k, y, w, yq = to_device(inputs)
        slot = int(torch.nonzero(~torch.isfinite(w).all(dim=1))[0])
        for cuts in ([0, slot + 1, w.shape[0]], [0, 35, w.shape[0]]):  # the NaN slot last / first in its slice
            parts = [kernels.partials(x, y, w[a:b], yq[a:b], compute_grad=True) for a, b in zip(cuts, cuts[1:])]
            loss, grad = kernels.finalize(x, k, merge(parts), compute_grad=True)
            check_rows(loss.cpu(), grad.cpu(), inputs, margin.kwargs(), dtype=torch.float32,
                       what=f"{backend} slices {cuts} value {value}", bounds_style=backend == "triton")


# ----------------------------------------------------------------------------
# Huge magnitudes


MAGNITUDES = [1e19, 1e24, 1e30]


def check_magnitudes(fn, *, bounds_style=False, **kwargs):
    inputs = base_inputs(seed=2)
    x, k, y, w, yq = inputs
    margin = MARGINS["arcface"]
    exact_loss, exact_grad = loss_and_grad(reference.dcq_cross_entropy, inputs, margin, dtype=torch.float64)
    low_loss, low_grad = loss_and_grad(reference.dcq_cross_entropy, inputs, margin)
    for magnitude in MAGNITUDES:
        scaled = to_device((x * magnitude, k * magnitude, y, w, yq))
        assert torch.isfinite(scaled[0]).all()
        loss, grad = loss_and_grad(fn, scaled, margin, **kwargs)
        loss, grad = loss.cpu(), grad.cpu()
        unscaled_grad = grad.double() * magnitude  # the gradient of a norm-invariant loss scales as 1/|x|
        what = f"magnitude {magnitude:g}"
        if bounds_style:
            delta = cosine_rounding(x, w, w.dtype)
            assert_loss_close(loss, exact_loss, scale=margin["scale"], delta=delta, what=f"{what} loss")
            slope = positive_slope(x, k, margin["m1"], margin["m2"], margin["scale"])
            assert_grad_close(unscaled_grad, exact_grad, embeddings=x, scale=margin["scale"], delta=delta,
                              slope=slope, gemm_dtype=w.dtype, what=f"{what} gradient")
        else:
            assert_within(loss, exact_loss, low_loss, dtype=torch.float32, what=f"{what} loss")
            # The rescaling by the magnitude rounds once more: one more ulp of the largest gradient.
            assert_within(unscaled_grad, exact_grad, low_grad, dtype=torch.float32, what=f"{what} gradient")


def test_huge_magnitudes_reference():
    check_magnitudes(reference.dcq_cross_entropy)


@needs_extension
def test_huge_magnitudes_chunked():
    check_magnitudes(chunked)


@needs_triton
def test_huge_magnitudes_triton():
    check_magnitudes(triton_backend, bounds_style=True)


@pytest.mark.parametrize("kernel", ["compiled", "fallback"])
@pytest.mark.parametrize("magnitude", [1e20, 1e30])
def test_enqueue_stores_unit_rows_for_any_magnitude(kernel, magnitude):
    from dcq_ops.ops.queue import enqueue_fallback

    if kernel == "compiled" and not dcq_ops.extension_loaded():
        pytest.skip(dcq_ops.EXTENSION_ERROR)
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(5, 16, generator=g)
    scaled = keys * magnitude
    assert torch.isfinite(scaled).all() and (scaled != 0).all()
    queue = dcq_ops.ClassQueue(8, 16)
    if kernel == "compiled":
        queue.enqueue(scaled, torch.arange(5))
    else:
        enqueue_fallback(queue.weights, queue.labels, queue.ptr, scaled, torch.arange(5))
    expected = keys.double() / keys.double().norm(dim=1, keepdim=True)
    torch.testing.assert_close(queue.weights[:5].double(), expected, atol=16 * 2.0**-24, rtol=0)
    assert torch.all(queue.weights[5:] == 0)


def test_enqueue_of_a_zero_key_stores_a_zero_row():
    from dcq_ops.ops.queue import enqueue_fallback

    for kernel in ("compiled", "fallback"):
        if kernel == "compiled" and not dcq_ops.extension_loaded():
            continue
        queue = dcq_ops.ClassQueue(4, 6)
        keys = torch.randn(2, 6)
        keys[1] = 0
        if kernel == "compiled":
            queue.enqueue(keys, torch.arange(2))
        else:
            enqueue_fallback(queue.weights, queue.labels, queue.ptr, keys, torch.arange(2))
        assert torch.all(queue.weights[1] == 0), kernel
        assert math.isclose(queue.weights[0].norm().item(), 1.0, rel_tol=1e-6), kernel


# ----------------------------------------------------------------------------
# Every CPU epilogue variant

ORDER = ["default", "avx2", "avx512"]


def _runnable(capability: str) -> bool:
    best = torch.backends.cpu.get_cpu_capability().lower()
    best = "avx512" if best.startswith("avx512") else best
    return best in ORDER and ORDER.index(capability) <= ORDER.index(best)


@needs_extension
@pytest.mark.parametrize("capability", ORDER)
def test_every_cpu_epilogue_variant(capability):
    """The fp32 chunked tests above (every scenario, several chunk sizes), in a
    process whose ATEN_CPU_CAPABILITY picks the variant (chosen once per
    process); this process's own variant ran them already."""
    from dcq_ops._extension import cpu_capability

    if not _runnable(capability):
        pytest.skip(f"this CPU cannot run the {capability} variant")
    if capability == cpu_capability():
        pytest.skip(f"{capability} is this process's variant: the tests above ran on it")
    env = dict(os.environ, ATEN_CPU_CAPABILITY=capability)
    env.pop("DCQ_OPS_CPU_GEMM", None)  # a narrower capability may lack the named GEMMs: let it choose
    tests = Path(__file__).resolve().parent
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__).resolve()),
         "-k", "chunked_op or huge_magnitudes_chunked or slices and chunked"],
        capture_output=True, text=True, env=env, timeout=300, cwd=tests.parent)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout
    check = subprocess.run([sys.executable, "-c", "import dcq_ops._extension as e; print(e.cpu_capability())"],
                           capture_output=True, text=True, env=env, timeout=120)
    assert check.stdout.strip() == capability, check.stdout + check.stderr
