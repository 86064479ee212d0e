"""torch.library.opcheck on the compiled ops: schemas, fake kernels, autograd registration."""

import pytest
import torch

import dcq_ops
from inputs import make_inputs

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_dcq_cross_entropy(compute_grad):
    x, k, y, W, Y = make_inputs(rows=6, dim=7, slots=11, num_classes=5)
    x.requires_grad_(compute_grad)
    args = (x, k, y, W, Y, 50.0, 1.0, 0.2, 0.1, 0.3, False, compute_grad, 4)
    torch.library.opcheck(torch.ops.dcq_ops.dcq_cross_entropy.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_partials(compute_grad, dtype):
    x, k, y, W, Y = make_inputs(rows=6, dim=7, slots=11, num_classes=5, dtype=dtype)
    args = (x, y, W, Y, 50.0, 0.3, compute_grad, 4)
    torch.library.opcheck(torch.ops.dcq_ops.dcq_cross_entropy_partials.default, args)


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_finalize(compute_grad):
    x, k, y, W, Y = make_inputs(rows=6, dim=7, slots=11, num_classes=5)
    row_max, row_sum, acc = torch.ops.dcq_ops.dcq_cross_entropy_partials(x, y, W, Y, 50.0, 0.0, True, 0)
    args = (x, k, row_max, row_sum, acc, 50.0, 1.0, 0.2, 0.1, False, compute_grad)
    torch.library.opcheck(torch.ops.dcq_ops.dcq_cross_entropy_finalize.default, args)


@pytest.mark.parametrize("guard", [None, 0, 1])
def test_opcheck_queue_enqueue(guard):
    queue = dcq_ops.ClassQueue(9, 5, dtype=torch.float16)
    guard = None if guard is None else torch.tensor([guard])
    args = (queue.weights, queue.labels, queue.ptr, torch.randn(4, 5), torch.arange(4), guard)
    torch.library.opcheck(torch.ops.dcq_ops.queue_enqueue_.default, args)


# ----------------------------------------------------------------------------
# The Triton ops (dcq_ops.triton.ops): on CPU tensors under Triton's interpreter,
# imported now, before anything imports Triton (as tests/test_triton.py).

try:
    from dcq_ops.triton import import_ops

    triton_ops = import_ops(interpret=not torch.cuda.is_available())
except ImportError:  # Triton not installed
    triton_ops = None


def _triton_ops(monkeypatch):
    """dcq_ops.triton.ops (imported above), its kernels interpreted on CPU
    (Triton reads TRITON_INTERPRET at the launches too)."""
    if triton_ops is None:
        pytest.skip("Triton is not installed")
    if not torch.cuda.is_available():
        from dcq_ops.triton import kernels

        if not kernels.INTERPRETED:
            pytest.skip("dcq_ops.triton.kernels was imported compiled without a GPU")
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return triton_ops


def _triton_inputs():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return tuple(t.to(device) for t in make_inputs(rows=6, dim=7, slots=11, num_classes=5))


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_triton_dcq_cross_entropy(compute_grad, monkeypatch):
    ops = _triton_ops(monkeypatch)
    x, k, y, W, Y = _triton_inputs()
    x.requires_grad_(compute_grad)
    args = (x, k, y, W, Y, 50.0, 1.0, 0.2, 0.1, 0.3, False, compute_grad)
    torch.library.opcheck(ops.triton_dcq_cross_entropy, args)


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_triton_partials(compute_grad, monkeypatch):
    ops = _triton_ops(monkeypatch)
    x, k, y, W, Y = _triton_inputs()
    torch.library.opcheck(ops.triton_dcq_cross_entropy_partials, (x, y, W, Y, 50.0, 0.3, compute_grad))


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_triton_finalize(compute_grad, monkeypatch):
    ops = _triton_ops(monkeypatch)
    x, k, y, W, Y = _triton_inputs()
    row_max, row_sum, acc = ops.triton_dcq_cross_entropy_partials(x, y, W, Y, 50.0, 0.0, True)
    args = (x, k, row_max, row_sum, acc, 50.0, 1.0, 0.2, 0.1, False, compute_grad)
    torch.library.opcheck(ops.triton_dcq_cross_entropy_finalize, args)
