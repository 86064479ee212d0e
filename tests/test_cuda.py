"""On a GPU: the extension's CUDA kernels against the reference (the chunked
backend: cuBLAS GEMMs + one-pass CUDA epilogue; the queue's enqueue kernel),
the loss algebra's partials and finalize on CUDA, DCQLoss's GPU defaults (a bf16
queue), a whole training step that never waits on the host (also after
DCQLoss.prepare, for a batch size first seen after warm-up), the autotuned Triton
path with autotuning forced on, and the first-contact check on the GPU (passing for
every queue dtype, and catching a deliberately wrong Triton kernel). Skipped
without a GPU or without the CUDA kernels."""

import pytest
import torch

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, compute_dtype, cosine_rounding, positive_slope
from dcq_ops import reference
from error_model import assert_backend_within
from inputs import MARGINS, make_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not dcq_ops.has_cuda_kernels(),
                       reason=dcq_ops.EXTENSION_ERROR or "dcq_ops._C was built without its CUDA kernels"),
]


def chunked_op(inputs, margin, compute_grad=True, chunk_size=0):
    x, k, y, w, yq = inputs
    return torch.ops.dcq_ops.dcq_cross_entropy(
        x, k, y, w, yq, margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
        margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False),
        compute_grad, chunk_size)


