"""Every bad input gets a ValueError or TypeError naming the argument, and the queue is left unchanged."""

import pytest
import torch

import dcq_ops
from inputs import make_inputs


def fresh_loss():
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10)
    x, k, y, *_ = make_inputs(rows=7, dim=6, num_classes=40)
    loss_fn(x, y, k)
    return loss_fn


def good_batch():
    x, k, y, *_ = make_inputs(rows=5, dim=6, num_classes=40, seed=3)
    return x, y, k


def _replace(batch, index, value):
    batch = list(batch)
    batch[index] = value
    return batch


BAD = {
    "negative label": (lambda b: _replace(b, 1, torch.tensor([0, 1, -2, 3, 4])), ValueError, "labels must be >= 0"),
    "label >= num_classes": (lambda b: _replace(b, 1, torch.tensor([0, 1, 40, 3, 4])), ValueError, "num_classes"),
    "float labels": (lambda b: _replace(b, 1, torch.zeros(5)), TypeError, "labels"),
    "labels count": (lambda b: _replace(b, 1, torch.arange(4)), ValueError, "labels"),
    "class_weights shape": (lambda b: _replace(b, 2, torch.randn(4, 6)), ValueError, "class_weights"),
    "embedding size": (lambda b: [torch.randn(5, 7), b[1], torch.randn(5, 7)], ValueError, "embedding"),
    "empty batch": (lambda b: [torch.randn(0, 6), torch.arange(0), torch.randn(0, 6)], ValueError, "empty"),
    "batch larger than queue": (lambda b: [torch.randn(11, 6), torch.arange(11), torch.randn(11, 6)], ValueError, "queue size"),
    "other device": (lambda b: _replace(b, 2, b[2].to("meta")), ValueError, "device"),
    "nan embeddings": (lambda b: _replace(b, 0, b[0].index_fill(0, torch.tensor([1]), float("nan"))), ValueError, "embeddings must be finite"),
    "inf class weights": (lambda b: _replace(b, 2, b[2].index_fill(0, torch.tensor([0]), float("inf"))), ValueError, "class_weights must be finite"),
    "integer embeddings": (lambda b: _replace(b, 0, torch.ones(5, 6, dtype=torch.long)), TypeError, "embeddings"),
    "not a tensor": (lambda b: _replace(b, 0, [[0.0] * 6] * 5), TypeError, "embeddings"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_and_leaves_the_queue_unchanged(case):
    make_bad, error, message = BAD[case]
    loss_fn = fresh_loss()
    before = {n: b.clone() for n, b in loss_fn.named_buffers()}
    with pytest.raises(error, match=message):
        loss_fn(*make_bad(good_batch()))
    for n, b in loss_fn.named_buffers():
        assert torch.equal(b, before[n]), f"{n} changed"


def test_validate_false_skips_the_value_checks():
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10, validate=False)
    x, y, k = good_batch()
    loss_fn(x, torch.tensor([0, 1, 45, 3, 4]), k)  # out of range, not checked: no host sync


@pytest.mark.parametrize("kwargs, message", [
    (dict(scale=0.0), "scale"), (dict(m1=0.5), "m1"), (dict(interclass_filtering_threshold=1.5), "interclass"),
    (dict(reduction="avg"), "reduction"), (dict(backend="cuda"), "backend"),
])
def test_functional_rejects_bad_hyper_parameters(kwargs, message):
    x, k, y, W, Y = make_inputs(rows=4, dim=5, slots=6)
    with pytest.raises(ValueError, match=message):
        dcq_ops.dcq_cross_entropy(x, k, y, W, Y, **kwargs)


def test_functional_rejects_mismatched_queue():
    x, k, y, W, Y = make_inputs(rows=4, dim=5, slots=6)
    with pytest.raises(ValueError, match="queue_weights"):
        dcq_ops.dcq_cross_entropy(x, k, y, W[:, :4], Y)
    with pytest.raises(ValueError, match="queue_labels"):
        dcq_ops.dcq_cross_entropy(x, k, y, W, Y[:5])
