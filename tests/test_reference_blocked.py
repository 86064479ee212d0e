"""The reference in blocks (dcq_ops.reference.loss_rows_blocked) against the plain
reference, and the memory of the fallback that runs it.

``loss_rows_blocked`` computes docs/loss.md block by block of rows and queue slots,
with the gradient produced in the forward: the same numbers as the plain oracle (in
float64 to its rounding), every rule of §2 included (exclusion, filtering, the
straight-through margin, non-finite input), and memory that does not grow with N×K.
``backend="reference"`` (and so ``backend="auto"`` without a compiled kernel) runs it
above ``reference.BLOCK_LOGITS`` logits.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dcq_ops
from dcq_ops import reference
from dcq_ops.margin import MarginConfig
from inputs import MARGINS, make_inputs

ROOT = Path(__file__).resolve().parents[1]
# float64 sums in another order (blocks of slots, then of blocks): a few units of 2^-53
# times the number of terms, far below this.
FLOAT64_RTOL = 1e-12


def plain(inputs, margin, weights):
    x, *rest = inputs
    x = x.detach().clone().requires_grad_(True)
    loss = reference.dcq_cross_entropy(x, *rest, **margin, reduction="none")
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def blocked(inputs, margin, weights, **blocks):
    x, *rest = inputs
    x = x.detach().clone().requires_grad_(True)
    loss = reference.loss_rows_blocked(x, *rest, MarginConfig(**margin), **blocks)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def assert_same(a, b, what):
    """Equal NaN patterns, finite values within FLOAT64_RTOL of the largest."""
    assert torch.equal(a.isnan(), b.isnan()), f"{what}: NaN where the plain reference is not (or not where it is)"
    finite = ~a.isnan()
    scale = b[finite].abs().max().item() if finite.any() else 0.0
    err = (a[finite] - b[finite]).abs().max().item() if finite.any() else 0.0
    assert err <= FLOAT64_RTOL * max(scale, 1e-300), f"{what}: error {err:.3e} of {scale:.3e}"


def weights_of(rows):
    g = torch.Generator().manual_seed(5)
    return 0.5 + torch.rand(rows, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("blocks", [dict(block_rows=1, block_slots=1), dict(block_rows=5, block_slots=17),
                                    dict(block_rows=64, block_slots=1000), {}])
def test_blocked_equals_the_plain_reference(name, blocks):
    inputs = make_inputs(rows=23, dim=13, slots=71, num_classes=9, empty=7, dtype=torch.float64, seed=2)
    margin = MARGINS[name]
    weights = weights_of(23)
    loss, grad = blocked(inputs, margin, weights, **blocks)
    exact_loss, exact_grad = plain(inputs, margin, weights)
    assert loss.dtype == torch.float64
    assert_same(loss, exact_loss, f"{name} loss")
    assert_same(grad, exact_grad, f"{name} gradient")


def test_blocked_in_float64_on_fp32_and_16_bit_inputs():
    """``dtype``: the arithmetic (float64 gives the exact answer for the rounded inputs);
    by default float32 for fp32/fp16/bf16 inputs, as the plain reference."""
    x, k, y, w, yq = make_inputs(rows=9, dim=16, slots=40, seed=4)
    margin = MarginConfig(**MARGINS["arcface"])
    for inputs in [(x, k, y, w, yq), (x.half(), k.half(), y, w.bfloat16(), yq)]:
        exact = reference.dcq_cross_entropy(*(t.double() if t.is_floating_point() else t for t in inputs),
                                            **margin.kwargs(), reduction="none")
        as_float64 = reference.loss_rows_blocked(*inputs, margin, dtype=torch.float64, block_rows=4, block_slots=9)
        assert as_float64.dtype == torch.float64
        assert_same(as_float64, exact, "float64")
        default = reference.loss_rows_blocked(*inputs, margin, block_rows=4, block_slots=9)
        assert default.dtype == torch.float32
        assert torch.allclose(default.double(), exact, rtol=1e-5, atol=1e-5)


def test_gradient_in_the_embeddings_dtype_and_rows_without_negatives():
    """A row whose every slot is excluded has loss 0 and gradient 0; an empty queue and an
    empty batch work; the gradient comes back in the embeddings' dtype."""
    x, k, y, w, yq = make_inputs(rows=6, dim=8, slots=12, num_classes=3, empty=0, seed=8)
    yq = torch.where(torch.arange(12) % 2 == 0, y[0], torch.tensor(-1))  # row 0 (and its class) excludes all
    margin = MARGINS["cosface"]
    weights = weights_of(6)
    for inputs in [(x, k, y, w, yq), (x, k, y, w[:0], yq[:0]), (x[:0], k[:0], y[:0], w, yq)]:
        xx = inputs[0].half()
        loss, grad = blocked((xx,) + inputs[1:], margin, weights[:xx.shape[0]], block_rows=4, block_slots=5)
        exact_loss, exact_grad = plain((xx.double(),) + inputs[1:], margin, weights[:xx.shape[0]])
        assert grad.dtype == torch.float16 and grad.shape == xx.shape
        assert torch.allclose(loss.double(), exact_loss, rtol=1e-5, atol=1e-6)
        assert torch.allclose(grad.double(), exact_grad, rtol=2e-3, atol=1e-4)
    loss, grad = blocked((x, k, y, w, yq), margin, weights, block_rows=4, block_slots=5)
    excluded_rows = y == y[0]
    assert (loss[excluded_rows] == 0).all() and (grad[excluded_rows] == 0).all()


