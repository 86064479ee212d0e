"""torch.library.opcheck on the compiled ops: schemas, fake kernels, autograd registration."""

import pytest
import torch

import dcq_ops
from inputs import make_inputs

pytestmark = pytest.mark.skipif(not dcq_ops.extension_loaded(), reason=f"{dcq_ops.EXTENSION_ERROR}")


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_margin_cross_entropy(compute_grad):
    x, k, y, W, Y = make_inputs(rows=6, dim=7, slots=11, num_classes=5)
    x.requires_grad_(compute_grad)
    args = (x, k, y, W, Y, 50.0, 1.0, 0.2, 0.1, 0.3, False, compute_grad, 4)
    torch.library.opcheck(torch.ops.dcq_ops.margin_cross_entropy.default, args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("with_accumulator", [True, False])
def test_opcheck_partials(with_accumulator, dtype):
    x, k, y, W, Y = make_inputs(rows=6, dim=7, slots=11, num_classes=5, dtype=dtype)
    args = (x, y, W, Y, 50.0, 0.3, with_accumulator, 4)
    torch.library.opcheck(torch.ops.dcq_ops.margin_ce_partials.default, args)


@pytest.mark.parametrize("compute_grad", [True, False])
def test_opcheck_finalize(compute_grad):
    x, k, y, W, Y = make_inputs(rows=6, dim=7, slots=11, num_classes=5)
    row_max, row_sum, acc = torch.ops.dcq_ops.margin_ce_partials(x, y, W, Y, 50.0, 0.0, True, 0)
    args = (x, k, row_max, row_sum, acc, 50.0, 1.0, 0.2, 0.1, False, compute_grad)
    torch.library.opcheck(torch.ops.dcq_ops.margin_ce_finalize.default, args)


@pytest.mark.parametrize("guard", [None, 0, 1])
def test_opcheck_queue_enqueue(guard):
    queue = dcq_ops.ClassQueue(9, 5, dtype=torch.float16)
    guard = None if guard is None else torch.tensor([guard])
    args = (queue.weights, queue.labels, queue.ptr, torch.randn(4, 5), torch.arange(4), guard)
    torch.library.opcheck(torch.ops.dcq_ops.queue_enqueue_.default, args)
