"""Every backend over the whole finite fp32 range of the embeddings (docs/loss.md,
"Numerics", "Any magnitude"): rows of values near 1e38 (norms beyond float32's
maximum, gradients whose entries are subnormal in fp32), rows below
F.normalize's 1e-12 floor, and the ordinary range between.

The loss and gradient of each backend computed in fp32 are held to the
float64 reference on the same inputs within the error model of tests/bounds.py
(fp32 queue: no operand rounding, so only the fp32 arithmetic's relative terms).
The Triton backend has its own module (tests/test_triton_magnitudes.py), since
it needs the interpreter at import.
"""

import warnings

import pytest
import torch

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, positive_slope
from dcq_ops import reference
from dcq_ops.margin import MarginConfig
from inputs import MARGINS, make_inputs

# The largest magnitude of each row: from a subnormal, through F.normalize's
# 1e-12 floor (a row of 1e-13 has norm ~ 1e-12: its normalisation is x / 1e-12,
# without the projection) and the ordinary range, to float32's maximum (rows of
# 1e38 and 3e38 have norms beyond it: sqrt(D) * 1e38 > 3.4e38).
MAGNITUDES = [1e-40, 1e-30, 1e-13, 1.0, 1e19, 1e30, 1e38, 3e38]
DIM = 64
# Subnormal in fp32: below 2^-126.
FP32_TINY = torch.finfo(torch.float32).tiny


def rows_of_magnitudes(seed, magnitudes=MAGNITUDES, per_magnitude=2, dim=DIM, slots=53):
    """make_inputs' rows, each rescaled so that its largest magnitude is one of ``magnitudes``
    (computed in float64, then rounded to fp32 once)."""
    rows = len(magnitudes) * per_magnitude
    x, k, y, w, yq = make_inputs(rows=rows, dim=dim, slots=slots, num_classes=11, empty=5, dtype=torch.float64,
                                 seed=seed)
    target = torch.tensor(magnitudes, dtype=torch.float64).repeat_interleave(per_magnitude).view(-1, 1)
    x = x / x.abs().amax(dim=1, keepdim=True) * target
    return x.float(), k.float(), y, w.float(), yq


def exact(inputs, margin, weights):
    """The plain reference in float64 on the same fp32 inputs: (loss rows, gradient)."""
    x, k, y, w, yq = (t.double() if t.is_floating_point() else t for t in inputs)
    x = x.clone().requires_grad_(True)
    loss = reference.dcq_cross_entropy(x, k, y, w, yq, **margin, reduction="none")
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


def check(loss, grad, inputs, margin, weights, what):
    """fp32 loss rows and gradient within tests/bounds.py of the float64 reference."""
    x, k = inputs[0], inputs[1]
    exact_loss, exact_grad = exact(inputs, margin, weights)
    zero = torch.zeros(x.shape[0], dtype=torch.float64)  # fp32 queue: no operand rounding
    scale = margin["scale"]
    assert loss.dtype == torch.float32 and grad.dtype == torch.float32
    assert_loss_close(loss, exact_loss, scale=scale, delta=zero, what=f"{what} loss")
    slope = positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), scale,
                           margin.get("straight_through_margin", False))
    assert_grad_close(grad, exact_grad, embeddings=x, scale=scale, delta=zero, slope=slope,
                      gemm_dtype=torch.float32, row_weights=weights, what=f"{what} gradient")


def public_loss_and_grad(inputs, margin, weights, backend):
    x, *rest = inputs
    x = x.clone().requires_grad_(True)
    with warnings.catch_warnings():
        # A first-contact demotion would hand the backend's call to the reference: refuse it here.
        warnings.simplefilter("error", RuntimeWarning)
        loss = dcq_ops.dcq_cross_entropy(x, *rest, **margin, reduction="none", backend=backend)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def blocked_loss_and_grad(inputs, margin, weights):
    x, *rest = inputs
    x = x.clone().requires_grad_(True)
    loss = reference.loss_rows_blocked(x, *rest, MarginConfig(**margin), block_rows=5, block_slots=7)
    (loss * weights.to(loss.dtype)).sum().backward()
    return loss.detach(), x.grad