def to(inputs, device):
    return tuple(t.to(device) for t in inputs)


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("chunk_size", [0, 64], ids=["one_chunk", "chunks_of_64"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_chunked_cuda_fp32_and_fp64_within_the_error_model(name, chunk_size, dtype):
    # fp32 operands (exact products: the float32 matmul precision is "highest" by
    # default) or float64: tests/error_model.py, as on the CPU.
    assert torch.get_float32_matmul_precision() == "highest"
    inputs = make_inputs(seed=20, dtype=dtype)
    loss, grad = chunked_op(to(inputs, "cuda"), MARGINS[name], chunk_size=chunk_size)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_backend_within(loss.cpu(), grad.cpu(), inputs, MARGINS[name], what=name)


@pytest.mark.parametrize("name", ["cosface", "arcface", "sphereface", "combined"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_chunked_cuda_half_precision_within_rounding_bounds(name, dtype):
    # On CUDA the GEMMs run in 16 bits (the CPU runs them in fp32, so the two
    # differ by the rounding): compare with the fp64 reference within the
    # bounds of that rounding.
    margin = MARGINS[name]
    inputs = to(make_inputs(dtype=dtype, seed=21), "cuda")
    x, k, y, w, yq = inputs
    xg = x.clone().requires_grad_(True)
    loss = dcq_ops.dcq_cross_entropy(xg, k, y, w, yq, **margin, reduction="none", backend="chunked")
    loss.sum().backward()
    xr = x.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, k.double(), y, w.double(), yq, **margin, reduction="none")
    exact.sum().backward()
    gemm_dtype = compute_dtype(x.dtype, w.dtype)
    delta = cosine_rounding(x, w, gemm_dtype)
    assert_loss_close(loss.detach(), exact.detach(), scale=margin["scale"], delta=delta)
    assert_grad_close(xg.grad, xr.grad, embeddings=x, scale=margin["scale"], delta=delta,
                      slope=positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), margin["scale"]),
                      gemm_dtype=gemm_dtype)


def test_chunked_cuda_large_queue_bounded_memory():
    # N=1024, K=2^18, D=512 in bf16: the chunked backend holds one chunk of
    # logits (64 MiB), never the N×K matrix (1 GiB in fp32).
    rows, slots, dim = 1024, 1 << 18, 512
    g = torch.Generator(device="cuda").manual_seed(22)
    x = torch.randn(rows, dim, device="cuda", generator=g).bfloat16()
    k = (0.7 * x.float() + torch.randn(rows, dim, device="cuda", generator=g)).bfloat16()
    y = torch.randint(0, slots // 4, (rows,), device="cuda", generator=g)
    w = torch.nn.functional.normalize(torch.randn(slots, dim, device="cuda", generator=g), dim=1).bfloat16()
    yq = torch.randint(0, slots // 4, (slots,), device="cuda", generator=g)
    inputs = (x, k, y, w, yq)
    margin = MARGINS["arcface"]
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grad = chunked_op(inputs, margin)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 512 << 20, f"peak extra memory {extra / 2**20:.0f} MiB"
    rows_checked = torch.arange(0, rows, 16, device="cuda")
    xs = x[rows_checked]
    xr = xs.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, k[rows_checked].double(), y[rows_checked], w.double(), yq, **margin,
                                        reduction="none")
    exact.sum().backward()
    delta = cosine_rounding(xs, w, torch.bfloat16)
    assert_loss_close(loss[rows_checked], exact.detach(), scale=margin["scale"], delta=delta)
    assert_grad_close(grad[rows_checked].bfloat16(), xr.grad, embeddings=xs, scale=margin["scale"], delta=delta,
                      slope=positive_slope(xs, k[rows_checked], 1.0, margin["m2"], margin["scale"]),
                      gemm_dtype=torch.bfloat16)


@pytest.mark.parametrize("queue_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("key_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_queue_enqueue_cuda_matches_cpu(queue_dtype, key_dtype):
    # Same FIFO writes (wrap-around, full-size batches), same device-side
    # pointer; the normalised rows agree to the queue dtype's rounding.
    size, dim = 101, 45
    queues = {device: dcq_ops.ClassQueue(size, dim, dtype=queue_dtype, device=device) for device in ("cpu", "cuda")}
    g = torch.Generator().manual_seed(23)
    for batch in [37, 1, 101, 64, 50, 3, 99]:
        keys = (torch.randn(batch, dim, generator=g) * 5).to(key_dtype)
        labels = torch.randint(0, 10_000, (batch,), generator=g)
        for device, queue in queues.items():
            queue.enqueue(keys.to(device), labels.to(device))
        cpu, gpu = queues["cpu"], queues["cuda"]
        assert gpu.ptr.item() == cpu.ptr.item()
        assert torch.equal(gpu.labels.cpu(), cpu.labels)
        eps = torch.finfo(queue_dtype).eps
        torch.testing.assert_close(gpu.weights.cpu().float(), cpu.weights.float(), rtol=eps, atol=eps)
    norms = queues["cuda"].weights.float().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), rtol=0, atol=4 * torch.finfo(queue_dtype).eps)


def test_queue_enqueue_cuda_does_not_synchronise():
    # The pointer lives on the device: enqueueing must not wait for the GPU.
    queue = dcq_ops.ClassQueue(1 << 12, 128, dtype=torch.float16, device="cuda")
    keys = torch.randn(512, 128, device="cuda")
    labels = torch.arange(512, device="cuda")
    queue.enqueue(keys, labels)  # load the kernel
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(10):
            queue.enqueue(keys, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert queue.ptr.item() == (11 * 512) % (1 << 12)


@pytest.mark.parametrize("backend", ["chunked", "triton"])
def test_partials_and_finalize_on_cuda(backend):
    """The sharded queue's path on one GPU: partials of slices, merged, finalised."""
    from dcq_ops.algebra import merge
    from dcq_ops.loss_kernels import LossKernels

    x, k, y, w, yq = to(make_inputs(rows=64, dim=128, slots=3000, num_classes=500, seed=24,
                                    queue_dtype=torch.bfloat16), "cuda")
    margin = dcq_ops.MarginConfig(64.0, 1.0, 0.5, 0.0, 0.0, True)
    kernels = LossKernels(margin, backend=backend)
    parts = [kernels.partials(x, y, w[a:b], yq[a:b], compute_grad=True) for a, b in ((0, 1000), (1000, 3000))]
    loss, grad = kernels.finalize(x, k, merge(parts), compute_grad=True)
    exact_x = x.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(exact_x, k.double(), y, w.double(), yq, **margin.kwargs(), reduction="none")
    exact.sum().backward()
    delta = cosine_rounding(x, w, torch.bfloat16)
    assert_loss_close(loss, exact.detach(), scale=64.0, delta=delta)
    assert_grad_close(grad.float(), exact_x.grad, embeddings=x, scale=64.0, delta=delta, gemm_dtype=torch.bfloat16,
                      slope=positive_slope(x, k, 1.0, 0.5, 64.0, True))


def test_dcq_loss_gpu_default_is_a_bf16_queue_that_follows_the_module():
    loss_fn = dcq_ops.DCQLoss(None, 16, 100, device="cuda")
    assert loss_fn.queue.weights.dtype == torch.bfloat16 and loss_fn.resolved_backend == "triton"
    moved = dcq_ops.DCQLoss(None, 16, 100).cuda()  # arcface_torch builds on the CPU, then .cuda()
    assert moved.queue.weights.dtype == torch.bfloat16 and moved.queue.weights.is_cuda
    assert moved.cpu().queue.weights.dtype == torch.float32
    assert dcq_ops.DCQLoss(None, 16, 100, queue_dtype=torch.float32, device="cuda").queue.weights.dtype == \
        torch.float32


def _training_setup(validate="async"):
    torch.manual_seed(25)
    backbone = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 128)).cuda()
    generator = dcq_ops.MomentumEncoder(backbone, momentum=0.99)
    loss_fn = dcq_ops.DCQLoss(None, 128, 1000, sample_rate=0.5, validate=validate).cuda()
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.1, momentum=0.9)
    g = torch.Generator(device="cuda").manual_seed(26)
    batches = [(torch.randn(64, 32, device="cuda", generator=g), torch.randn(64, 32, device="cuda", generator=g),
                torch.randint(0, 1000, (64,), device="cuda", generator=g)) for _ in range(8)]
    return backbone, generator, loss_fn, optimizer, batches


