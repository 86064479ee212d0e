"""The extension's CUDA kernels against their CPU counterparts and the reference:
the chunked backend (cuBLAS GEMMs + fused CUDA epilogue) and the queue's
enqueue kernel. Skipped without a GPU or without the CUDA kernels."""

import pytest
import torch

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, compute_dtype, cosine_rounding, positive_slope
from dcq_ops import reference
from inputs import MARGINS, make_inputs

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not dcq_ops.has_cuda_kernels(),
                       reason=dcq_ops.EXTENSION_ERROR or "dcq_ops._C was built without its CUDA kernels"),
]


def chunked_op(inputs, margin, compute_grad=True, chunk_size=0):
    x, k, y, w, yq = inputs
    return torch.ops.dcq_ops.margin_cross_entropy(
        x, k, y, w, yq, margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
        margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False),
        compute_grad, chunk_size)


def to(inputs, device):
    return tuple(t.to(device) for t in inputs)


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("chunk_size", [0, 64], ids=["one_chunk", "chunks_of_64"])
def test_chunked_cuda_matches_cpu_in_fp32(name, chunk_size):
    # In fp32 both devices compute the same thing; only summation order differs.
    inputs = make_inputs(seed=20)
    cpu_loss, cpu_grad = chunked_op(inputs, MARGINS[name], chunk_size=chunk_size)
    gpu_loss, gpu_grad = chunked_op(to(inputs, "cuda"), MARGINS[name], chunk_size=chunk_size)
    torch.testing.assert_close(gpu_loss.cpu(), cpu_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gpu_grad.cpu(), cpu_grad, rtol=1e-4, atol=1e-5 * cpu_grad.abs().max().item())


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
