"""Tolerances from an error model, in the manner of flash-attention's tests.

A fast backend that computes in dtype T (fp32, or fp64 for float64 inputs)
must be within a small multiple of the error that the plain reference, run on
the same inputs (so also in T, and returning the gradient in the embeddings'
dtype, as the backends do), makes against the reference in float64:

    max |fast - exact|  <=  FACTOR * max |reference_T - exact|  +  FLOOR_ULPS * u_T * max |exact|

The first term scales with whatever the inputs make hard (the embedding size,
the scale s, cancellation in a row); it is measured, not guessed, so the same
test holds on any CPU, BLAS and thread count. The floor covers inputs on which
the reference happens to be exact. In float64 the reference *is* the exact
answer, so there is no measured term: a float64 result must then be within
FLOAT64_RELATIVE of the largest exact value, the package's promise for float64
(ten times better than float32 can do, far looser than float64's own noise). What rounding the GEMM operands to 16 bits
costs is bounded separately, analytically, in tests/bounds.py.
"""

from __future__ import annotations

import torch

from dcq_ops import reference

FACTOR = 4.0
FLOOR_ULPS = 16.0
FLOAT64_RELATIVE = 1e-7
UNIT_ROUNDOFF = {torch.float32: 2.0**-24}


def loss_and_grad(fn, inputs, margin, *, dtype=None, reduction="none", row_weights=None, **kwargs):
    """(loss, gradient with respect to the embeddings) of ``fn`` on ``inputs``
    (embeddings, class_weights, labels, queue_weights, queue_labels), with the
    floating inputs cast to ``dtype`` first when it is given. The backward of
    "none" is weighted by ``row_weights`` (default all ones)."""
    x, k, y, w, yq = inputs
    if dtype is not None:
        x, k, w = x.to(dtype), k.to(dtype), w.to(dtype)
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x, k, y, w, yq, **margin, reduction=reduction, **kwargs)
    if reduction == "none":
        weights = torch.ones_like(loss) if row_weights is None else row_weights.to(loss)
        (loss * weights).sum().backward()
    else:
        loss.backward()
    return loss.detach(), x.grad


def compute_dtype(inputs) -> torch.dtype:
    """T: float64 when an input is float64, else float32 (what every backend accumulates in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in inputs if t.is_floating_point()) else torch.float32


def reference_pair(inputs, margin, **kwargs):
    """The reference on the inputs as they are (it computes in T) and in float64:
    ((loss_T, grad_T), (loss_64, grad_64))."""
    low = loss_and_grad(reference.dcq_cross_entropy, inputs, margin, **kwargs)
    exact = loss_and_grad(reference.dcq_cross_entropy, inputs, margin, dtype=torch.float64, **kwargs)
    return low, exact


def bound(reference_low: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype) -> float:
    base = (reference_low.double() - exact.double()).abs().max().item() if exact.numel() else 0.0
    scale = exact.double().abs().max().item() if exact.numel() else 0.0
    if dtype == torch.float64:
        return FLOAT64_RELATIVE * scale
    return FACTOR * base + FLOOR_ULPS * UNIT_ROUNDOFF[dtype] * scale


def assert_within(fast: torch.Tensor, exact: torch.Tensor, reference_low: torch.Tensor, *, dtype: torch.dtype,
                  what: str = "result") -> None:
    """``fast`` (computed in ``dtype``) within the error model of the module docstring."""
    assert fast.shape == exact.shape, f"{what}: shape {tuple(fast.shape)}, expected {tuple(exact.shape)}"
    assert torch.isfinite(fast).all(), f"{what}: non-finite values"
    err = (fast.double() - exact.double()).abs()
    limit = bound(reference_low, exact, dtype)
    worst = err.argmax().item() if err.numel() else 0
    assert err.numel() == 0 or err.max().item() <= limit, (
        f"{what}: error {err.max().item():.3e} at flat index {worst} > bound {limit:.3e} "
        f"(reference in {dtype} errs by {(reference_low.double() - exact.double()).abs().max().item():.3e})")


def assert_backend_within(fast_loss, fast_grad, inputs, margin, *, what="", **kwargs):
    """Loss and gradient of a fast backend on ``inputs`` against the reference pair."""
    dtype = compute_dtype(inputs)
    (low_loss, low_grad), (exact_loss, exact_grad) = reference_pair(inputs, margin, **kwargs)
    assert_within(fast_loss, exact_loss, low_loss, dtype=dtype, what=f"{what} loss")
    assert_within(fast_grad, exact_grad, low_grad, dtype=dtype, what=f"{what} gradient")
