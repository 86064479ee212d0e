"""DCQLoss: loss before enqueue, no enqueue in eval, queue sizing, margins, state_dict."""

import math
from types import SimpleNamespace

import pytest
import torch

import dcq_ops
from error_model import assert_within, reference_pair
from inputs import make_inputs

BACKENDS = ["reference"] + (["chunked"] if dcq_ops.extension_loaded() else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_loss_is_against_the_queue_before_the_call_then_enqueues(backend):
    loss_fn = dcq_ops.DCQLoss(None, 12, num_classes=100, queue_size=30, backend=backend)
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        x = torch.randn(9, 12, generator=g, requires_grad=True)
        k = torch.randn(9, 12, generator=g)
        y = torch.randint(0, 100, (9,), generator=g)
        inputs = (x.detach(), k, y, loss_fn.queue.weights.clone(), loss_fn.queue.labels.clone())
        (low_loss, low_grad), (exact_loss, exact_grad) = reference_pair(inputs, dict(scale=50.0, m3=0.3),
                                                                        reduction="mean")
        loss = loss_fn(x, y, k)
        loss.backward()  # after the in-place enqueue
        assert_within(loss.detach(), exact_loss, low_loss, dtype=torch.float32, what=f"step {step} loss")
        assert_within(x.grad, exact_grad, low_grad, dtype=torch.float32, what=f"step {step} gradient")
        slots = [(9 * step + i) % 30 for i in range(9)]
        assert loss_fn.queue.labels[slots].tolist() == y.tolist()
        torch.testing.assert_close(loss_fn.queue.weights[slots], torch.nn.functional.normalize(k, dim=1))
        if step == 0:
            assert loss.item() == 0.0  # empty queue: no negatives yet


def test_eval_mode_does_not_enqueue():
    loss_fn = dcq_ops.DCQLoss(None, 8, num_classes=50, sample_rate=0.2).eval()
    x, k, y = torch.randn(4, 8), torch.randn(4, 8), torch.arange(4)
    before = {n: b.clone() for n, b in loss_fn.named_buffers()}
    loss_fn(x, y, k)
    for n, b in loss_fn.named_buffers():
        assert torch.equal(b, before[n])


def test_queue_size_from_sample_rate_or_explicit():
    assert dcq_ops.DCQLoss(None, 8, num_classes=1001, sample_rate=0.1).queue_size == math.ceil(100.1)
    assert dcq_ops.DCQLoss(None, 8, num_classes=1001, queue_size=64).queue_size == 64
    assert dcq_ops.DCQLoss(None, 8, 10, 0.1, True).queue.weights.dtype == torch.float16
    with pytest.raises(ValueError, match="queue_size"):
        dcq_ops.DCQLoss(None, 8)


def test_margin_objects_are_read_by_attribute():
    combined = SimpleNamespace(s=64.0, m1=1.0, m2=0.5, m3=0.0, interclass_filtering_threshold=0.2)
    m = dcq_ops.DCQLoss(combined, 8, 100).margin
    assert (m.scale, m.m2, m.interclass_filtering_threshold, m.straight_through_margin) == (64.0, 0.5, 0.2, True)
    m = dcq_ops.DCQLoss(SimpleNamespace(s=30.0, m=0.35), 8, 100).margin
    assert (m.scale, m.m2, m.m3, m.straight_through_margin) == (30.0, 0.0, 0.35, False)
    m = dcq_ops.DCQLoss(None, 8, 100).margin
    assert (m.scale, m.m1, m.m2, m.m3) == (50.0, 1.0, 0.0, 0.3)
    with pytest.raises(TypeError, match="margin_loss"):
        dcq_ops.DCQLoss(object(), 8, 100)


def test_state_dict_round_trip_continues_exactly():
    a = dcq_ops.DCQLoss(None, 6, 40, 0.5)
    x, k, y, *_ = make_inputs(rows=7, dim=6, num_classes=40)
    a(x, y, k)
    b = dcq_ops.DCQLoss(None, 6, 40, 0.5)
    b.load_state_dict(a.state_dict())
    x, k, y, *_ = make_inputs(rows=7, dim=6, num_classes=40, seed=1)
    assert torch.equal(a(x, y, k), b(x, y, k))
    assert all(torch.equal(a.state_dict()[n], v) for n, v in b.state_dict().items())


def test_labels_of_shape_n1_and_other_integer_dtypes():
    loss_fn = dcq_ops.DCQLoss(None, 6, 40, 0.5)
    x, k, y, *_ = make_inputs(rows=7, dim=6, num_classes=40)
    loss_fn(x, y.int().view(-1, 1), k)
    assert loss_fn.queue.labels[:7].tolist() == y.tolist()


def test_backends_report():
    report = dcq_ops.backends("cpu")
    assert report["reference"] == "available"
    assert report["auto"].startswith("-> ")
    assert set(report) == {"auto", "triton", "chunked", "reference"}
    with pytest.raises(ValueError, match="backend"):
        dcq_ops.select_backend("cpu", "fastest")


def test_queue_dtype_policy():
    # "auto": fp32 on the CPU, and it follows the module to CUDA (bf16) and back (tested on a GPU in test_cuda).
    assert dcq_ops.DCQLoss(None, 8, 10).queue.weights.dtype == torch.float32
    assert dcq_ops.DCQLoss(None, 8, 10, queue_dtype=torch.bfloat16).queue.weights.dtype == torch.bfloat16
    assert dcq_ops.DCQLoss(None, 8, 10, fp16=True).queue.weights.dtype == torch.float16
    assert dcq_ops.loss.auto_queue_dtype("cuda") == torch.bfloat16
    assert dcq_ops.loss.auto_queue_dtype("cpu") == torch.float32
    with pytest.raises(TypeError, match="queue_dtype must be 'auto' or one of"):
        dcq_ops.DCQLoss(None, 8, 10, queue_dtype=torch.float64)
    with pytest.raises(ValueError, match="fp16=True means queue_dtype=torch.float16"):
        dcq_ops.DCQLoss(None, 8, 10, fp16=True, queue_dtype=torch.bfloat16)


def test_partial_fc_checkpoint_is_refused_with_an_explanation():
    loss_fn = dcq_ops.DCQLoss(None, 8, 100)
    with pytest.raises(ValueError, match="DCQ has no class weights to load.*Load the backbone"):
        loss_fn.load_state_dict({"weight": torch.randn(100, 8)})
    parent = torch.nn.Module()
    parent.head = loss_fn
    with pytest.raises(ValueError, match="'head.weight'"):
        parent.load_state_dict({"head.weight": torch.randn(100, 8)})
