"""The chunked backend (C++ kernels) against the reference, loss and gradient.

Errors are measured against the reference in float64 on the same (rounded)
inputs; the chunked backend accumulates in fp32, so its error is bounded by a
small multiple of the error of the reference itself run in fp32 (the
flash-attention test idea), plus a floor for fp32 rounding."""

import pytest
import torch

import dcq_ops
from dcq_ops import reference
from inputs import MARGINS, make_inputs

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")


def loss_and_grad(fn, x, *rest, **kwargs):
    x = x.clone().requires_grad_(True)
    loss = fn(x, *rest, **kwargs)
    loss.sum().backward()
    return loss.detach(), x.grad


def chunked(*args, **kwargs):
    return dcq_ops.dcq_cross_entropy(*args, **kwargs, backend="chunked")


def assert_within(fast, exact, low_precision, *, floor):
    """|fast - exact| <= 4 * |low_precision - exact| + floor * max|exact|."""
    err = (fast.double() - exact).abs().max().item()
    base = (low_precision.double() - exact).abs().max().item()
    bound = 4 * base + floor * max(exact.abs().max().item(), 1.0)
    assert err <= bound, f"error {err:.3e} > bound {bound:.3e} (fp32 reference error {base:.3e})"


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_chunked_matches_reference(name, dtype):
    margin = MARGINS[name]
    x, k, y, W, Y = make_inputs(rows=37, dim=45, slots=203, num_classes=60, empty=17, dtype=dtype, seed=7)
    exact_loss, exact_grad = loss_and_grad(reference.dcq_cross_entropy, x.double(), k.double(), y, W.double(), Y,
                                           **margin, reduction="none")
    ref32_loss, ref32_grad = loss_and_grad(reference.dcq_cross_entropy, x.float(), k.float(), y, W.float(), Y,
                                           **margin, reduction="none")
    loss, grad = loss_and_grad(chunked, x, k, y, W, Y, **margin, reduction="none")
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_within(loss, exact_loss, ref32_loss, floor=2e-6)
    assert_within(grad, exact_grad, ref32_grad, floor=2e-6 if dtype in (torch.float32, torch.float64) else 1e-2)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    x, k, y, W, Y = make_inputs(rows=13, dim=9, slots=31, num_classes=10, dtype=torch.float64)
    loss, grad = loss_and_grad(chunked, x, k, y, W, Y, reduction=reduction)
    exact, exact_grad = loss_and_grad(reference.dcq_cross_entropy, x, k, y, W, Y, reduction=reduction)
    torch.testing.assert_close(loss.double(), exact, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad, exact_grad, rtol=2e-4, atol=2e-6)


@pytest.mark.parametrize("chunk", [1, 7, 64, 203, 1000])
def test_chunk_size_does_not_change_the_result(chunk):
    """The online log-sum-exp and accumulator rescaling across chunks, tested at
    every chunk boundary layout, including one entry per chunk."""
    x, k, y, W, Y = make_inputs(rows=11, dim=13, slots=203, num_classes=15, dtype=torch.float64)
    args = (x, k, y, W, Y, 50.0, 1.0, 0.3, 0.1, 0.2, False, True)
    loss, grad = torch.ops.dcq_ops.margin_cross_entropy(*args, chunk)
    exact, exact_grad = loss_and_grad(reference.dcq_cross_entropy, x, k, y, W, Y, scale=50.0, m1=1.0, m2=0.3,
                                      m3=0.1, interclass_filtering_threshold=0.2, reduction="none")
    torch.testing.assert_close(loss.double(), exact, rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=2e-4, atol=2e-6)


def test_confident_rows_keep_their_precision():
    """With s = 64 and p_i close to 1, loss_i and the gradient are tiny; computing
    them as 1 - p_i would give 0 or noise. They must match the float64 reference
    in relative terms."""
    x, k, y, W, Y = make_inputs(rows=8, dim=256, slots=40, num_classes=50, dtype=torch.float64)
    k = x.clone()  # positive cosine 1: z_pos = 64*(1 - 0.3) far above every negative
    loss, grad = loss_and_grad(chunked, x, k, y, W, Y, scale=64.0, reduction="none")
    exact, exact_grad = loss_and_grad(reference.dcq_cross_entropy, x, k, y, W, Y, scale=64.0, reduction="none")
    assert (exact > 0).all() and (exact < 1e-5).all()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-3, atol=0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-3, atol=1e-12)


def test_empty_queue_and_fully_excluded_rows():
    x, k, y, W, Y = make_inputs(rows=5, dim=8, slots=6, num_classes=4, dtype=torch.float32)
    Y[:] = -1
    loss, grad = loss_and_grad(chunked, x, k, y, W, Y, reduction="none")
    assert torch.all(loss == 0) and torch.all(grad == 0)
    Y[:] = y[0]
    loss, grad = loss_and_grad(chunked, x, k, y, W, Y, reduction="none")
    exact, exact_grad = loss_and_grad(reference.dcq_cross_entropy, x, k, y, W, Y, reduction="none")
    same_class = y == y[0]
    assert torch.all(loss[same_class] == 0) and torch.all(grad[same_class] == 0)
    torch.testing.assert_close(loss, exact.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, exact_grad, rtol=1e-4, atol=1e-6)


def test_no_grad_forward_skips_the_gradient():
    x, k, y, W, Y = make_inputs(rows=7, dim=5, slots=9, num_classes=4)
    with torch.no_grad():
        loss = chunked(x, k, y, W, Y, reduction="none")
    torch.testing.assert_close(loss, reference.dcq_cross_entropy(x, k, y, W, Y, reduction="none"))
    _, grad_rows = torch.ops.dcq_ops.margin_cross_entropy(x, k, y, W, Y, 50.0, 1.0, 0.0, 0.3, 0.0, False, False, 0)
    assert grad_rows.shape == (0, 5)


def test_gradient_does_not_read_the_queue_after_the_forward():
    """DCQLoss overwrites the queue in place before backward() runs."""
    x, k, y, W, Y = make_inputs(rows=7, dim=5, slots=9, num_classes=4)
    exact_loss, exact_grad = loss_and_grad(reference.dcq_cross_entropy, x, k, y, W, Y)
    for backend in ("chunked", "reference"):
        xr = x.clone().requires_grad_(True)
        Wq, Yq = W.clone(), Y.clone()
        loss = dcq_ops.dcq_cross_entropy(xr, k, y, Wq, Yq, backend=backend)
        Wq.normal_()
        Yq.fill_(-1)
        loss.backward()
        torch.testing.assert_close(loss.detach(), exact_loss, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(xr.grad, exact_grad, rtol=1e-4, atol=1e-6)