def test_without_grad_mode_only_the_loss_is_computed(monkeypatch):
    """Under no_grad (the first-contact check's comparisons, evaluation) the blocked rows
    skip the gradient pass: the same loss, nothing recorded."""
    x, k, y, w, yq = make_inputs(rows=9, dim=8, slots=30, dtype=torch.float64, seed=3)
    x.requires_grad_(True)
    passes = []
    original = reference._block_of_rows
    monkeypatch.setattr(reference, "_block_of_rows", lambda *a: passes.append(a[-1]) or original(*a))
    margin = MarginConfig(**MARGINS["arcface"])
    with torch.no_grad():
        loss = reference.loss_rows_blocked(x, k, y, w, yq, margin, block_rows=4, block_slots=7)
    assert not loss.requires_grad and passes == [False] * 3
    assert_same(loss, reference.dcq_cross_entropy(x, k, y, w, yq, **margin.kwargs(), reduction="none").detach(),
                "loss")


@pytest.mark.parametrize("where", ["embedding", "class_weight", "kept_slot", "excluded_slot", "inf_embedding"])
def test_non_finite_input_is_never_hidden(where):
    """docs/loss.md, "Non-finite input": NaN exactly where the plain reference is NaN."""
    x, k, y, w, yq = make_inputs(rows=10, dim=8, slots=30, num_classes=4, empty=3, dtype=torch.float64, seed=6)
    if where == "embedding":
        x[3, 2] = float("nan")
    elif where == "inf_embedding":
        x[4, 0] = float("inf")
    elif where == "class_weight":
        k[5, 1] = float("inf")
    else:
        slot = int((yq >= 0).nonzero()[0])
        w[slot, 3] = float("nan")
        if where == "excluded_slot":
            y = torch.where(torch.arange(10) < 5, yq[slot], y)  # rows 0-4 exclude it; the others keep it
    inputs = (x, k, y, w, yq)
    margin = MARGINS["cosface_filtered"]
    weights = weights_of(10)
    loss, grad = blocked(inputs, margin, weights, block_rows=3, block_slots=7)
    exact_loss, exact_grad = plain(inputs, margin, weights)
    assert loss.isnan().any()
    assert_same(loss, exact_loss, f"{where} loss")
    assert_same(grad, exact_grad, f"{where} gradient")


def test_the_backward_does_not_read_the_queue():
    """DCQLoss overwrites the queue in place before backward() runs: the gradient is the
    one of the queue at the forward."""
    inputs = make_inputs(rows=7, dim=8, slots=25, dtype=torch.float64, seed=1)
    x, k, y, w, yq = inputs
    margin = MARGINS["arcface"]
    xx = x.clone().requires_grad_(True)
    loss = reference.loss_rows_blocked(xx, k, y, w, yq, MarginConfig(**margin), block_rows=3, block_slots=4)
    w.copy_(torch.nn.functional.normalize(torch.randn_like(w), dim=1))  # the enqueue
    yq.fill_(-1)
    loss.sum().backward()
    _, exact_grad = plain(make_inputs(rows=7, dim=8, slots=25, dtype=torch.float64, seed=1), margin,
                          torch.ones(7, dtype=torch.float64))
    assert_same(xx.grad, exact_grad, "gradient")


