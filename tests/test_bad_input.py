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
    # A zero row has no direction: it would enter the queue as a zero "class weight".
    "zero class weight row": (lambda b: _replace(b, 2, b[2].index_fill(0, torch.tensor([3]), 0.0)),
                              "class_weights rows must be nonzero", "a class_weights row of zeros"),
}

BAD = {
    "float labels": (lambda b: _replace(b, 1, torch.zeros(5)), TypeError, "labels"),
    "labels count": (lambda b: _replace(b, 1, torch.arange(4)), ValueError, "labels"),
    "class_weights shape": (lambda b: _replace(b, 2, torch.randn(4, 6)), ValueError, "class_weights"),
    # The embeddings are blamed, not the queue (whose width is embedding_size).
    "embedding size": (lambda b: [torch.randn(5, 7), b[1], torch.randn(5, 7)], ValueError,
                       r"embeddings must be \[N, 6\] \(DCQLoss's embedding_size\), got shape \(5, 7\)"),
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


# ----------------------------------------------------------------- double backward


@pytest.mark.parametrize("backend", ["chunked", "reference"])
def test_double_backward_is_a_clear_error_on_the_fused_backends(backend):
    x, k, y, W, Y = make_inputs(rows=5, dim=8, slots=12)
    x.requires_grad_(True)
    loss = dcq_ops.dcq_cross_entropy(x, k, y, W, Y, backend=backend)
    (grad,) = torch.autograd.grad(loss, x, create_graph=True)  # the first derivative is fine everywhere
    (plain,) = torch.autograd.grad(dcq_ops.dcq_cross_entropy(x, k, y, W, Y, backend=backend), x)
    assert torch.equal(grad.detach(), plain)
    if backend == "reference":  # plain PyTorch: second derivatives exist
        (second,) = torch.autograd.grad(grad.square().sum(), x)
        assert torch.isfinite(second).all()
    else:
        with pytest.raises(RuntimeError, match="first derivative only.*backend='reference'"):
            torch.autograd.grad(grad.square().sum(), x)


# ----------------------------------------------------------------- state checked on load


def trained_loss():
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10)
    loss_fn(*good_batch())
    return loss_fn


def corrupt(state, name, change):
    state = {n: t.clone() for n, t in state.items()}
    change(state[name])
    return state


def _scale_slot(weights, slot=1, factor=1.5):
    weights[slot] *= factor


BAD_STATES = {  # case: (tensor, change, words of the error)
    "nan weights": ("queue.weights", lambda w: w[2].fill_(float("nan")), "weights must be finite.*slot 2"),
    "inf weights": ("queue.weights", lambda w: w[0, 3].fill_(float("inf")), "weights must be finite.*slot 0"),
    "row not unit": ("queue.weights", _scale_slot, "unit-norm row.*norm 1.5.*slot 1"),
    "zero filled row": ("queue.weights", lambda w: w[4].zero_(), "unit-norm row.*norm 0.*slot 4"),
    "label > num_classes": ("queue.labels", lambda y: y[0].fill_(41), "labels must be < num_classes = 40"),
    "label < -1": ("queue.labels", lambda y: y[0].fill_(-3), "labels must be >= -1"),
    "ptr past the end": ("queue.ptr", lambda p: p.fill_(99), r"ptr must be in \[0, 10\), got 99"),
    "negative ptr": ("queue.ptr", lambda p: p.fill_(-1), r"ptr must be in \[0, 10\), got -1"),
}


@pytest.mark.parametrize("case", sorted(BAD_STATES))
def test_load_state_dict_refuses_a_queue_training_cannot_produce(case):
    name, change, message = BAD_STATES[case]
    state = corrupt(trained_loss().state_dict(), name, change)
    fresh = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10)
    before = queue_state(fresh)
    with pytest.raises(ValueError, match=message):
        fresh.load_state_dict(state)
    assert_unchanged(fresh, before)  # nothing of the bad state was loaded


def test_load_state_dict_accepts_what_training_produced_in_every_queue_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        source = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10, queue_dtype=dtype)
        for seed in range(4):  # wraps around: every slot filled
            x, k, y, *_ = make_inputs(rows=5, dim=6, num_classes=40, seed=seed)
            source(x * 1e3, y, k * 1e-3)
        target = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10, queue_dtype=dtype)
        target.load_state_dict(source.state_dict())
        assert torch.equal(target.queue.weights, source.queue.weights)


