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


def test_opcheck_queue_enqueue():
    queue = dcq_ops.ClassQueue(9, 5, dtype=torch.float16)
    args = (queue.weights, queue.labels, queue.ptr, torch.randn(4, 5), torch.arange(4))
    torch.library.opcheck(torch.ops.dcq_ops.queue_enqueue_.default, args)