def upstream(rows, seed=3):
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(rows, generator=g, dtype=torch.float64)


BACKENDS = ["reference", "reference_blocked", "chunked"]


def run(backend, inputs, margin, weights):
    if backend == "reference_blocked":
        return blocked_loss_and_grad(inputs, margin, weights)
    if backend == "chunked" and not dcq_ops.extension_loaded():
        pytest.skip("the compiled extension is not built")
    return public_loss_and_grad(inputs, margin, weights, backend)


@pytest.mark.parametrize("margin_name", ["arcface", "cosface_filtered", "sphereface", "arcface_straight_through"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_magnitude_matches_float64(backend, margin_name):
    margin = MARGINS[margin_name]
    inputs = rows_of_magnitudes(seed=7)
    weights = upstream(inputs[0].shape[0])
    loss, grad = run(backend, inputs, margin, weights)
    check(loss, grad, inputs, margin, weights, f"{backend}, {margin_name}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_near_float32_max(backend):
    """Rows of values near 1e38, whose norm overflows fp32. The loss is the loss of
    x / 1e38 (the reference normalised such a row to zero before, and the first-contact
    check then demoted a right chunked backend), and the gradient, ~1e-39 an entry, is
    that of float64 within the fp32 arithmetic's error (chunked's was 0 before)."""
    margin = MARGINS["arcface"]
    inputs = rows_of_magnitudes(seed=5, magnitudes=[1e38, 2e38, 3.4e38], per_magnitude=4, dim=128)
    x = inputs[0]
    assert not torch.isfinite(x.double().norm(dim=1).float()).any(), "the rows' norms must overflow fp32"
    weights = upstream(x.shape[0])
    loss, grad = run(backend, inputs, margin, weights)
    unit_loss, _ = exact((x.double() / 1e38,) + inputs[1:], margin, weights)
    exact_loss, exact_grad = exact(inputs, margin, weights)
    assert torch.allclose(exact_loss, unit_loss, rtol=1e-12, atol=0), "the loss does not depend on the row's scale"
    subnormal = (exact_grad.abs() < FP32_TINY) & (exact_grad != 0)
    assert subnormal.float().mean() > 0.5, "most of the exact gradient's entries must be subnormal in fp32"
    check(loss, grad, inputs, margin, weights, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_subnormal_gradient_entries_are_rounded_once(backend):
    """Entry by entry, for rows whose exact gradient is subnormal in fp32 almost everywhere:
    each fp32 entry within its row's fp32 arithmetic error (the gradient model of
    dcq_ops.rounding_bound: 2 (K + D + 8) u of the row's norm) plus half the subnormal
    spacing, 2^-150: the arithmetic happens in the row's units, and only the last step
    rounds to a subnormal. (Before, such rows got a zero or non-finite gradient.)"""
    margin = MARGINS["cosface"]
    slots, dim = 53, 256
    inputs = rows_of_magnitudes(seed=9, magnitudes=[3e38], per_magnitude=6, dim=dim, slots=slots)
    weights = torch.ones(inputs[0].shape[0], dtype=torch.float64)
    _, grad = run(backend, inputs, margin, weights)
    _, exact_grad = exact(inputs, margin, weights)
    assert ((exact_grad.abs() < FP32_TINY) & (exact_grad != 0)).float().mean() > 0.9
    row_norm = exact_grad.norm(dim=1, keepdim=True)
    u = 2.0**-24
    bound = 2 * (slots + dim + 8) * u * row_norm + 2.0**-150
    err = (grad.double() - exact_grad).abs()
    worst = (err - bound).argmax()
    assert torch.isfinite(grad).all() and (err <= bound).all(), (
        f"{backend}: entry {worst.item()} error {err.flatten()[worst].item():.3e} > "
        f"bound {bound.expand_as(err).flatten()[worst].item():.3e}")
