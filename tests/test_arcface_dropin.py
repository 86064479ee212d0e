"""DCQLoss as a drop-in for arcface_torch's PartialFC_V2 (issue 7).

The reference below re-implements, in the test, what arcface_torch computes with
a full classification layer: PartialFC_V2 (sample_rate 1, one process) feeds
clamped cosines to CombinedMarginLoss / ArcFace / CosFace and takes the
cross-entropy. With a queue holding one unit weight per class and each sample's
positive weight equal to its class's queue weight, DCQ's loss and gradient must
equal it: DCQ excludes the same-class queue entry and uses the sample's own
class weight as the positive, which is then exactly the full softmax.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, cosine_rounding, positive_slope
from dcq_ops import DCQLoss, MarginConfig, margin_from
from error_model import assert_within, reference_pair

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "arcface_torch" / "train_dcq.py"
CPU_BACKENDS = ["chunked", "reference"] if dcq_ops.extension_loaded() else ["reference"]


# ---------------------------------------------------------------------------
# arcface_torch's margin losses, re-implemented from their documented behaviour.
# `calls` counts forward calls: DCQLoss must read them by attribute only.
# ---------------------------------------------------------------------------

class CombinedMarginLoss(nn.Module):
    """arcface_torch.losses.CombinedMarginLoss: filtering (inter-class cosines
    above the threshold become 0, without gradient), then the ArcFace branch
    (m1 == 1, m3 == 0: cos(theta + m2) applied under no_grad, so the gradient is
    that of s * cos) or the CosFace branch (m3 > 0: cos - m3); logits * s."""

    def __init__(self, s, m1, m2, m3, interclass_filtering_threshold=0):
        super().__init__()
        self.s, self.m1, self.m2, self.m3 = s, m1, m2, m3
        self.interclass_filtering_threshold = interclass_filtering_threshold
        self.calls = 0

    def forward(self, logits, labels):
        self.calls += 1
        target = F.one_hot(labels.view(-1), logits.shape[1]).bool()
        if self.interclass_filtering_threshold > 0:
            with torch.no_grad():
                keep = ~((logits > self.interclass_filtering_threshold) & ~target)
            logits = logits * keep
        if self.m1 == 1.0 and self.m3 == 0.0:
            with torch.no_grad():
                with_margin = torch.where(target, torch.cos(torch.acos(logits) + self.m2), logits)
            logits = logits + (with_margin - logits).detach()  # the value with margin, the gradient of cos
            return logits * self.s
        if self.m3 > 0:
            return (logits - self.m3 * target) * self.s
        raise ValueError("arcface_torch raises for this margin")


class ArcFace(nn.Module):
    """arcface_torch.losses.ArcFace(s, margin): stores `scale` and `margin`; margin under no_grad."""

    def __init__(self, s=64.0, margin=0.5):
        super().__init__()
        self.scale, self.margin = s, margin
        self.calls = 0

    def forward(self, logits, labels):
        self.calls += 1
        return CombinedMarginLoss(self.scale, 1.0, self.margin, 0.0)(logits, labels)


class CosFace(nn.Module):
    """arcface_torch.losses.CosFace(s, m)."""

    def __init__(self, s=64.0, m=0.40):
        super().__init__()
        self.s, self.m = s, m
        self.calls = 0

    def forward(self, logits, labels):
        self.calls += 1
        return CombinedMarginLoss(self.s, 1.0, 0.0, self.m)(logits, labels)


def full_softmax_loss(margin_loss, embeddings, weight, labels):
    """PartialFC_V2 with sample_rate 1 in one process: cosines to every class,
    clamped, the margin loss, then the mean cross-entropy."""
    logits = F.linear(F.normalize(embeddings), F.normalize(weight)).clamp(-1, 1)
    logits = margin_loss(logits, labels.view(-1, 1))
    return F.cross_entropy(logits, labels.view(-1))


def classes_and_batch(num_classes=41, dim=19, rows=29, seed=0, dtype=torch.float32):
    """A full weight matrix [C, D] and a batch whose embeddings are near their
    class weight (positives with large cosines, so filtering and the margin
    matter), a few far from it (theta + m2 > pi for ArcFace), duplicate labels."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(num_classes, dim, generator=g, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (rows,), generator=g)
    labels[1] = labels[0]
    embeddings = F.normalize(weight[labels], dim=1) + 0.7 * torch.randn(rows, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    embeddings[:3] = -embeddings[:3]  # positive cosine near -1
    embeddings = embeddings * (1 + torch.rand(rows, 1, generator=g, dtype=torch.float64))
    return weight.to(dtype), embeddings.to(dtype), labels


def dcq_with_full_queue(margin_loss, weight, embeddings, labels, backend, **kwargs):
    """DCQLoss whose queue holds every class's weight once; returns (loss, grad)."""
    num_classes, dim = weight.shape
    module = DCQLoss(margin_loss, dim, num_classes, queue_size=num_classes, backend=backend, **kwargs)
    module.queue.enqueue(weight, torch.arange(num_classes))
    x = embeddings.clone().requires_grad_(True)
    loss = module(x, labels, weight[labels])
    loss.backward()
    return loss.detach(), x.grad


MARGINS = {
    "cosface": lambda: CombinedMarginLoss(64, 1.0, 0.0, 0.4),
    "arcface": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0),
    "arcface_filtered": lambda: CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.25),
    "cosface_filtered": lambda: CombinedMarginLoss(64, 1.0, 0.0, 0.35, 0.2),
    "ArcFace_class": lambda: ArcFace(64, 0.45),
    "CosFace_class": lambda: CosFace(30, 0.3),
}