def test_prefill_and_its_label_of_no_class_load_back():
    """Random warm-up vectors belong to no class: label num_classes, a negative for every
    row. A checkpoint holding them loads; a label beyond it does not."""
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10)
    loss_fn.prefill(torch.randn(10, 6, generator=torch.Generator().manual_seed(5)))
    assert loss_fn.queue.labels.tolist() == [40] * 10 and int(loss_fn.queue.ptr) == 0
    norms = loss_fn.queue.weights.norm(dim=1)
    assert torch.allclose(norms, torch.ones_like(norms))
    fresh = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=10)
    fresh.load_state_dict(loss_fn.state_dict())
    assert torch.equal(fresh.queue.labels, loss_fn.queue.labels)
    x, y, k = good_batch()
    assert torch.isfinite(fresh(x, y, k))  # every slot a negative
    with pytest.raises(ValueError, match="labels must be < num_classes = 40"):
        loss_fn.prefill(torch.randn(2, 6), torch.tensor([3, 40]))
    with pytest.raises(ValueError, match="class_weights must be finite"):
        loss_fn.prefill(torch.full((2, 6), float("nan")))
    assert loss_fn.queue_size == 10


def test_class_queue_checks_its_state_without_num_classes():
    queue = dcq_ops.ClassQueue(4, 3)
    queue.enqueue(torch.randn(2, 3), torch.tensor([7, 1000]))
    state = queue.state_dict()
    dcq_ops.ClassQueue(4, 3).load_state_dict(state)  # any label >= 0 is a class here
    with pytest.raises(ValueError, match=r"ptr must be in \[0, 4\)"):
        dcq_ops.ClassQueue(4, 3).load_state_dict(corrupt(state, "ptr", lambda p: p.fill_(4)))


def test_sharded_queue_checks_the_global_state():
    shard = dcq_ops.ShardedClassQueue(6, 3, world_size=2, rank=1)
    weights = torch.nn.functional.normalize(torch.randn(6, 3), dim=1)
    labels = torch.tensor([0, 1, 2, -1, -1, -1])
    shard.load_global_(weights, labels, 3)  # the global pointer may point into another rank's block
    assert int(shard.ptr) == 3
    with pytest.raises(ValueError, match=r"ptr must be in \[0, 6\)"):
        shard.load_global_(weights, labels, 6)
    with pytest.raises(ValueError, match="unit-norm"):
        shard.load_global_(weights * 2, labels, 0)


# ----------------------------------------------------------------- fallbacks that speak


def test_auto_falling_back_to_the_reference_warns_once(monkeypatch):
    import importlib
    backends = importlib.import_module("dcq_ops.backends")  # the module (dcq_ops.backends is also a function)
    monkeypatch.setattr(backends, "extension_loaded", lambda: False)  # as a plain `pip install .` leaves it
    monkeypatch.setattr(backends, "EXTENSION_ERROR", "dcq_ops._C is not built (test)")
    monkeypatch.setattr(backends, "_WARNED_FALLBACK", set())
    x, k, y, W, Y = make_inputs(rows=4, dim=5, slots=6)
    with pytest.warns(RuntimeWarning, match="runs the plain PyTorch 'reference' backend.*N x K logits in plain PyTorch"):
        loss = dcq_ops.dcq_cross_entropy(x, k, y, W, Y)
    assert torch.equal(loss, dcq_ops.dcq_cross_entropy(x, k, y, W, Y, backend="reference"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per device type
        dcq_ops.dcq_cross_entropy(x, k, y, W, Y)
        dcq_ops.dcq_cross_entropy(x, k, y, W, Y, backend="reference")  # asked for: no warning


def test_the_interpreter_refuses_a_bf16_queue(monkeypatch):
    import importlib
    pytest.importorskip("triton", reason="Triton is not installed")
    backends = importlib.import_module("dcq_ops.backends")
    # CPU tensors under TRITON_INTERPRET=1 (tests/test_triton.py runs the interpreter
    # itself); the refusal comes from the backend table, before any kernel is imported.
    monkeypatch.setattr(backends, "triton_interpreting", lambda: True)
    x, k, y, W, Y = make_inputs(rows=4, dim=5, slots=6)
    with pytest.raises(TypeError, match="Triton interpreter.*bfloat16"):
        dcq_ops.dcq_cross_entropy(x, k, y, W.bfloat16(), Y, backend="triton")
