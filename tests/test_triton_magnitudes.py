"""The Triton backend over the whole finite fp32 range of the embeddings, as
tests/test_magnitudes.py holds the others: rows from subnormal values, through
F.normalize's 1e-12 floor, to values near 1e38 (norms beyond float32's maximum,
gradient entries subnormal in fp32), against the float64 reference within
tests/bounds.py. Without a GPU the kernels run under Triton's interpreter (fp32 and
fp16 queues: its bf16 dot is not exact); with one, compiled, bf16 added.
"""

import warnings

import pytest
import torch

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

# As tests/test_triton.py: the interpreter is chosen when the kernels are first imported.
from dcq_ops.triton import import_ops  # noqa: E402

try:
    import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

import dcq_ops  # noqa: E402
from bounds import assert_grad_close, assert_loss_close, positive_slope  # noqa: E402
from dcq_ops import reference  # noqa: E402
from dcq_ops.triton import kernels  # noqa: E402
from inputs import MARGINS  # noqa: E402
from test_magnitudes import FP32_TINY, MAGNITUDES, rows_of_magnitudes  # noqa: E402

if not ON_CUDA and not kernels.INTERPRETED:
    pytest.skip("dcq_ops.triton.kernels was imported before this module without TRITON_INTERPRET=1; "
                "run with TRITON_INTERPRET=1 to test them on CPU", allow_module_level=True)

QUEUE_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_CUDA else [])


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # for dcq_ops.backends' dispatch
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")
    # fp32 GEMMs in fp32: the bound below has no TF32 term.
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(precision)


def cosine_rounding(x, queue_weights, gemm_dtype):
    """delta_i of tests/bounds.py, with the normalisation that holds at every magnitude
    (the reference's, in fp32 as the backend computes it, and float64)."""
    if gemm_dtype == torch.float32:
        return torch.zeros(x.shape[0], dtype=torch.float64)
    exact = reference.normalize_rows(x.double())
    rounded = reference.normalize_rows(x.float()).to(gemm_dtype).double()
    return ((rounded - exact) @ queue_weights.double().t()).abs().amax(dim=1)


def run(inputs, margin, weights, queue_dtype):
    x, k, y, w, yq = inputs
    w = w.to(queue_dtype)
    xx = x.detach().clone().to(DEVICE).requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no first-contact demotion
        loss = dcq_ops.dcq_cross_entropy(xx, k.to(DEVICE), y.to(DEVICE), w.to(DEVICE), yq.to(DEVICE), **margin,
                                         reduction="none", backend="triton")
    (loss * weights.to(loss)).sum().backward()
    return loss.detach().cpu(), xx.grad.cpu(), w


def exact(inputs, margin, weights):
    x, k, y, w, yq = (t.double() if t.is_floating_point() else t for t in inputs)
    x = x.detach().clone().requires_grad_(True)
    loss = reference.dcq_cross_entropy(x, k, y, w, yq, **margin, reduction="none")
    (loss * weights).sum().backward()
    return loss.detach(), x.grad


def check(inputs, margin, queue_dtype, what):
    x, k = inputs[0], inputs[1]
    g = torch.Generator().manual_seed(3)
    weights = 0.5 + torch.rand(x.shape[0], generator=g, dtype=torch.float64)
    loss, grad, w = run(inputs, margin, weights, queue_dtype)
    # The exact answer for the queue as stored (rounded to its dtype).
    exact_loss, exact_grad = exact(inputs[:3] + (w.float(),) + inputs[4:], margin, weights)
    delta = cosine_rounding(x, w, queue_dtype)
    scale = margin["scale"]
    assert_loss_close(loss, exact_loss, scale=scale, delta=delta, what=f"{what} loss")
    slope = positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), scale,
                           margin.get("straight_through_margin", False))
    assert_grad_close(grad, exact_grad, embeddings=x, scale=scale, delta=delta, slope=slope,
                      gemm_dtype=queue_dtype, row_weights=weights, what=f"{what} gradient")
    return grad, exact_grad


@pytest.mark.parametrize("queue_dtype", QUEUE_DTYPES, ids=str)
@pytest.mark.parametrize("margin_name", ["arcface", "cosface_filtered"])
def test_every_magnitude_matches_float64(margin_name, queue_dtype):
    inputs = rows_of_magnitudes(seed=7, magnitudes=MAGNITUDES, per_magnitude=1, dim=32, slots=40)
    check(inputs, MARGINS[margin_name], queue_dtype, f"triton, {margin_name}, {queue_dtype}")


@pytest.mark.parametrize("queue_dtype", QUEUE_DTYPES, ids=str)
def test_rows_near_float32_max_and_subnormal_gradients(queue_dtype):
    """Rows of values near 1e38: the loss of x / 1e38 (not of a zero row), and a gradient
    whose entries are subnormal in fp32, within the bound of its row's norm (before, the
    kernel multiplied by 1 / ||x|| = 1 / inf = 0)."""
    inputs = rows_of_magnitudes(seed=5, magnitudes=[2e38, 3.4e38], per_magnitude=3, dim=64, slots=40)
    assert not torch.isfinite(inputs[0].double().norm(dim=1).float()).any()
    grad, exact_grad = check(inputs, MARGINS["arcface"], queue_dtype, f"triton, {queue_dtype}")
    assert ((exact_grad.abs() < FP32_TINY) & (exact_grad != 0)).float().mean() > 0.5
    assert (grad != 0).float().mean() > 0.5
