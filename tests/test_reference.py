"""The reference (docs/loss.md) against float64 finite differences and an
independent row-by-row softmax formulation."""

import math

import pytest
import torch

from dcq_ops import margin as margin_math
from dcq_ops import reference
from error_model import assert_within
from inputs import MARGINS, make_inputs

FD_MARGINS = {k: v for k, v in MARGINS.items() if not v.get("straight_through_margin")}


def _loss_fn(rest, margin, reduction="mean"):
    class_weights, labels, queue_weights, queue_labels = rest
    return lambda x: reference.dcq_cross_entropy(
        x, class_weights, labels, queue_weights, queue_labels, **margin, reduction=reduction)


@pytest.mark.parametrize("name", sorted(FD_MARGINS))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reference_matches_finite_differences(name, reduction):
    x, *rest = make_inputs(rows=6, dim=7, slots=13, num_classes=5, empty=3, dtype=torch.float64, seed=11)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(_loss_fn(rest, FD_MARGINS[name], reduction), (x,), eps=1e-6, atol=1e-6, rtol=1e-5)


def _row_by_row(x, k, y, W, Y, scale, m1=1.0, m2=0.0, m3=0.0, interclass_filtering_threshold=0.0,
                straight_through_margin=False):
    """Each row's loss as -log_softmax over [positive, kept negatives], in float64, one row at a time."""
    losses = []
    for i in range(x.shape[0]):
        q = x[i] / x[i].norm()
        w = k[i] / k[i].norm()
        c = torch.clamp(q @ w, -1, 1)
        z_pos = scale * (torch.cos(m1 * torch.acos(c) + m2) - m3)
        negatives = []
        for j in range(W.shape[0]):
            if Y[j] < 0 or Y[j] == y[i]:
                continue
            c_ij = q @ W[j]
            if interclass_filtering_threshold > 0 and c_ij > interclass_filtering_threshold:
                c_ij = c_ij * 0
            negatives.append(scale * c_ij)
        if not negatives:
            losses.append(z_pos * 0)
            continue
        logits = torch.stack([z_pos] + negatives)
        losses.append(-torch.log_softmax(logits, 0)[0])
    return torch.stack(losses)


@pytest.mark.parametrize("name", sorted(FD_MARGINS))
def test_reference_matches_row_by_row_softmax(name):
    x, k, y, W, Y = make_inputs(rows=9, dim=11, slots=29, num_classes=7, empty=5, dtype=torch.float64, seed=3)
    margin = FD_MARGINS[name]
    xa = x.clone().requires_grad_(True)
    xb = x.clone().requires_grad_(True)
    fast = reference.dcq_cross_entropy(xa, k, y, W, Y, **margin, reduction="none")
    slow = _row_by_row(xb, k, y, W, Y, **margin)
    # Two float64 computations of the same rows: the error model's float64 bound.
    assert_within(fast.detach(), slow.detach(), slow.detach(), dtype=torch.float64, what="loss rows")
    fast.sum().backward()
    slow.sum().backward()
    assert_within(xa.grad, xb.grad, xb.grad, dtype=torch.float64, what="gradient")


def test_straight_through_gradient_is_that_of_the_plain_cosine():
    """arcface_torch applies the ArcFace margin under no_grad: the loss value has
    the margin, the positive's gradient is that of s*c."""
    x, k, y, W, Y = make_inputs(rows=8, dim=10, slots=21, num_classes=6, dtype=torch.float64, seed=5)
    margin = MARGINS["arcface_straight_through"]
    xa = x.clone().requires_grad_(True)
    loss = reference.dcq_cross_entropy(xa, k, y, W, Y, **margin)
    loss.backward()

    # Independent construction: z = s*c + (s*cos(acos(c) + m2) - s*c).detach()
    xb = x.clone().requires_grad_(True)
    q = torch.nn.functional.normalize(xb, dim=1)
    w = torch.nn.functional.normalize(k, dim=1)
    c = (q * w).sum(1)
    s, m2 = margin["scale"], margin["m2"]
    z = s * c + (s * torch.cos(torch.acos(c) + m2) - s * c).detach()
    neg = s * (q @ W.t())
    excluded = (Y.view(1, -1) == y.view(-1, 1)) | (Y.view(1, -1) < 0)
    logits = torch.cat([z.view(-1, 1), neg.masked_fill(excluded, float("-inf"))], dim=1)
    expected = -torch.log_softmax(logits, dim=1)[:, 0].mean()
    assert_within(loss.detach(), expected.detach(), expected.detach(), dtype=torch.float64, what="loss")
    expected.backward()
    assert_within(xa.grad, xb.grad, xb.grad, dtype=torch.float64, what="gradient")


def test_row_with_every_entry_excluded_has_zero_loss_and_gradient():
    x, k, y, W, Y = make_inputs(rows=4, dim=6, slots=5, num_classes=3, dtype=torch.float64)
    Y[:] = -1
    Y[0] = y[1]  # row 1's only candidate is its own class: excluded; other rows have one negative
    x.requires_grad_(True)
    loss = reference.dcq_cross_entropy(x, k, y, W, Y, reduction="none")
    loss.sum().backward()
    assert loss[1].item() == 0.0
    assert torch.all(x.grad[1] == 0)
    assert torch.isfinite(x.grad).all()
    Y[:] = -1  # an empty queue: every loss 0, every gradient 0
    x.grad = None
    loss = reference.dcq_cross_entropy(x, k, y, W, Y)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def test_margin_derivative_is_finite_and_exact_at_the_ends():
    c = torch.tensor([-1.0, 1.0], dtype=torch.float64)
    torch.testing.assert_close(margin_math.margin_derivative(c, 1.0, 0.0), torch.ones(2, dtype=torch.float64))
    # SphereFace m1=2, m2=0: cos(2 theta) = 2c^2 - 1, derivative 4c
    torch.testing.assert_close(margin_math.margin_derivative(c, 2.0, 0.0), 4 * c, rtol=1e-6, atol=1e-6)
    assert torch.isfinite(margin_math.margin_derivative(c, 1.0, 0.5)).all()
    # Away from the ends it is the exact derivative.
    c = torch.linspace(-0.99, 0.99, 41, dtype=torch.float64, requires_grad=True)
    value = torch.cos(1.3 * torch.acos(c) + 0.2)
    (grad,) = torch.autograd.grad(value.sum(), c)
    torch.testing.assert_close(margin_math.margin_derivative(c.detach(), 1.3, 0.2), grad, rtol=1e-10, atol=1e-10)


def test_low_precision_inputs_stay_finite_with_large_scale():
    for dtype in (torch.float16, torch.bfloat16):
        x, k, y, W, Y = make_inputs(dtype=dtype, positive_alignment=5.0)
        loss = reference.dcq_cross_entropy(x, k, y, W, Y, scale=64.0, m2=0.5, m3=0.0)
        assert math.isfinite(loss.item())