def _step(backbone, generator, loss_fn, optimizer, batch):
    a, b, labels = batch
    loss = loss_fn(backbone(a), labels, generator(b))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    generator.update()
    return loss.detach()


def test_training_step_never_waits_on_the_host():
    """Forward (Triton, bf16 queue), device-side validation, guarded enqueue, backward,
    optimizer and EMA steps: nothing synchronises once compiled and warmed up."""
    backbone, generator, loss_fn, optimizer, batches = _training_setup()
    for batch in batches[:3]:  # compile and autotune the kernels (those do synchronise)
        _step(backbone, generator, loss_fn, optimizer, batch)
    torch.cuda.synchronize()
    losses = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[3:]:
            losses.append(_step(backbone, generator, loss_fn, optimizer, batch))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(torch.stack(losses)).tolist()) and int(loss_fn.queue.ptr) == (8 * 64) % 500


def test_bad_batch_on_cuda_never_enters_the_queue():
    backbone, generator, loss_fn, optimizer, batches = _training_setup()
    _step(backbone, generator, loss_fn, optimizer, batches[0])
    before = {n: t.clone() for n, t in loss_fn.queue.state_dict().items()}
    a, b, labels = batches[1]
    _step(backbone, generator, loss_fn, optimizer, (a, b, labels.clone().fill_(1000)))  # label == num_classes
    for n, t in loss_fn.queue.state_dict().items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(ValueError, match="step 2 had a label >= num_classes = 1000"):
        _step(backbone, generator, loss_fn, optimizer, batches[2])


def test_check_sees_a_bad_batch_of_a_compiled_step():
    """Compiled steps copy nothing to the host; check() reads the device's status."""
    torch._dynamo.reset()
    backbone, generator, loss_fn, optimizer, batches = _training_setup()
    step = torch.compile(lambda a, labels, k: loss_fn(backbone(a), labels, k), fullgraph=True, backend="aot_eager")
    a, b, labels = batches[0]
    step(a, labels, generator(b))
    before = {n: t.clone() for n, t in loss_fn.queue.state_dict().items()}
    step(a, labels.clone().fill_(1000), generator(b))
    for n, t in loss_fn.queue.state_dict().items():
        assert torch.equal(t, before[n]), n
    with pytest.raises(ValueError, match="step 2 had a label >= num_classes = 1000"):
        loss_fn.check()


# ----------------------------------------------------------------------------
# The autotuned path, and the first-contact check on the GPU (dcq_ops.first_contact)


