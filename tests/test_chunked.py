"""The chunked backend (C++ kernels) against the reference: loss and gradient
within the error model of tests/error_model.py (fp32 and fp64), or within the
bounds of tests/bounds.py when the GEMM operands are 16-bit (a bf16 or fp16
queue); the loss algebra's ops (partials, finalize) on their own; float64 in
float64 (gradcheck); every chunk layout and thread count."""

import pytest
import torch
import torch.nn.functional as F

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, cosine_rounding, positive_slope
from dcq_ops import reference
from error_model import assert_backend_within, assert_within, loss_and_grad, reference_pair
from inputs import MARGINS, make_inputs

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")


def chunked(*args, **kwargs):
    return dcq_ops.dcq_cross_entropy(*args, **kwargs, backend="chunked")


def op_args(margin):
    """dcq_cross_entropy's keyword arguments as the op's positional margin arguments."""
    return (margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
            margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False))


def row_weights(rows, seed=1):
    """Upstream gradients of the rows' losses: the backward must scale each row."""
    g = torch.Generator().manual_seed(seed)
    return 0.5 + torch.rand(rows, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_matches_reference(name, dtype):
    # Embeddings in any dtype against an fp32 queue: the GEMMs run in fp32.
    inputs = make_inputs(rows=37, dim=45, slots=203, num_classes=60, empty=17, dtype=dtype,
                         queue_dtype=torch.float32, seed=7)
    weights = row_weights(37)
    loss, grad = loss_and_grad(chunked, inputs, MARGINS[name], row_weights=weights)
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    assert_backend_within(loss, grad, inputs, MARGINS[name], row_weights=weights, what=name)


@pytest.mark.parametrize("name", sorted(MARGINS))
def test_float64_is_computed_in_float64(name):
    inputs = make_inputs(rows=37, dim=45, slots=203, num_classes=60, empty=17, dtype=torch.float64, seed=8)
    loss, grad = loss_and_grad(chunked, inputs, MARGINS[name])
    assert loss.dtype == torch.float64 and grad.dtype == torch.float64
    assert_backend_within(loss, grad, inputs, MARGINS[name], what=name)  # 1e-7 relative
    # ... which float32 would not meet:
    loss32, _ = loss_and_grad(chunked, inputs, MARGINS[name], dtype=torch.float32)
    _, (exact_loss, _) = reference_pair(inputs, MARGINS[name])
    assert (loss32.double() - exact_loss).abs().max() > 1e-7 * exact_loss.abs().max()


def test_gradcheck_through_chunked():
    x, k, y, w, yq = make_inputs(rows=6, dim=7, slots=23, num_classes=5, empty=3, dtype=torch.float64, seed=9)
    x.requires_grad_(True)
    margin = MARGINS["combined"]
    assert torch.autograd.gradcheck(lambda e: chunked(e, k, y, w, yq, **margin, reduction="none"), (x,))


@pytest.mark.parametrize("queue_dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name", ["cosface", "arcface", "sphereface", "combined"])
def test_sixteen_bit_queue(queue_dtype, name):
    # A 16-bit queue: q and the probabilities are rounded to it before the GEMMs
    # (what the tensor cores compute); the error is bounded by tests/bounds.py.
    margin = MARGINS[name]
    inputs = make_inputs(rows=37, dim=45, slots=203, num_classes=60, empty=17, dtype=torch.float32,
                         queue_dtype=queue_dtype, seed=10)
    x, k, y, w, yq = inputs
    weights = row_weights(37)
    loss, grad = loss_and_grad(chunked, inputs, margin, row_weights=weights)
    exact_loss, exact_grad = loss_and_grad(reference.dcq_cross_entropy, inputs, margin, dtype=torch.float64,
                                           row_weights=weights)
    delta = cosine_rounding(x, w, queue_dtype)
    assert_loss_close(loss, exact_loss, scale=margin["scale"], delta=delta)
    slope = positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), margin["scale"])
    assert_grad_close(grad, exact_grad, embeddings=x, scale=margin["scale"], delta=delta, slope=slope,
                      gemm_dtype=queue_dtype, row_weights=weights)
    # ... and the rounding is really there: not the fp32 answer.
    fp32_loss, _ = loss_and_grad(chunked, (x, k, y, w.float(), yq), margin)
    assert not torch.equal(loss, fp32_loss)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    inputs = make_inputs(rows=13, dim=9, slots=31, num_classes=10, seed=11)
    loss, grad = loss_and_grad(chunked, inputs, MARGINS["cosface"], reduction=reduction)
    assert_backend_within(loss, grad, inputs, MARGINS["cosface"], reduction=reduction, what=reduction)


@pytest.mark.parametrize("chunk", [1, 7, 64, 203, 1000])
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_chunks_and_threads_do_not_change_the_result(chunk, threads):
    """The online log-sum-exp across chunks and the merge of the queue splits
    that a thread count brings, at every chunk boundary layout."""
    inputs = make_inputs(rows=11, dim=13, slots=203, num_classes=15, seed=12)
    margin = MARGINS["cosface_filtered"]
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        loss, grad = torch.ops.dcq_ops.dcq_cross_entropy(*inputs, *op_args(margin), True, chunk)
    finally:
        torch.set_num_threads(saved)
    assert_backend_within(loss, grad, inputs, margin, what=f"chunk {chunk}, {threads} threads")