def reference_loss_and_grad(margin_loss, weight, embeddings, labels, dtype=torch.float64):
    x = embeddings.to(dtype).requires_grad_(True)
    loss = full_softmax_loss(margin_loss, x, weight.to(dtype), labels)
    loss.backward()
    return loss.detach(), x.grad


def assert_matches_full_softmax(loss, grad, margin_loss, weight, embeddings, labels):
    """Within the error model (tests/error_model.py): a small multiple of what the same
    full softmax computed in fp32 errs against it in float64."""
    exact_loss, exact_grad = reference_loss_and_grad(margin_loss, weight, embeddings, labels)
    low_loss, low_grad = reference_loss_and_grad(margin_loss, weight, embeddings, labels, dtype=torch.float32)
    assert_within(loss, exact_loss, low_loss, dtype=torch.float32, what="loss")
    assert_within(grad, exact_grad, low_grad, dtype=torch.float32, what="gradient")


# ---------------------------------------------------------------------------
# DCQ with a full queue == arcface_torch's full softmax
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("name", list(MARGINS))
def test_full_queue_equals_arcface_torch_full_softmax(name, backend):
    weight, embeddings, labels = classes_and_batch()
    margin_loss = MARGINS[name]()
    loss, grad = dcq_with_full_queue(margin_loss, weight, embeddings, labels, backend)
    assert margin_loss.calls == 0, "DCQLoss must read the margin by attribute, never call the margin object"
    assert_matches_full_softmax(loss, grad, MARGINS[name](), weight, embeddings, labels)


def test_filtering_and_straight_through_are_exercised():
    """The cases above would not detect a missing filter or an exact ArcFace
    gradient if the data did not make them matter: check that they do."""
    weight, embeddings, labels = classes_and_batch()
    cos = F.normalize(embeddings) @ F.normalize(weight).t()
    negatives = ~F.one_hot(labels, weight.shape[0]).bool()
    assert ((cos > 0.25) & negatives).sum() >= 5  # some negatives filtered
    assert (cos[~negatives] > 0.25).sum() >= 5  # some positives above the threshold, not filtered
    filtered, _ = reference_loss_and_grad(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.25), weight, embeddings, labels)
    unfiltered, _ = reference_loss_and_grad(CombinedMarginLoss(64, 1.0, 0.5, 0.0), weight, embeddings, labels)
    assert abs(filtered - unfiltered) > 1e-2
    _, straight_through_margin = dcq_with_full_queue(CombinedMarginLoss(64, 1.0, 0.5, 0.0), weight, embeddings, labels,
                                              CPU_BACKENDS[0])
    _, exact = dcq_with_full_queue(MarginConfig(64, 1.0, 0.5, 0.0), weight, embeddings, labels, CPU_BACKENDS[0])
    assert (straight_through_margin - exact).abs().max() > 1e-3