def _cuda_inputs(rows, dim, slots, dtype=torch.float32, queue_dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(rows, dim, device="cuda", generator=g)
    k = 0.7 * x + torch.randn(rows, dim, device="cuda", generator=g)
    y = torch.randint(0, slots // 4, (rows,), device="cuda", generator=g)
    w = torch.nn.functional.normalize(torch.randn(slots, dim, device="cuda", generator=g), dim=1)
    yq = torch.randint(0, slots // 4, (slots,), device="cuda", generator=g)
    yq[torch.rand(slots, device="cuda", generator=g) < 0.01] = -1
    return x.to(dtype), k.to(dtype), y, w.to(queue_dtype), yq


def test_autotuned_path_is_autotuned(monkeypatch):
    """Autotuning forced on whatever the environment says (scripts/gpu_check.sh runs the
    suite with DCQ_TRITON_AUTOTUNE=0, then this test with 1): the autotuner picks a
    configuration, and the result is within the rounding bounds of the fp64 reference."""
    pytest.importorskip("triton")
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "1")
    from dcq_ops.triton import launch, ops

    inputs = _cuda_inputs(256, 512, 1 << 15, seed=30)
    margin = {"scale": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}
    loss, grad = ops.triton_dcq_cross_entropy(*inputs, 64.0, 1.0, 0.5, 0.0, 0.0, False, True)
    torch.cuda.synchronize()
    picks = launch.autotuner_picks()
    assert picks and all(best is not None for best in picks.values()), picks
    rows = torch.arange(0, 256, 5, device="cuda")
    x, k, y, w, yq = inputs
    xs = x[rows]
    xr = xs.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, k[rows].double(), y[rows], w.double(), yq, **margin, reduction="none")
    exact.sum().backward()
    delta = cosine_rounding(xs, w, torch.bfloat16)
    assert_loss_close(loss[rows], exact.detach(), scale=64.0, delta=delta)
    assert_grad_close(grad[rows], xr.grad, embeddings=xs, scale=64.0, delta=delta, gemm_dtype=torch.bfloat16,
                      slope=positive_slope(xs, k[rows], 1.0, 0.5, 64.0))


@pytest.fixture
def fresh_first_contact(monkeypatch):
    from dcq_ops import first_contact

    monkeypatch.delenv(first_contact.SKIP_ENV, raising=False)
    first_contact.reset()
    yield first_contact
    first_contact.reset()


@pytest.mark.parametrize("backend", ["triton", "chunked"])
@pytest.mark.parametrize("queue_dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
def test_first_contact_passes_on_cuda(backend, queue_dtype, fresh_first_contact):
    if backend == "triton":
        pytest.importorskip("triton")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        outcomes = dcq_ops.warmup([512, 100], 512, 1 << 16, queue_dtype=queue_dtype, device="cuda", backend=backend,
                                  evaluation=True)
    assert len(outcomes) == 4 and {o.status for o in outcomes} == {"passed"}, outcomes
    assert {o.comparator for o in outcomes} == {"chunked" if backend == "triton" else "float64"}


def test_a_wrong_triton_kernel_on_cuda_falls_back_to_chunked(monkeypatch, fresh_first_contact):
    pytest.importorskip("triton")
    from dcq_ops.triton import ops

    inputs = _cuda_inputs(300, 256, 5000, seed=31)
    margin = {"scale": 64.0, "m1": 1.0, "m2": 0.5, "m3": 0.0}
    x, *rest = inputs
    expected = dcq_ops.dcq_cross_entropy(x, *rest, **margin, reduction="none", backend="chunked")
    fresh_first_contact.reset()
    original = ops.forward

    def wrong(*args, **kwargs):
        loss, grad = original(*args, **kwargs)
        return loss + 0.5, grad

    monkeypatch.setattr(ops, "forward", wrong)
    with pytest.warns(RuntimeWarning, match="first-contact check of backend 'triton' failed on cuda"):
        got = dcq_ops.dcq_cross_entropy(x, *rest, **margin, reduction="none", backend="triton")
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert "demoted by the first-contact check" in dcq_ops.backends("cuda")["triton"]
    again = dcq_ops.dcq_cross_entropy(x, *rest, **margin, reduction="none", backend="triton")
    torch.testing.assert_close(again, expected, rtol=0, atol=0)


def test_after_prepare_no_step_synchronises_even_a_new_batch_size(fresh_first_contact):
    """DCQLoss.prepare compiles, autotunes and checks every batch size given: a last, smaller
    batch does not synchronise either (without prepare its first call would check)."""
    backbone, generator, loss_fn, optimizer, batches = _training_setup()
    outcomes = loss_fn.prepare([64, 8])  # two row buckets (<= 64, <= 16): two shape classes
    assert len(outcomes) == 2 and {o.status for o in outcomes} == {"passed"}
    _step(backbone, generator, loss_fn, optimizer, batches[0])  # the optimizer's state
    torch.cuda.synchronize()
    a, b, labels = batches[1]
    torch.cuda.set_sync_debug_mode("error")
    try:
        for batch in batches[2:5]:
            _step(backbone, generator, loss_fn, optimizer, batch)
        _step(backbone, generator, loss_fn, optimizer, (a[:8], b[:8], labels[:8]))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(fresh_first_contact.outcomes()) == 2  # nothing checked during the steps
