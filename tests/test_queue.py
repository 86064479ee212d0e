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


# ------------------------------------------------------------------ loading is all or nothing

def _queue_with_state(num_classes=50):
    loss = dcq_ops.DCQLoss(embedding_size=8, num_classes=num_classes, queue_size=16)
    loss.queue.enqueue(torch.randn(5, 8, generator=torch.Generator().manual_seed(3)), torch.arange(5))
    return loss


def _good_state():
    g = torch.Generator().manual_seed(4)
    return {"queue.weights": torch.nn.functional.normalize(torch.randn(16, 8, generator=g), dim=1),
            "queue.labels": torch.arange(16), "queue.ptr": torch.tensor([7])}


def _with(**changes):
    def change(state):
        for key, value in changes.items():
            if value is None:
                del state["queue." + key]
            else:
                state["queue." + key] = value(state) if callable(value) else value
        return state
    return change


def _nan_row(state):
    w = state["queue.weights"].clone()
    w[2, 1] = float("nan")
    return w


BAD_STATES = {  # case: (change of a good state, words of the error)
    "another embedding size": (_with(weights=torch.randn(16, 4)), r"queue.weights must be \[16, 8\], got shape \(16, 4\)"),
    "another queue size": (_with(weights=torch.randn(12, 8)), r"queue.weights must be \[16, 8\]"),
    "missing ptr": (_with(ptr=None), r"without \['queue.ptr'\]"),
    "missing labels": (_with(labels=None), r"without \['queue.labels'\]"),
    "extra key": (_with(extra=torch.zeros(1)), r"unexpected key\(s\) \['queue.extra'\]"),
    "integer weights": (_with(weights=torch.ones(16, 8, dtype=torch.long)), "queue.weights must be a floating point"),
    "float ptr": (_with(ptr=torch.tensor([3.7])), r"queue.ptr must be an integer tensor \(int64\), got torch.float32"),
    "bool ptr": (_with(ptr=torch.tensor([True])), "queue.ptr must be an integer tensor .* got torch.bool"),
    "float labels": (_with(labels=lambda s: s["queue.labels"].double() + 0.5),
                     "queue.labels must be an integer tensor .* got torch.float64"),
    "labels of another length": (_with(labels=torch.arange(15)), r"queue.labels must be \[16\]"),
    "ptr of two values": (_with(ptr=torch.tensor([1, 2])), "queue.ptr must hold one value"),
    "ptr past the end": (_with(ptr=torch.tensor([16])), r"queue.ptr must be in \[0, 16\), got 16"),
    "nan row": (_with(weights=_nan_row), "queue.weights must be finite, got NaN or infinite values in slot 2"),
    "short row": (_with(weights=lambda s: s["queue.weights"] * 0.5), "must hold a unit-norm row"),
    "label below -1": (_with(labels=torch.arange(16) - 2), "must be >= -1"),
    "label of too many classes": (_with(labels=torch.arange(16) + 40), "num_classes"),
    "not a tensor": (_with(ptr=[3]), "queue.ptr must be a tensor, got list"),
}


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_a_refused_state_leaves_the_queue_exactly_as_it_was(case, strict):
    """Every check runs before anything is copied, in strict and non-strict loads (torch
    copies key by key and raises at the end: labels and a pointer used to load beside
    refused weights, 16 "filled" slots of zero rows; integer weights loaded as zeros, a
    float pointer and float labels were truncated, and strict=False skipped the check of a
    state without its pointer)."""
    change, words = BAD_STATES[case]
    loss = _queue_with_state()
    before = {k: v.clone() for k, v in loss.state_dict().items()}
    with pytest.raises((ValueError, TypeError), match=words):
        loss.load_state_dict(change(_good_state()), strict=strict)
    after = loss.state_dict()
    assert after.keys() == before.keys()
    for key, value in after.items():
        assert value.dtype == before[key].dtype and torch.equal(value, before[key]), key


def test_a_good_state_still_loads_strict_and_not():
    for strict in (True, False):
        loss = _queue_with_state()
        loss.load_state_dict(_good_state(), strict=strict)
        assert loss.queue.labels.tolist() == list(range(16)) and int(loss.queue.ptr) == 7
    # strict=False and no queue at all: nothing to load, the queue stays.
    loss = _queue_with_state()
    before = loss.queue.labels.clone()
    result = loss.load_state_dict({}, strict=False)
    assert sorted(result.missing_keys) == ["queue.labels", "queue.ptr", "queue.weights"]
    assert torch.equal(loss.queue.labels, before)