# ---------------------------------------------------------------------------
# The margin, read by attribute
# ---------------------------------------------------------------------------

def test_margin_objects_read_by_attribute():
    arc = margin_from(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.3))
    assert arc == MarginConfig(64.0, 1.0, 0.5, 0.0, 0.3, straight_through_margin=True)
    cos = margin_from(CombinedMarginLoss(64, 1.0, 0.0, 0.4))
    assert cos == MarginConfig(64.0, 1.0, 0.0, 0.4, 0.0, straight_through_margin=False)
    assert margin_from(ArcFace(32, 0.4)) == MarginConfig(32.0, 1.0, 0.4, 0.0, 0.0, straight_through_margin=True)
    assert margin_from(CosFace(30, 0.25)) == MarginConfig(30.0, 1.0, 0.0, 0.25, 0.0, straight_through_margin=False)
    # Tensor-valued attributes and "off" thresholds as arcface_torch treats them (<= 0 or >= 1).
    assert margin_from(CombinedMarginLoss(torch.tensor(64.0), 1, 0.5, 0, -1)).interclass_filtering_threshold == 0
    assert margin_from(CombinedMarginLoss(64, 1, 0.5, 0, 1.0)).interclass_filtering_threshold == 0
    # SphereFace (arcface_torch raises): DCQ's combined margin with the exact gradient.
    assert margin_from(CombinedMarginLoss(30, 1.5, 0.0, 0.0)) == MarginConfig(30.0, 1.5, 0.0, 0.0, 0.0, False)


def test_legacy_arcface_with_s_and_m_is_not_mistaken_for_cosface():
    class ArcFace(nn.Module):  # arcface_torch's first ArcFace stored (s, m) like CosFace
        def __init__(self, s=64.0, m=0.5):
            super().__init__()
            self.s, self.m = s, m

    assert margin_from(ArcFace(64, 0.5)) == MarginConfig(64.0, 1.0, 0.5, 0.0, 0.0, straight_through_margin=False)


def test_ambiguous_combined_margin_is_refused():
    with pytest.raises(ValueError, match="m1=1.0, m2=0.5, m3=0.2.*ignores m1 and m2"):
        DCQLoss(CombinedMarginLoss(64, 1.0, 0.5, 0.2), 16, 100)
    with pytest.raises(ValueError, match="ignores m1 and m2"):
        margin_from(CombinedMarginLoss(64, 1.2, 0.0, 0.2))


def test_unknown_margin_object_error_lists_what_is_accepted():
    class Softmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = 64.0

    with pytest.raises(TypeError, match=r"margin_loss must be one of: None.*MarginConfig.*s, m1, m2, m3.*"
                                        r"margin, and s or scale.*\(s, m\); got Softmax"):
        DCQLoss(Softmax(), 16, 100)
    with pytest.raises(TypeError, match="margin_loss.s must be a number, got 'big'"):
        margin_from(CosFace("big", 0.3))
    with pytest.raises(ValueError, match="MarginConfig.m1 .* must be >= 1, got 0.5"):
        margin_from(CombinedMarginLoss(64, 0.5, 0.0, 0.0))


def test_positional_arguments_like_partial_fc_v2():
    margin_loss = CombinedMarginLoss(64, 1.0, 0.5, 0.0)
    module = DCQLoss(margin_loss, 24, 1000, 0.1, True)  # PartialFC_V2(margin_loss, embedding_size, num_classes, sample_rate, fp16)
    assert module.queue.queue_size == 100 and module.queue.dim == 24
    assert module.queue.weights.dtype == torch.float16
    assert module.margin == MarginConfig(64.0, 1.0, 0.5, 0.0, 0.0, straight_through_margin=True)
    assert list(module.parameters()) == []
    # train_v2.py puts the module's (empty) parameters in their own group; the optimizer accepts it.
    backbone = nn.Linear(8, 24)
    torch.optim.SGD([{"params": backbone.parameters()}, {"params": module.parameters()}], lr=0.1)
    loss = module(torch.randn(6, 24, requires_grad=True), torch.randint(0, 1000, (6, 1)), torch.randn(6, 24))
    assert loss.dim() == 0 and margin_loss.calls == 0


