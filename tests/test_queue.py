"""ClassQueue against a plain Python FIFO model, and its state_dict."""

import pytest
import torch

import dcq_ops
from dcq_ops.ops.queue import enqueue_fallback


class FifoModel:
    """The queue as a list of (normalised key, label) slots and a head index."""

    def __init__(self, size, dim):
        self.keys = [torch.zeros(dim, dtype=torch.float64) for _ in range(size)]
        self.labels = [-1] * size
        self.head = 0

    def enqueue(self, keys, labels):
        for key, label in zip(keys.double(), labels.tolist()):
            self.keys[self.head] = key / key.norm()
            self.labels[self.head] = label
            self.head = (self.head + 1) % len(self.labels)


# Each stored coordinate (of magnitude <= 1) is the fp32 normalisation (a few fp32
# ulps) rounded once to the queue's dtype (at most half its ulp below 1: 2^-11 in
# fp16, 2^-8 in bf16): twice the rounding leaves room for the fp32 part.
TOLERANCE = {torch.float32: 16 * 2.0**-24, torch.float16: 2 * 2.0**-11, torch.bfloat16: 2 * 2.0**-8}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel", ["compiled", "fallback"])
def test_queue_matches_fifo_model_across_uneven_batches(dtype, kernel):
    if kernel == "compiled" and not dcq_ops.extension_loaded():
        pytest.skip(dcq_ops.EXTENSION_ERROR)
    size, dim = 23, 19
    queue = dcq_ops.ClassQueue(size, dim, dtype=dtype)
    model = FifoModel(size, dim)
    g = torch.Generator().manual_seed(1)
    for batch in [1, 5, 23, 7, 22, 2, 11, 23, 3, 17, 9, 1, 20]:  # wraps around many times, full-size batches too
        keys = torch.randn(batch, dim, generator=g) * 3
        labels = torch.randint(0, 1000, (batch,), generator=g)
        if kernel == "compiled":
            queue.enqueue(keys, labels)
        else:
            enqueue_fallback(queue.weights, queue.labels, queue.ptr, keys, labels)
        model.enqueue(keys, labels)
        assert queue.ptr.item() == model.head
        assert queue.labels.tolist() == model.labels
        torch.testing.assert_close(queue.weights.double(), torch.stack(model.keys), atol=TOLERANCE[dtype], rtol=0)
    assert queue.weights.dtype == dtype


@pytest.mark.parametrize("kernel", ["compiled", "fallback"])
def test_guarded_enqueue_writes_nothing_unless_the_guard_is_zero(kernel):
    if kernel == "compiled" and not dcq_ops.extension_loaded():
        pytest.skip(dcq_ops.EXTENSION_ERROR)
    queue = dcq_ops.ClassQueue(7, 3)
    queue.enqueue(torch.randn(5, 3), torch.arange(5))
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    keys, labels = torch.randn(4, 3), torch.arange(4) + 10
    for bad in (1, 6, -1):
        if kernel == "compiled":
            queue.enqueue(keys, labels, bad_reasons=torch.tensor([bad]))
        else:
            enqueue_fallback(queue.weights, queue.labels, queue.ptr, keys, labels, torch.tensor([bad]))
        for k, v in queue.state_dict().items():
            assert torch.equal(v, before[k]), (bad, k)
    if kernel == "compiled":
        queue.enqueue(keys, labels, bad_reasons=torch.tensor([0]))
    else:
        enqueue_fallback(queue.weights, queue.labels, queue.ptr, keys, labels, torch.tensor([0]))
    assert queue.labels.tolist() == [12, 13, 2, 3, 4, 10, 11] and int(queue.ptr) == 2  # wrapped around


def test_queue_rows_are_unit_norm_and_start_empty():
    queue = dcq_ops.ClassQueue(8, 5)
    assert queue.labels.tolist() == [-1] * 8 and queue.ptr.tolist() == [0]
    queue.enqueue(torch.randn(3, 5) * 10, torch.arange(3))
    torch.testing.assert_close(queue.weights[:3].norm(dim=1), torch.ones(3))
    assert torch.all(queue.weights[3:] == 0)


def test_state_dict_round_trip():
    a = dcq_ops.ClassQueue(10, 4, dtype=torch.float16)
    a.enqueue(torch.randn(7, 4), torch.arange(7))
    a.enqueue(torch.randn(6, 4), torch.arange(6) + 100)
    b = dcq_ops.ClassQueue(10, 4, dtype=torch.float16)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.weights, b.weights) and torch.equal(a.labels, b.labels) and torch.equal(a.ptr, b.ptr)
    keys, labels = torch.randn(5, 4), torch.arange(5)
    a.enqueue(keys, labels)
    b.enqueue(keys, labels)
    assert torch.equal(a.weights, b.weights) and torch.equal(a.ptr, b.ptr)


def test_non_persistent_queue_stays_out_of_state_dict():
    queue = dcq_ops.ClassQueue(4, 3, persistent=False)
    assert queue.state_dict() == {}


@pytest.mark.parametrize("bad", [
    dict(class_weights=torch.randn(11, 4), labels=torch.arange(11)),          # batch larger than the queue
    dict(class_weights=torch.randn(0, 4), labels=torch.arange(0)),            # empty batch
    dict(class_weights=torch.randn(3, 5), labels=torch.arange(3)),            # wrong dim
    dict(class_weights=torch.randn(3, 4), labels=torch.arange(2)),            # label count
    dict(class_weights=torch.randn(3, 4), labels=torch.ones(3)),              # float labels
    dict(class_weights=torch.randint(0, 3, (3, 4)), labels=torch.arange(3)),  # integer keys
    dict(class_weights=torch.randn(3, 4, device="meta"), labels=torch.arange(3)),  # other device
])
def test_bad_enqueue_raises_and_leaves_the_queue_unchanged(bad):
    queue = dcq_ops.ClassQueue(10, 4)
    queue.enqueue(torch.randn(6, 4), torch.arange(6))
    before = {k: v.clone() for k, v in queue.state_dict().items()}
    with pytest.raises((ValueError, TypeError)):
        queue.enqueue(bad["class_weights"], bad["labels"])
    for k, v in queue.state_dict().items():
        assert torch.equal(v, before[k])


def test_constructor_rejects_bad_arguments():
    with pytest.raises(ValueError, match="size"):
        dcq_ops.ClassQueue(0, 4)
    with pytest.raises(ValueError, match="dim"):
        dcq_ops.ClassQueue(4, -1)
    with pytest.raises(TypeError, match="dtype"):
        dcq_ops.ClassQueue(4, 4, dtype=torch.int32)
