"""Every bad input gets a ValueError or TypeError naming the argument, and the
queue is left unchanged. Bad values (labels out of range, NaN/inf) are found on
the device by default (validate="async"): the batch is not enqueued, and the
error comes at the next call; validate="eager" raises at once (dcq_ops/validation.py)."""

import warnings

import pytest
import torch

import dcq_ops
from inputs import make_inputs


def fresh_loss(validate="async"):
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10, validate=validate)
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


BAD_VALUES = {  # case: (bad batch, words of the eager error, words of the async error)
    "negative label": (lambda b: _replace(b, 1, torch.tensor([0, 1, -2, 3, 4])), "labels must be >= 0",
                       r"a label < 0"),
    "label >= num_classes": (lambda b: _replace(b, 1, torch.tensor([0, 1, 40, 3, 4])),
                             "labels must be < num_classes = 40", r"a label >= num_classes = 40"),
    "nan embeddings": (lambda b: _replace(b, 0, b[0].index_fill(0, torch.tensor([1]), float("nan"))),
                       "embeddings must be finite", "NaN or infinite values in embeddings"),
    "inf class weights": (lambda b: _replace(b, 2, b[2].index_fill(0, torch.tensor([0]), float("inf"))),
                          "class_weights must be finite", "NaN or infinite values in class_weights"),
}

BAD = {
    "float labels": (lambda b: _replace(b, 1, torch.zeros(5)), TypeError, "labels"),
    "labels count": (lambda b: _replace(b, 1, torch.arange(4)), ValueError, "labels"),
    "class_weights shape": (lambda b: _replace(b, 2, torch.randn(4, 6)), ValueError, "class_weights"),
    "embedding size": (lambda b: [torch.randn(5, 7), b[1], torch.randn(5, 7)], ValueError, "embedding"),
    "empty batch": (lambda b: [torch.randn(0, 6), torch.arange(0), torch.randn(0, 6)], ValueError, "empty"),
    "batch larger than queue": (lambda b: [torch.randn(11, 6), torch.arange(11), torch.randn(11, 6)], ValueError, "queue size"),
    "other device": (lambda b: _replace(b, 2, b[2].to("meta")), ValueError, "device"),
    "integer embeddings": (lambda b: _replace(b, 0, torch.ones(5, 6, dtype=torch.long)), TypeError, "embeddings"),
    "not a tensor": (lambda b: _replace(b, 0, [[0.0] * 6] * 5), TypeError, "embeddings"),
}


def queue_state(loss_fn):
    return {n: b.clone() for n, b in loss_fn.queue.state_dict().items()}


def assert_unchanged(loss_fn, before):
    for n, b in loss_fn.queue.state_dict().items():
        assert torch.equal(b, before[n]), f"queue.{n} changed"


@pytest.mark.parametrize("validate", ["async", "eager"])
@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_raises_at_once_and_leaves_the_queue_unchanged(case, validate):
    make_bad, error, message = BAD[case]
    loss_fn = fresh_loss(validate)
    before = queue_state(loss_fn)
    with pytest.raises(error, match=message):
        loss_fn(*make_bad(good_batch()))
    assert_unchanged(loss_fn, before)


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_eager_raise_at_once(case):
    make_bad, eager_message, _ = BAD_VALUES[case]
    loss_fn = fresh_loss("eager")
    before = queue_state(loss_fn)
    with pytest.raises(ValueError, match=eager_message):
        loss_fn(*make_bad(good_batch()))
    assert_unchanged(loss_fn, before)


@pytest.mark.parametrize("case", sorted(BAD_VALUES))
def test_bad_values_async_never_enter_the_queue_and_raise_at_the_next_call(case):
    make_bad, _, async_message = BAD_VALUES[case]
    loss_fn = fresh_loss("async")  # one good step (step 1) already taken
    before = queue_state(loss_fn)
    loss_fn(*make_bad(good_batch()))  # step 2: no host sync, so no error yet ...
    assert_unchanged(loss_fn, before)  # ... but nothing was enqueued
    with pytest.raises(ValueError, match=f"step 2 had {async_message}.*not enqueued"):
        loss_fn(*good_batch())
    assert_unchanged(loss_fn, before)  # the call that reported it did nothing either
    loss_fn(*good_batch())  # reported once: training goes on
    assert int(loss_fn.queue.ptr) == (7 + 5) % 10


def test_check_reports_a_pending_bad_batch():
    loss_fn = fresh_loss("async")
    loss_fn(*_replace(good_batch(), 1, torch.tensor([0, 1, 2, 3, 99])))
    with pytest.raises(ValueError, match="step 2 had a label >= num_classes = 40"):
        loss_fn.check()
    loss_fn.check()  # nothing pending any more


def test_eval_mode_checks_no_values_and_enqueues_nothing():
    loss_fn = fresh_loss("async").eval()
    before = queue_state(loss_fn)
    loss_fn(*_replace(good_batch(), 1, torch.tensor([0, 1, 2, 3, 99])))
    loss_fn.check()
    assert_unchanged(loss_fn, before)


def test_validate_off_skips_the_value_checks():
    for off in ("off", False):
        loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10, validate=off)
        x, y, k = good_batch()
        loss_fn(x, torch.tensor([0, 1, 45, 3, 4]), k)  # out of range, not checked: it is enqueued
        loss_fn(x, y, k)
        assert 45 in loss_fn.queue.labels.tolist()
    with pytest.raises(ValueError, match="validate must be one of"):
        dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10, validate="later")


def test_degenerate_queue_warns_once():
    """Every sample of one class (e.g. a synthetic set with constant labels): once the
    queue is full, every entry is excluded for every row and the loss is exactly 0."""
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10)
    x, _, k = good_batch()
    ones = torch.ones(5, dtype=torch.long)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(x, ones, k)
        loss_fn(x, ones, k)  # the queue is full now, but this step's loss was against a half-empty queue
    loss = loss_fn(x, ones, k)
    assert loss.item() == 0.0
    with pytest.warns(RuntimeWarning, match="every queue entry was excluded"):
        loss_fn(x, ones, k)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_fn(x, ones, k)
        loss_fn(x, ones, k)


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