# ---------------------------------------------------------------------------
# Labels [N, 1] and any integer dtype; changing batch sizes
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shape", ["n", "n1"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_labels_shape_and_integer_dtype(shape, dtype):
    weight, embeddings, labels = classes_and_batch(num_classes=37)
    given = labels.to(dtype)
    given = given.view(-1, 1) if shape == "n1" else given
    results = []
    for lab in (labels, given):
        module = DCQLoss(CosFace(64, 0.4), weight.shape[1], 37, queue_size=50)
        module.queue.enqueue(weight, torch.arange(37))
        x = embeddings.clone().requires_grad_(True)
        loss = module(x, lab, weight[labels])
        loss.backward()
        results.append((loss.detach(), x.grad, module.queue.labels.clone()))
    (loss_a, grad_a, queue_a), (loss_b, grad_b, queue_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
    assert torch.equal(queue_a, queue_b) and queue_b.dtype == torch.int64
    assert torch.equal(queue_b[37:], labels[:13])  # enqueued after the 37 class weights


def test_bad_labels_are_refused_with_clear_messages():
    module = DCQLoss(None, 8, 10, queue_size=20, validate="eager")
    x, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(TypeError, match="labels must be an integer tensor, got torch.float32"):
        module(x, torch.zeros(4, 1), k)
    with pytest.raises(ValueError, match=r"labels must have shape \[N\] or \[N, 1\], got \(4, 2\)"):
        module(x, torch.zeros(4, 2, dtype=torch.long), k)
    with pytest.raises(ValueError, match="labels must be < num_classes = 10, got a label of 10"):
        module(x, torch.tensor([[1], [2], [3], [10]], dtype=torch.int32), k)
    assert module.queue.labels.eq(-1).all(), "a refused batch must leave the queue unchanged"


def test_batch_size_may_change_between_steps():
    """PartialFC_V2 asserts on a changed batch size; DCQLoss must not. Each step
    is checked against the reference on the queue as it was before the step,
    and the queue against a plain FIFO model."""
    dim, num_classes, slots = 12, 30, 23
    module = DCQLoss(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.3), dim, num_classes, queue_size=slots)
    fifo_weights, fifo_labels = [], []
    g = torch.Generator().manual_seed(1)
    for step, rows in enumerate([8, 5, 13, 1, 23, 7, 8]):
        x = torch.randn(rows, dim, generator=g, requires_grad=True)
        k = torch.randn(rows, dim, generator=g)
        y = torch.randint(0, num_classes, (rows, 1), generator=g, dtype=torch.int32)
        before_w, before_l = module.queue.weights.clone(), module.queue.labels.clone()
        loss = module(x, y, k)
        loss.backward()
        inputs = (x.detach(), k, y.view(-1).long(), before_w, before_l)
        (low_loss, low_grad), (exact_loss, exact_grad) = reference_pair(inputs, module.margin.kwargs(),
                                                                        reduction="mean")
        assert_within(loss.detach(), exact_loss, low_loss, dtype=torch.float32, what=f"step {step} loss")
        assert_within(x.grad, exact_grad, low_grad, dtype=torch.float32, what=f"step {step} gradient")
        fifo_weights = (fifo_weights + list(F.normalize(k, dim=1)))[-slots:]
        fifo_labels = (fifo_labels + y.view(-1).tolist())[-slots:]
        ptr = int(module.queue.ptr)
        order = [(ptr - len(fifo_labels) + i) % slots for i in range(len(fifo_labels))]
        assert module.queue.labels[order].tolist() == fifo_labels
        torch.testing.assert_close(module.queue.weights[order], torch.stack(fifo_weights))


# ---------------------------------------------------------------------------
# Mixed precision: fp16 queue, autocast, GradScaler
# ---------------------------------------------------------------------------