def test_second_derivative_is_a_clear_error_and_bad_blocks_are_refused():
    x, k, y, w, yq = make_inputs(rows=4, dim=5, slots=6)
    margin = MarginConfig()
    xx = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference.loss_rows_blocked(xx, k, y, w, yq, margin).sum(), xx,
                                  create_graph=True)
    with pytest.raises(RuntimeError, match="first derivative only.*reference.dcq_cross_entropy"):
        torch.autograd.grad(grad.square().sum(), xx)
    with pytest.raises(ValueError, match="block_rows must be a positive int.*got 0"):
        reference.loss_rows_blocked(x, k, y, w, yq, margin, block_rows=0)
    with pytest.raises(ValueError, match="block_slots must be a positive int.*got -3"):
        reference.loss_rows_blocked(x, k, y, w, yq, margin, block_slots=-3)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype.*int32"):
        reference.loss_rows_blocked(x, k, y, w, yq, margin, dtype=torch.int32)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_the_reference_backend_runs_blocked_above_its_threshold(monkeypatch, reduction):
    """backend="reference" on more than BLOCK_LOGITS logits: the blocked rows, with every
    reduction, equal to the plain reference."""
    inputs = make_inputs(rows=19, dim=9, slots=50, dtype=torch.float64, seed=12)
    margin = MARGINS["combined"]
    calls = []
    original = reference.loss_rows_blocked
    monkeypatch.setattr(reference, "BLOCK_LOGITS", 64)
    monkeypatch.setattr(reference, "loss_rows_blocked", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    x, *rest = inputs
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = dcq_ops.dcq_cross_entropy(xa, *rest, **margin, reduction=reduction, backend="reference")
    want = reference.dcq_cross_entropy(xb, *rest, **margin, reduction=reduction)
    assert calls, "the reference backend did not run the blocked rows"
    (got.sum() if reduction == "none" else got).backward()
    (want.sum() if reduction == "none" else want).backward()
    assert_same(got.detach(), want.detach(), "loss")
    assert_same(xa.grad, xb.grad, "gradient")


# ----------------------------------------------------------------------------- memory

# The fallback measured in a fresh process: "auto" with no compiled extension (as a plain
# `pip install .` leaves it) runs the reference on the whole batch. The peak resident
# memory of the call (forward and backward), above what the process held before it, read
# from /proc/self/status (VmHWM, reset through /proc/self/clear_refs), after a first small
# call (imports, thread pools and BLAS buffers are not the algorithm's). glibc's
# MALLOC_MMAP_THRESHOLD_ is fixed so that every freed block goes back to the system: the
# high-water mark is then the live peak, not what malloc's heap kept of earlier blocks.
_FALLBACK = r"""
import importlib, json, sys, warnings
import torch
import dcq_ops
backends = importlib.import_module("dcq_ops.backends")
backends.extension_loaded = lambda: False
backends.EXTENSION_ERROR = "dcq_ops._C is not built (test)"
rows, slots, dim = (int(a) for a in sys.argv[1:4])
g = torch.Generator().manual_seed(0)
def inputs(rows, slots):
    x = torch.randn(rows, dim, generator=g).requires_grad_(True)
    k = torch.randn(rows, dim, generator=g)
    y = torch.randint(0, 1000, (rows,), generator=g)
    w = torch.nn.functional.normalize(torch.randn(slots, dim, generator=g), dim=1)
    yq = torch.randint(-1, 1000, (slots,), generator=g)
    return x, k, y, w, yq
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    dcq_ops.dcq_cross_entropy(*inputs(8, 8)).backward()  # warm-up, of both paths of the reference
    small = inputs(8, 8)
    dcq_ops.reference.loss_rows_blocked(*small, dcq_ops.MarginConfig(), block_rows=3, block_slots=3).sum().backward()
    x, k, y, w, yq = inputs(rows, slots)
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the peak restarts from the present
    loss = dcq_ops.dcq_cross_entropy(x, k, y, w, yq)
    loss.backward()
print(json.dumps(dict(peak=status("VmHWM") - before, loss=loss.item(), finite=bool(torch.isfinite(x.grad).all()),
                      warned=any("'reference'" in str(c.message) for c in caught))))
"""


def _clear_refs_works() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _clear_refs_works(),
                    reason="needs Linux's /proc/self/clear_refs to measure a peak")
def test_the_fallback_peak_memory_does_not_grow_with_the_logits():
    """N = 256, K = 2^16, D = 64: one N×K fp32 tensor is 64 MiB, and the plain reference
    keeps several (cosines, masks, logits, exponentials and their gradients). The blocked
    rows hold a few [block_rows, block_slots] tensors (4 MiB each by default) at a time, a
    queue block [block_slots, D] and O(N D): the bound allows 8 blocks, 4 queue blocks,
    16 [N, D] tensors and 4 MiB of slack, 41 MiB, less than one N×K tensor."""
    rows, slots, dim = 256, 1 << 16, 64
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536", PYTHONPATH=str(ROOT))
    done = subprocess.run([sys.executable, "-c", _FALLBACK, str(rows), str(slots), str(dim)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["warned"], "the call did not fall back to the reference"
    assert result["finite"] and result["loss"] > 0
    block_rows = min(rows, reference.BLOCK_ROWS)
    block_slots = reference.BLOCK_LOGITS // max(block_rows, dim)
    bound = (8 * block_rows * block_slots + 4 * block_slots * dim + 16 * rows * dim) * 4 + 4 * 2**20
    logits_bytes = rows * slots * 4
    assert bound < logits_bytes
    assert result["peak"] <= bound, (
        f"peak {result['peak'] / 2**20:.1f} MiB > {bound / 2**20:.1f} MiB "
        f"(one N x K fp32 tensor: {logits_bytes / 2**20:.0f} MiB)")