def test_partials_of_slices_merge_to_the_whole_queue():
    """The loss algebra: partials over disjoint slices, merged, then finalised,
    equal the fused op (and the reference)."""
    from dcq_ops.algebra import merge
    from dcq_ops.loss_kernels import LossKernels

    x, k, y, w, yq = make_inputs(rows=19, dim=7, slots=41, num_classes=9, empty=5, seed=13)
    margin = dcq_ops.MarginConfig(64.0, 1.0, 0.5, 0.0, 0.2, True)
    kernels = LossKernels(margin, backend="chunked")
    for cuts in ([0, 41], [0, 20, 41], [0, 14, 28, 41], [0, 0, 41]):
        parts = [kernels.partials(x, y, w[a:b], yq[a:b], compute_grad=True) for a, b in zip(cuts, cuts[1:])]
        loss, grad = kernels.finalize(x, k, merge(parts), compute_grad=True)
        assert_backend_within(loss, grad, (x, k, y, w, yq), margin.kwargs(), what=f"slices {cuts}")


def test_partials_are_the_online_log_sum_exp_state():
    x, k, y, w, yq = make_inputs(rows=5, dim=6, slots=17, num_classes=4, empty=2, dtype=torch.float64, seed=14)
    row_max, row_sum, acc = torch.ops.dcq_ops.dcq_cross_entropy_partials(x, y, w, yq, 30.0, 0.0, True, 4)
    z = 30.0 * F.normalize(x, dim=1) @ w.t()
    kept = (yq.view(1, -1) != y.view(-1, 1)) & (yq.view(1, -1) >= 0)
    z = z.masked_fill(~kept, float("-inf"))
    expected_max = z.amax(dim=1)
    p = torch.exp(z - expected_max.unsqueeze(1))
    for got, exact, what in ((row_max, expected_max, "row_max"), (row_sum, p.sum(dim=1), "row_sum"),
                             (acc, p @ w, "accumulator")):
        assert_within(got, exact, exact, dtype=torch.float64, what=what)
    _, _, none = torch.ops.dcq_ops.dcq_cross_entropy_partials(x, y, w, yq, 30.0, 0.0, False, 0)
    assert none.shape == (0, 6)


def test_confident_rows_keep_their_precision():
    """With s = 64 and p_i close to 1, loss_i and the gradient are tiny; computing
    them as 1 - p_i would give 0 or noise. They must keep their relative precision."""
    x, k, y, w, yq = make_inputs(rows=8, dim=256, slots=40, num_classes=50, dtype=torch.float64, seed=15)
    inputs = (x, x.clone(), y, w, yq)  # positive cosine 1: z_pos = 64*(1 - 0.3) far above every negative
    loss, grad = loss_and_grad(chunked, inputs, dict(scale=64.0))
    exact, exact_grad = loss_and_grad(reference.dcq_cross_entropy, inputs, dict(scale=64.0))
    assert (exact > 0).all() and (exact < 1e-5).all()
    assert ((loss - exact).abs() / exact).max().item() < 1e-9
    assert ((grad - exact_grad).norm(dim=1) / exact_grad.norm(dim=1)).max().item() < 1e-9


def test_empty_queue_and_fully_excluded_rows():
    x, k, y, w, yq = make_inputs(rows=5, dim=8, slots=6, num_classes=4)
    yq = torch.full_like(yq, -1)
    loss, grad = loss_and_grad(chunked, (x, k, y, w, yq), MARGINS["cosface"])
    assert torch.all(loss == 0) and torch.all(grad == 0)
    yq = torch.full_like(yq, int(y[0]))
    loss, grad = loss_and_grad(chunked, (x, k, y, w, yq), MARGINS["cosface"])
    same_class = y == y[0]
    assert torch.all(loss[same_class] == 0) and torch.all(grad[same_class] == 0)
    assert_backend_within(loss, grad, (x, k, y, w, yq), MARGINS["cosface"])
    loss, grad = loss_and_grad(chunked, (x, k, y, w[:0], yq[:0]), MARGINS["cosface"])  # no slot at all
    assert torch.all(loss == 0) and torch.all(grad == 0)


def test_no_grad_forward_skips_the_gradient():
    x, k, y, w, yq = make_inputs(rows=7, dim=5, slots=9, num_classes=4)
    with torch.no_grad():
        loss = chunked(x, k, y, w, yq, reduction="none")
    (low, _), (exact, _) = reference_pair((x, k, y, w, yq), {})
    assert_within(loss, exact, low, dtype=torch.float32, what="loss without gradient")
    _, grad_rows = torch.ops.dcq_ops.dcq_cross_entropy(x, k, y, w, yq, *op_args(MARGINS["cosface"]), False, 0)
    assert grad_rows.shape == (0, 5)


def test_gradient_does_not_read_the_queue_after_the_forward():
    """DCQLoss overwrites the queue in place before backward() runs."""
    x, k, y, w, yq = make_inputs(rows=7, dim=5, slots=9, num_classes=4)
    for backend in ("chunked", "reference"):
        expected_loss, expected_grad = loss_and_grad(dcq_ops.dcq_cross_entropy, (x, k, y, w, yq), {},
                                                     backend=backend, reduction="mean")
        xr = x.clone().requires_grad_(True)
        wq, yqq = w.clone(), yq.clone()
        loss = dcq_ops.dcq_cross_entropy(xr, k, y, wq, yqq, backend=backend)
        wq.normal_()
        yqq.fill_(-1)
        loss.backward()
        assert torch.equal(loss.detach(), expected_loss) and torch.equal(xr.grad, expected_grad), backend