def test_fp16_queue_runs_the_gemms_in_half_within_the_rounding_bounds():
    """fp16=True, as PartialFC_V2(fp16=True): a half queue and half GEMM operands, fp32
    accumulation; within tests/bounds.py of the exact loss on the same (half) queue."""
    weight, embeddings, labels = classes_and_batch()
    num_classes, dim = weight.shape
    module = DCQLoss(ArcFace(64, 0.5), dim, num_classes, 1.0, True, backend=CPU_BACKENDS[0])
    assert module.queue.weights.dtype == torch.float16
    module.queue.enqueue(weight, torch.arange(num_classes))
    queue_w, queue_l = module.queue.weights.clone(), module.queue.labels.clone()
    x = embeddings.clone().requires_grad_(True)
    loss = module(x, labels, weight[labels])
    loss.backward()
    assert loss.dtype == torch.float32 and x.grad.dtype == torch.float32
    margin = module.margin.kwargs()
    x64 = embeddings.double().requires_grad_(True)
    exact = dcq_ops.reference.dcq_cross_entropy(x64, weight[labels].double(), labels, queue_w.double(), queue_l,
                                                **margin, reduction="none")
    exact.mean().backward()
    delta = cosine_rounding(embeddings, queue_w, torch.float16)
    assert_loss_close(loss.reshape(1), exact.mean().detach().reshape(1), scale=64.0, delta=delta.mean().reshape(1))
    rows = torch.full((labels.shape[0],), 1.0 / labels.shape[0], dtype=torch.float64)
    assert_grad_close(x.grad, x64.grad, embeddings=embeddings, scale=64.0, delta=delta,
                      slope=positive_slope(embeddings, weight[labels], 1.0, 0.5, 64.0, True),
                      gemm_dtype=torch.float16, row_weights=rows)
    assert torch.allclose(module.queue.weights[:4].float().norm(dim=1), torch.ones(4), atol=2.0**-10 * 4, rtol=0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_loss_under_autocast_accumulates_in_fp32(backend):
    """Inside autocast the loss is computed as outside it (the reference backend's
    matmul would otherwise run in bfloat16 on the CPU)."""
    weight, embeddings, labels = classes_and_batch()
    outside, _ = dcq_with_full_queue(CosFace(64, 0.4), weight, embeddings, labels, backend)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside, _ = dcq_with_full_queue(CosFace(64, 0.4), weight, embeddings, labels, backend)
    assert torch.equal(inside, outside)  # the same computation, to the bit


class TinyBackbone(nn.Module):
    """Trunk under autocast, embedding head in fp32 (as arcface_torch's iresnet with fp16=True)."""

    def __init__(self, dim_in=20, dim=16, amp_dtype=torch.float16):
        super().__init__()
        self.amp_dtype = amp_dtype
        self.trunk = nn.Sequential(nn.Linear(dim_in, 64), nn.ReLU(), nn.Linear(64, 64))
        self.fc = nn.Linear(64, dim)

    def forward(self, x):
        with torch.autocast(x.device.type, dtype=self.amp_dtype):
            h = self.trunk(x)
        return self.fc(h.float())


def run_mixed_precision_training(device, amp_dtype, fp16, steps=8):
    torch.manual_seed(0)
    dim, num_classes = 16, 50
    backbone = TinyBackbone(dim=dim, amp_dtype=amp_dtype).to(device)
    generator = dcq_ops.MomentumEncoder(backbone, momentum=0.9)
    module = DCQLoss(CombinedMarginLoss(64, 1.0, 0.5, 0.0), dim, num_classes, 0.5, fp16).to(device)
    opt = torch.optim.SGD([{"params": backbone.parameters()}, {"params": module.parameters()}], lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=2.0 ** 16, growth_interval=2)
    start = [p.detach().clone() for p in backbone.parameters()]
    prototypes = torch.randn(num_classes, 20, device=device)
    losses = []
    for step in range(steps):
        labels = torch.randint(0, num_classes, (16, 1), device=device)
        img = prototypes[labels.view(-1)] + 0.3 * torch.randn(16, 20, device=device)
        img_b = prototypes[labels.view(-1)] + 0.3 * torch.randn(16, 20, device=device)
        with torch.autocast(device, dtype=amp_dtype):
            loss = module(backbone(img), labels, generator(img_b))
        assert torch.isfinite(loss), f"step {step}: loss {loss}"
        losses.append(loss.item())
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(backbone.parameters(), 5)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        generator.update()
    assert all(torch.isfinite(p).all() for p in backbone.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(start, backbone.parameters())), "no optimizer step was taken"
    assert torch.isfinite(module.queue.weights.float()).all()
    assert scaler.get_scale() >= 1.0
    return losses


@pytest.mark.parametrize("fp16", [False, True])
@pytest.mark.parametrize("amp_dtype", [torch.float16, torch.bfloat16])
def test_autocast_and_grad_scaler_cpu_stay_finite(amp_dtype, fp16):
    """On a CPU, autocast runs in float16 or bfloat16 as asked; s = 64, ArcFace."""
    losses = run_mixed_precision_training("cpu", amp_dtype, fp16)
    assert losses[0] == 0.0 and min(losses[1:]) > 0  # the first batch meets an empty queue


@pytest.mark.cuda
@pytest.mark.parametrize("fp16", [False, True])
def test_autocast_fp16_and_grad_scaler_cuda_stay_finite(fp16):
    losses = run_mixed_precision_training("cuda", torch.float16, fp16)
    assert losses[0] == 0.0 and min(losses[1:]) > 0


# ---------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------

def _steps(module, seed, steps=4, rows=6, dim=10, num_classes=40):
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(rows, dim, generator=g)
        losses.append(module(x, torch.randint(0, num_classes, (rows,), generator=g), torch.randn(rows, dim, generator=g)))
    return torch.stack(losses)


def test_state_dict_holds_the_queue_and_resumes_exactly():
    module = DCQLoss(CosFace(64, 0.35), 10, 40, 0.5)
    _steps(module, seed=1)
    state = copy.deepcopy(module.state_dict())
    assert set(state) == {"queue.weights", "queue.labels", "queue.ptr"}
    continued = _steps(module, seed=2)

    resumed_module = DCQLoss(CosFace(64, 0.35), 10, 40, 0.5)
    resumed_module.load_state_dict(state)
    resumed = _steps(resumed_module, seed=2)
    assert torch.equal(resumed, continued)
    for name, tensor in module.state_dict().items():
        assert torch.equal(resumed_module.state_dict()[name], tensor), name

    fresh = _steps(DCQLoss(CosFace(64, 0.35), 10, 40, 0.5), seed=2)
    assert not torch.equal(fresh, continued), "the queue must matter, or this test proves nothing"


def test_save_queue_false_leaves_the_queue_out():
    module = DCQLoss(CosFace(64, 0.35), 10, 40, 0.5, save_queue=False)
    _steps(module, seed=1)
    assert module.queue.labels.ge(0).any()
    assert module.state_dict() == {}
    restarted = DCQLoss(CosFace(64, 0.35), 10, 40, 0.5, save_queue=False)
    restarted.load_state_dict(module.state_dict())
    assert restarted.queue.labels.eq(-1).all()  # starts with an empty queue, as the paper's code did


# ---------------------------------------------------------------------------
# torch.compile
# ---------------------------------------------------------------------------

def _compile_setup(validate=True):
    torch.manual_seed(0)
    backbone = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, 16))
    module = DCQLoss(CombinedMarginLoss(64, 1.0, 0.5, 0.0, 0.3), 16, 40, 0.5, validate=validate,
                     backend=CPU_BACKENDS[0])
    return backbone, module