# ------------------------------------------------------------------ one rule for a row the queue holds

@pytest.mark.parametrize("validate", ["async", "eager"])
@pytest.mark.parametrize("scale", [1e-20, 1e-13, 0.0])
def test_a_row_too_short_to_normalise_never_makes_the_state_unloadable(validate, scale):
    """A class-weight row with 0 < ||k|| < 1e-12 used to pass the batch check and enter the
    queue with a norm of 3.7e-8..0.33 (the normalisation divides by max(||k||, 1e-12)),
    after which load_state_dict(own state_dict()) raised: no later checkpoint resumed."""
    g = torch.Generator().manual_seed(7)
    loss = dcq_ops.DCQLoss(embedding_size=8, num_classes=20, queue_size=16, validate=validate)
    x, k, y = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g), torch.arange(4)
    k[2] = torch.randn(8, generator=g) * scale
    if validate == "eager":
        with pytest.raises(ValueError, match="class_weights rows must be nonzero and normalisable"):
            loss(x, y, k)
    else:
        loss(x, y, k)
        with pytest.raises(ValueError, match="a class_weights row of zeros, or of a norm below 1e-12"):
            loss(x, y, torch.randn(4, 8, generator=g))
    assert (loss.queue.labels == -1).all(), "the batch with the short row was not enqueued"
    loss(x, y, torch.randn(4, 8, generator=g))  # the run goes on
    fresh = dcq_ops.DCQLoss(embedding_size=8, num_classes=20, queue_size=16)
    fresh.load_state_dict(loss.state_dict())  # the module's own state always loads
    assert torch.equal(fresh.queue.labels, loss.queue.labels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_row_the_batch_check_lets_in_enqueues_as_a_row_the_state_check_takes(dtype):
    """The two checks agree at the boundary: rows just above 1e-12 (and fp32-subnormal
    entries, huge fp32 entries, float64 beyond float32's range) are either refused by the
    batch check or enqueued as unit rows that load back."""
    from dcq_ops.batch_guard import holdable_rows
    g = torch.Generator().manual_seed(11)
    direction = torch.nn.functional.normalize(torch.randn(8, 8, generator=g, dtype=torch.float64), dim=1)
    norms = torch.tensor([1e-12 * (1 + 1e-6), 1e-12 * (1 - 1e-6), 3e-13, 1e-40, 1e-3, 1e30, 1e38, 1e200],
                         dtype=torch.float64)
    rows = direction * norms[:, None]
    held = holdable_rows(rows)
    assert held.tolist() == [True, False, False, False, True, True, True, False]
    queue = dcq_ops.ClassQueue(8, 8, dtype=dtype)
    queue.enqueue(rows[held].float() if dtype != torch.float32 else rows[held], torch.arange(int(held.sum())))
    dcq_ops.ClassQueue(8, 8, dtype=dtype).load_state_dict(queue.state_dict())


@pytest.mark.parametrize("key,value,words", [
    ("queue.ptr", torch.tensor([2.7]), r"states\[1\]: queue.ptr must be an integer tensor"),
    ("queue.labels", torch.zeros(4), r"states\[1\]: queue.labels must be an integer tensor"),
    ("queue.weights", torch.ones(4, 3, dtype=torch.int32), r"states\[1\]: queue.weights must be a floating point"),
])
def test_assembling_blocks_refuses_values_it_would_truncate(key, value, words):
    """assemble_queue_state read each block's pointer with int(): a float pointer was truncated."""
    from dcq_ops.parallel import assemble_queue_state
    states = []
    for rank in range(2):
        rows = torch.nn.functional.normalize(torch.randn(4, 3, generator=torch.Generator().manual_seed(rank)), dim=1)
        states.append({"queue.weights": rows, "queue.labels": torch.arange(4) + 4 * rank, "queue.ptr": torch.tensor([2]),
                       "queue.shard": torch.tensor([8, 4 * rank, 4 * rank + 4, 2, rank])})
    assert int(assemble_queue_state(states)["queue.ptr"]) == 2
    states[1][key] = value
    with pytest.raises((TypeError, ValueError), match=words):
        assemble_queue_state(states)