def _train_step(backbone, module):
    def step(img, labels, class_weights):
        return module(backbone(img), labels, class_weights)
    return step


def _batches(n=4, rows=7):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(rows, 12, generator=g), torch.randint(0, 40, (rows, 1), generator=g, dtype=torch.int32),
             torch.randn(rows, 16, generator=g)) for _ in range(n)]


def test_torch_compile_has_no_graph_break_in_the_loss():
    backbone, module = _compile_setup(validate=True)
    explanation = torch._dynamo.explain(_train_step(backbone, module))(*_batches(1)[0])
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_torch_compile_fullgraph_training_step_matches_eager():
    """fullgraph=True fails on any graph break. backend="aot_eager" traces the ops'
    fake kernels and autograd and functionalises the in-place enqueue, like
    inductor, without compiling C++ (which would take ~30 s per graph on a CPU)."""
    torch._dynamo.reset()
    eager_backbone, eager_module = _compile_setup()
    backbone, module = copy.deepcopy(eager_backbone), copy.deepcopy(eager_module)
    compiled = torch.compile(_train_step(backbone, module), fullgraph=True, backend="aot_eager")
    eager = _train_step(eager_backbone, eager_module)
    for img, labels, class_weights in _batches():
        expected = eager(img, labels, class_weights)
        expected.backward()
        loss = compiled(img, labels, class_weights)
        loss.backward()
        # aot_eager runs the same kernels as eager mode: the same results, to the bit.
        assert torch.equal(loss, expected)
        for p, q in zip(backbone.parameters(), eager_backbone.parameters()):
            assert torch.equal(p.grad, q.grad)
            p.grad = q.grad = None
        for name, tensor in eager_module.state_dict().items():  # the queue was updated inside the graph
            assert torch.equal(module.state_dict()[name], tensor), name
    assert module.queue.labels.ge(0).all() and int(module.queue.ptr) == (4 * 7) % module.queue.queue_size


@pytest.mark.parametrize("validate", ["async", "eager"])
def test_torch_compile_bad_batch_leaves_the_queue_unchanged(validate):
    """A whole step (forward and enqueue) under fullgraph compile: a bad batch never
    enters the queue. "async" reports it at the next eager call (or check());
    "eager" raises at once (an asynchronous assert inside the graph)."""
    torch._dynamo.reset()
    backbone, module = _compile_setup(validate=validate)
    compiled = torch.compile(_train_step(backbone, module), fullgraph=True, backend="aot_eager")
    img, labels, class_weights = _batches(1)[0]
    compiled(img, labels, class_weights)
    before = {n: t.clone() for n, t in module.queue.state_dict().items()}
    bad_batches = [(img, torch.full_like(labels, 40), class_weights, "label >= num_classes = 40|labels must be < num"),
                   (img, labels, torch.full_like(class_weights, float("nan")), "class_weights")]
    for bad_img, bad_labels, bad_weights, words in bad_batches:
        if validate == "eager":
            with pytest.raises(RuntimeError, match=words):
                compiled(bad_img, bad_labels, bad_weights)
        else:
            compiled(bad_img, bad_labels, bad_weights)
            with pytest.raises(ValueError, match=f"had .*({words})"):
                module.check()
        for n, t in module.queue.state_dict().items():
            assert torch.equal(t, before[n]), n


# ---------------------------------------------------------------------------
# The example script
# ---------------------------------------------------------------------------

def test_example_script_trains_saves_and_resumes(tmp_path):
    common = [sys.executable, str(EXAMPLE), "--num-classes", "200", "--images-per-class", "2", "--batch-size", "32",
              "--embedding-size", "32", "--sample-rate", "0.2", "--frequent", "4", "--output", str(tmp_path),
              "--device", "cpu"]
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    run = subprocess.run(common + ["--num-epoch", "1"], capture_output=True, text=True, timeout=60, env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "queue: 40 slots for 200 classes" in run.stdout
    assert "Global Step: 12" in run.stdout and "verification accuracy after training" in run.stdout
    checkpoint = torch.load(tmp_path / "checkpoint_gpu_0.pt")
    assert checkpoint["global_step"] == 12
    queue = checkpoint["state_dict_softmax_fc"]
    assert set(queue) == {"queue.weights", "queue.labels", "queue.ptr"}
    assert queue["queue.labels"].ge(0).all() and int(queue["queue.ptr"]) == 12 * 32 % 40
    assert "state_dict_weight_generator" in checkpoint and (tmp_path / "model.pt").exists()

    resumed = subprocess.run(common + ["--num-epoch", "2", "--resume"], capture_output=True, text=True, timeout=60,
                             env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "Global Step: 24" in resumed.stdout and "Global Step: 12" not in resumed.stdout
    assert torch.load(tmp_path / "checkpoint_gpu_0.pt")["global_step"] == 24
