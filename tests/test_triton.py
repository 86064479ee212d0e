"""The Triton backend against the reference (docs/loss.md), loss and gradient.

Without a GPU the kernels run on CPU tensors through Triton's interpreter
(TRITON_INTERPRET=1; fp32 and fp16 only, its bf16 dot is not exact); with one,
the same tests run compiled on CUDA, with bf16 added, followed by GPU-only
tests (large shapes, memory, determinism, every kernel configuration).

Errors are measured against the reference in float64 on the same (rounded)
inputs, within the bounds of tests/bounds.py: exact for what the kernel does in
fp32, plus what rounding its GEMM operands to 16 bits can cost.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

# Triton picks interpreter or compiler when a kernel is decorated, i.e. when
# Triton and dcq_ops.triton.kernels are first imported: import_ops sets
# TRITON_INTERPRET for that import only. Left set, it would make the triton
# backend "available" on CPU for every test module that runs after this one (see
# dcq_ops.backends); the tests below set it again (fixture) for the backend
# dispatch, and for Triton, which reads it at the launches too.
from dcq_ops.triton import import_ops  # noqa: E402

try:
    triton_ops = import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

import dcq_ops  # noqa: E402
from dcq_ops.triton import configs, kernels, launch  # noqa: E402
from bounds import assert_grad_close, assert_loss_close, compute_dtype, cosine_rounding, positive_slope  # noqa: E402
from dcq_ops import reference  # noqa: E402
from inputs import MARGINS, make_inputs  # noqa: E402

if not ON_CUDA and not kernels.INTERPRETED:
    pytest.skip(
        "dcq_ops.triton.kernels was imported before this module without TRITON_INTERPRET=1, "
        "so its kernels are compiled for a GPU; run with TRITON_INTERPRET=1 to test them on CPU",
        allow_module_level=True,
    )



def cuda_only(fn):
    return pytest.mark.cuda(pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")(fn))


# bf16 tl.dot is not exact in the interpreter: bf16 is tested compiled only.
HALF_DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else [torch.float16]


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch, request):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # for dcq_ops.backends' dispatch
    # The first configuration: tests compile each shape once instead of benchmarking
    # every configuration - except test_autotuned_path, which tests autotuning, whatever
    # the environment says (scripts/gpu_check.sh exports DCQ_TRITON_AUTOTUNE=0).
    autotuned = request.node.name == "test_autotuned_path"
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "1" if autotuned else "0")


def margin_args(margin):
    """dcq_cross_entropy's keyword arguments as the op's positional margin arguments."""
    return (margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
            margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False))


def row_weights(rows, seed=1, device=DEVICE):
    """Upstream gradients of the rows' losses: the backward must scale each row."""
    g = torch.Generator().manual_seed(seed)
    return (0.5 + torch.rand(rows, generator=g, dtype=torch.float64)).to(device)


def loss_and_grad(inputs, margin, *, backend, reduction="none", weights=None):
    x, *rest = inputs
    x = x.detach().clone().requires_grad_(True)
    loss = dcq_ops.dcq_cross_entropy(x, *rest, **margin, reduction=reduction, backend=backend)
    if reduction == "none":
        (loss * weights.to(loss.dtype)).sum().backward()
    else:
        loss.backward()
    return loss.detach(), x.grad


def exact_loss_and_grad(inputs, margin, *, reduction="none", weights=None):
    """The reference in float64 on the same (already rounded) inputs."""
    x, k, y, w, yq = inputs
    return loss_and_grad((x.double(), k.double(), y, w.double(), yq), margin, backend="reference",
                         reduction=reduction, weights=weights)


def check_against_reference(inputs, margin, *, reduction="none", exact_q=False):
    """Triton's loss rows and gradient within tests/bounds.py of the fp64 reference.
    `exact_q`: the normalised embeddings are representable in the compute dtype."""
    x, k, y, w, yq = inputs
    weights = row_weights(x.shape[0]) if reduction == "none" else None
    loss, grad = loss_and_grad(inputs, margin, backend="triton", reduction=reduction, weights=weights)
    exact_loss, exact_grad = exact_loss_and_grad(inputs, margin, reduction=reduction, weights=weights)
    gemm_dtype = compute_dtype(x.dtype, w.dtype)
    delta = cosine_rounding(x, w, gemm_dtype)
    if exact_q:
        assert delta.max().item() < 1e-6, "test inputs meant to be exact in the compute dtype are not"
    scale = margin["scale"]
    if reduction == "none":
        assert_loss_close(loss, exact_loss, scale=scale, delta=delta)
    else:  # a mean/sum of rows: the bound of the sum of the rows' bounds
        rows = 1 if reduction == "sum" else x.shape[0]
        bound = (1.01 * scale * delta.sum() + 2e-4 * exact_loss.abs() * rows) / rows
        assert abs(loss.double() - exact_loss).item() <= bound.item() + 1e-12, (loss, exact_loss, bound)
    slope = positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), scale,
                           margin.get("straight_through_margin", False))
    if reduction == "mean":
        wts = torch.full((x.shape[0],), 1.0 / x.shape[0], dtype=torch.float64, device=x.device)
    elif reduction == "sum":
        wts = torch.ones(x.shape[0], dtype=torch.float64, device=x.device)
    else:
        wts = weights
    assert grad.dtype == x.dtype
    assert_grad_close(grad, exact_grad, embeddings=x, scale=scale, delta=delta, slope=slope,
                      gemm_dtype=gemm_dtype, row_weights=wts)
    return loss, grad


def lattice_unit_rows(rows, dim, generator, nonzeros=16):
    """Unit rows with `nonzeros` entries ±1/4 (squares sum to exactly 1): their
    normalisation is exact in fp32 and representable in fp16 and bf16, so the
    kernel's only rounding left is that of the probabilities."""
    index = torch.rand(rows, dim, generator=generator).argsort(dim=1)[:, :nonzeros]
    sign = torch.randint(0, 2, (rows, nonzeros), generator=generator).double() * 2 - 1
    out = torch.zeros(rows, dim, dtype=torch.float64)
    return out.scatter_(1, index, 0.25 * sign)


def exact_inputs(rows=37, dim=45, slots=203, num_classes=25, empty=17, dtype=torch.float32, queue_dtype=None,
                 seed=0, device=DEVICE):
    """inputs.make_inputs's labels, queue and class weights, with embeddings
    on the ±1/4 lattice times powers of two (their norm), and class weights
    at decreasing distance from them (some rows confident, loss ~1e-10)."""
    _, _, labels, queue_weights, queue_labels = make_inputs(rows, dim, slots, num_classes, empty,
                                                            dtype=torch.float64, seed=seed)
    g = torch.Generator().manual_seed(seed + 1000)
    q = lattice_unit_rows(rows, dim, g)
    norms = 2.0 ** torch.randint(-1, 3, (rows, 1), generator=g).double()
    noise = torch.randn(rows, dim, generator=g, dtype=torch.float64) / dim**0.5
    class_weights = q + torch.linspace(0.02, 1.0, rows, dtype=torch.float64).unsqueeze(1) * noise
    queue_dtype = queue_dtype or dtype
    return ((q * norms).to(dtype).to(device), class_weights.to(dtype).to(device), labels.to(device),
            queue_weights.to(queue_dtype).to(device), queue_labels.to(device))


def random_inputs(dtype=torch.float32, queue_dtype=None, device=DEVICE, **kwargs):
    return tuple(t.to(device) for t in make_inputs(dtype=dtype, queue_dtype=queue_dtype, **kwargs))


# ----------------------------------------------------------------------------
# Every margin, odd sizes, duplicate labels, empty slots (interpreter or GPU)


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
def test_matches_reference_exact_inputs(name, dtype):
    inputs = exact_inputs(dtype=dtype)
    loss, _ = check_against_reference(inputs, MARGINS[name], exact_q=True)
    # Confident rows are in the test, and keep their relative precision (checked above).
    assert loss.min().item() < 1e-6, "no confident row: the relative precision check is void"


@pytest.mark.parametrize("name", ["cosface", "arcface", "arcface_straight_through", "sphereface", "combined"])
@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
def test_matches_reference_random_inputs(name, dtype):
    # Random embeddings: in 16 bits, the rounding of q moves the logits by up
    # to s * delta_i, which the bounds allow for (no filtering here: a rounded
    # cosine may cross the threshold; see test_filtering).
    check_against_reference(random_inputs(dtype=dtype, seed=3), MARGINS[name])


@pytest.mark.parametrize(
    "dtype,queue_dtype",
    [(torch.float32, torch.float16), (torch.float16, torch.float32)]
    + ([(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16), (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.float16)] if ON_CUDA else []),
    ids=str,
)
def test_mixed_input_and_queue_dtypes(dtype, queue_dtype):
    # The GEMMs run in the promoted dtype: fp32 whenever one side is fp32.
    inputs = random_inputs(dtype=dtype, queue_dtype=queue_dtype, seed=4)
    check_against_reference(inputs, MARGINS["arcface"])


def test_float64_is_refused_with_the_backends_that_take_it():
    inputs = random_inputs(dtype=torch.float64, seed=5)
    with pytest.raises(TypeError, match="float64 inputs run in float64 on the 'chunked' or 'reference'"):
        dcq_ops.dcq_cross_entropy(*inputs, **MARGINS["combined"], backend="triton")
    with pytest.raises(TypeError, match="float64 runs on the 'chunked' or 'reference' backend"):
        triton_ops.forward(*inputs[:3], inputs[3].double(), inputs[4], *margin_args(MARGINS["cosface"]), True)


def test_partials_and_finalize_are_the_loss_algebra():
    """The sharded queue's path: partials of queue slices (merged) then finalize, in
    Triton, equal the fused op; and the partials equal the chunked backend's."""
    from dcq_ops.algebra import Partials, merge

    x, k, y, w, yq = random_inputs(seed=14)
    margin = MARGINS["arcface_straight_through"]
    scale, m1, m2, m3, threshold, straight = margin_args(dict(margin, interclass_filtering_threshold=0.1))
    parts = []
    for a, b in ((0, 70), (70, 71), (71, 203)):
        row_max, row_sum, acc = triton_ops.triton_dcq_cross_entropy_partials(x, y, w[a:b], yq[a:b], scale, threshold, True)
        parts.append(Partials(row_max, row_sum, acc))
    whole = merge(parts)
    loss, grad = triton_ops.triton_dcq_cross_entropy_finalize(x, k, whole.row_max, whole.row_sum, whole.accumulator, scale, m1, m2, m3,
                                    straight, True)
    fused_loss, fused_grad = triton_ops.forward(x, k, y, w, yq, scale, m1, m2, m3, threshold, straight, True)
    weights = torch.ones(x.shape[0], dtype=torch.float64, device=DEVICE)
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device=DEVICE)
    assert_loss_close(loss, fused_loss.double(), scale=scale, delta=zero)
    assert_grad_close(grad, fused_grad.double(), embeddings=x, scale=scale, delta=zero, gemm_dtype=torch.float32,
                      slope=positive_slope(x, k, m1, m2, scale, straight), row_weights=weights)
    if dcq_ops.extension_loaded():
        chunked = torch.ops.dcq_ops.dcq_cross_entropy_partials(x.cpu(), y.cpu(), w.cpu(), yq.cpu(), scale, threshold, True, 0)
        # Maxima of logits s * q.W from fp32 dot products of unit vectors, each off by at
        # most D * 2^-24 (twice: one per backend).
        assert (whole.row_max.cpu() - chunked[0]).abs().max() <= 2 * scale * x.shape[1] * 2.0**-24
        # Both measure the sums from their (nearly equal) maxima: compare sum * exp(max).
        ratio = (whole.row_sum.cpu().double() / chunked[1].double()) * torch.exp(
            whole.row_max.cpu().double() - chunked[0].double())
        assert (ratio - 1).abs().max().item() < 1e-4


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions(reduction):
    check_against_reference(random_inputs(seed=6), MARGINS["cosface"], reduction=reduction)


def test_filtering():
    # Some queue entries are near-copies of embeddings of *other* classes
    # (cosine ~0.8): they are kept negatives above the threshold, hence
    # filtered. The threshold is chosen in a gap of the cosines, so that no
    # rounding (fp16 included) moves one across it.
    rows, dim, slots = 37, 45, 203
    x, k, y, w, yq = make_inputs(rows, dim, slots, num_classes=25, empty=17, dtype=torch.float64, seed=7)
    g = torch.Generator().manual_seed(7)
    copies = torch.randperm(slots, generator=g)[:40]
    source = torch.randint(0, rows, (40,), generator=g)
    w = w.clone()
    yq = yq.clone()
    w[copies] = F.normalize(F.normalize(x[source], dim=1) + 0.6 * F.normalize(
        torch.randn(40, dim, generator=g, dtype=torch.float64), dim=1), dim=1)
    yq[copies] = (y[source] + 1) % 25  # another class than the row it copies
    cos = F.normalize(x, dim=1) @ w.t()
    kept = (yq.view(1, -1) != y.view(-1, 1)) & (yq.view(1, -1) >= 0)
    thresholds = torch.arange(0.45, 0.76, 0.01, dtype=torch.float64)
    gaps = torch.stack([(cos[kept] - t).abs().min() for t in thresholds])
    threshold = thresholds[gaps.argmax()].item()
    assert gaps.max().item() > 0.01, "no gap in the cosines for a threshold"
    filtered = ((cos > threshold) & kept).sum().item()
    assert filtered >= 10, f"only {filtered} entries are filtered"
    margin = dict(MARGINS["cosface"], interclass_filtering_threshold=threshold)

    for dtype in [torch.float32] + HALF_DTYPES:
        inputs = tuple(t.to(dtype) if t.is_floating_point() else t for t in (x, k, y, w, yq))
        inputs = tuple(t.to(DEVICE) for t in inputs)
        loss, _ = check_against_reference(inputs, margin)
    # The filtering changed the answer (else this test would not test it).
    unfiltered, _ = loss_and_grad(inputs, MARGINS["cosface"], backend="triton", weights=row_weights(rows))
    assert (unfiltered.double() - loss.double()).abs().max().item() > 0.1


def test_row_without_negatives_has_zero_loss_and_gradient():
    x, k, y, w, yq = random_inputs(seed=8)
    # Row 0's class fills every non-empty slot of the first half of the queue;
    # the second half is empty (-1), so row 0 has no negative at all.
    yq = yq.clone()
    yq[: yq.numel() // 2] = y[0]
    yq[yq.numel() // 2:] = -1
    others = y != y[0]
    assert others.any()
    inputs = (x, k, y, w, yq)
    loss, grad = check_against_reference(inputs, MARGINS["arcface"])
    assert loss[~others].eq(0).all() and grad[~others].eq(0).all()
    assert (loss[others] > 0).all()


@pytest.mark.parametrize("slots", [0, 203], ids=["no_slot", "all_empty"])
def test_queue_without_negatives(slots):
    x, k, y, _, _ = random_inputs(seed=9)
    w = F.normalize(torch.randn(slots, x.shape[1], device=DEVICE), dim=1)
    yq = torch.full((slots,), -1, dtype=torch.long, device=DEVICE)
    loss, grad = loss_and_grad((x, k, y, w, yq), MARGINS["cosface"], backend="triton",
                               weights=row_weights(x.shape[0]))
    assert loss.eq(0).all() and grad.eq(0).all()


@pytest.mark.parametrize(
    "block_m,block_k,split_size",
    [(16, 16, 16), (16, 32, 48), (32, 16, 100), (16, 32, 1000), (64, 64, 64)],
)
def test_splits_and_tiles(block_m, block_k, split_size):
    # Row blocks and queue splits of every kind: partial tiles at the end of a
    # split, splits not a multiple of the tile, one split, and (first 64 slots
    # empty) splits that keep no entry at all.
    x, k, y, w, yq = random_inputs(seed=10)
    yq = yq.clone()
    yq[:64] = -1
    margin = MARGINS["combined"]
    loss, grad = triton_ops.forward(x, k, y, w, yq, *margin_args(margin), True, split_size=split_size,
                                   config=dict(BLOCK_M=block_m, BLOCK_K=block_k, num_warps=4, num_stages=1))
    xr = x.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, k.double(), y, w.double(), yq, **margin, reduction="none")
    exact.sum().backward()
    delta = torch.zeros(x.shape[0], dtype=torch.float64, device=DEVICE)
    assert_loss_close(loss, exact.detach(), scale=margin["scale"], delta=delta)
    assert_grad_close(grad, xr.grad, embeddings=x, scale=margin["scale"], delta=delta,
                      slope=positive_slope(x, k, margin["m1"], margin["m2"], margin["scale"]),
                      gemm_dtype=torch.float32)


def test_without_gradient():
    inputs = random_inputs(seed=11)
    margin = MARGINS["arcface"]
    with_grad, grad = triton_ops.triton_dcq_cross_entropy(*inputs, *margin_args(margin), True)
    without, no_grad = triton_ops.triton_dcq_cross_entropy(*inputs, *margin_args(margin), False)
    assert no_grad.shape == (0, inputs[0].shape[1]) and grad.shape == inputs[0].shape
    torch.testing.assert_close(without, with_grad, rtol=0, atol=0)
    with torch.no_grad():
        loss = dcq_ops.dcq_cross_entropy(*inputs, **margin, backend="triton", reduction="none")
    torch.testing.assert_close(loss, with_grad, rtol=0, atol=0)


def test_backward_does_not_read_the_queue():
    # DCQLoss overwrites the queue right after the loss, before backward().
    x, k, y, w, yq = random_inputs(seed=12)
    margin = MARGINS["cosface"]
    weights = row_weights(x.shape[0])
    expected_loss, expected_grad = loss_and_grad((x, k, y, w, yq), margin, backend="triton", weights=weights)
    xg = x.clone().requires_grad_(True)
    w2, yq2 = w.clone(), yq.clone()
    loss = dcq_ops.dcq_cross_entropy(xg, k, y, w2, yq2, **margin, backend="triton", reduction="none")
    w2.normal_()
    yq2.fill_(-1)
    (loss * weights.float()).sum().backward()
    torch.testing.assert_close(xg.grad, expected_grad, rtol=0, atol=0)


def test_opcheck():
    x, k, y, w, yq = random_inputs(rows=5, dim=20, slots=40, num_classes=6, empty=3, seed=13)
    args = (x.requires_grad_(True), k, y, w, yq, *margin_args(MARGINS["arcface"]), True)
    torch.library.opcheck(triton_ops.triton_dcq_cross_entropy, args)


def test_split_plan_fills_the_gpu_within_the_workspace_bound():
    # The sizes of the kernel benchmark on a 132-SM H100 (one main-kernel program
    # per SM at a time): every SM busy in every wave but at most 10% of the last
    # one, even for a batch of 128, and the workspace under 128 MiB at N=4096,
    # K=2^20, D=512.
    from dcq_ops.triton.configs import ARCHITECTURES, tile_config

    sms, dim = 132, 512
    for element_size in (2, 4):
        block_m = tile_config(ARCHITECTURES["sm_90"], element_size, dim).block_m
        for rows in (128, 512, 4096):
            for queue in (1 << 16, 1 << 18, 1 << 20):
                split_size, splits = launch.plan_splits(rows, queue, dim, block_m, True, sms)
                assert (splits - 1) * split_size < queue <= splits * split_size
                assert split_size % launch.SPLIT_ALIGN == 0
                programs = -(-rows // block_m) * splits
                waves = -(-programs // sms)
                assert programs >= 0.9 * waves * sms, (rows, queue, programs)
                workspace = rows * splits * (dim + 2) * 4
                assert workspace <= 128 << 20, (rows, queue, workspace)


def test_compiled_report_runs_without_a_gpu(tmp_path):
    # No GPU needed: benchmarks/compiled.py compiles the kernels for sm_90 as a
    # GPU run would and fails on a spill or a shared-memory overflow (CI runs it
    # whole; here the default bf16 configuration only). A separate process: this
    # one may hold Triton in interpreter mode, which cannot compile.
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compiled.py"
    out = tmp_path / "compiled.json"
    run = subprocess.run([sys.executable, str(script), "--targets", "90", "--dtypes", "bf16", "--first-only",
                          "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    import json
    import triton
    report = json.loads(out.read_text())
    entries = report["reports"][triton.__version__]["entries"]
    main = [e for e in entries if e["kernel"] == "queue_pass"]
    # With and without the gradient and filtering; the repair kernel too.
    assert len(main) == 4 and all(e["ok"] and e["spill_bytes"] == 0 for e in entries)
    assert {e["filter"] for e in entries if e["kernel"] == "repair"} == {False, True}
    with_grad = next(e for e in main if e["gradient"] and not e["filter"] and "specialization" not in e)
    assert with_grad["mma_instructions_per_iteration"] > 0 and with_grad["mma_flops_over_ideal"] >= 1.0
    # The sm_90 default at the ideal work (the script fails otherwise): the first dot
    # split between the two warpgroups, chain_break a run-time argument.
    assert with_grad["mma_flops_over_ideal"] == 1.0 and with_grad["exponentials_per_logit"] <= 1.125
    assert with_grad["first_dot_warps_per_cta"] == [4, 2] and with_grad["chain_break"].startswith("i32")


def test_compiled_report_fails_without_the_chain_break(tmp_path):
    # The CI check can fail: the kernel with its second dot's operands computed in
    # plain sight (no branch on chain_break) compiles for sm_90 with the first dot
    # laid out [8, 1], and benchmarks/compiled.py exits 1 on the ratios.
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    root = Path(__file__).resolve().parent.parent
    source = (root / "dcq_ops" / "triton" / "kernels.py").read_text()
    branch = source[source.index("            if chain_break == 0:"):source.index("            acc = tl.dot(p_op, w, acc_op")]
    (tmp_path / "plain_kernels.py").write_text(
        source.replace(branch, "            p_op = p.to(w.dtype)\n            acc_op = acc * alpha[:, None]\n"))
    script = tmp_path / "gate.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"sys.path[:0] = [{str(root / 'benchmarks')!r}, {str(root)!r}]\n"
        "import compiled, kernel_variants\n"
        f"spec = importlib.util.spec_from_file_location('plain_kernels', {str(tmp_path / 'plain_kernels.py')!r})\n"
        "kernel_variants.kernels = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(kernel_variants.kernels)\n"
        f"sys.exit(compiled.main(['--targets', '90', '--dtypes', 'bf16', '--first-only', '--out', "
        f"{str(tmp_path / 'c.json')!r}]))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "above the ideal work" in run.stdout and "[8, 1]" in run.stdout, run.stdout


# ----------------------------------------------------------------------------
# GPU only


def cuda_inputs(rows, dim, slots, dtype, queue_dtype=None, seed=0, num_classes=None):
    """Large random inputs generated on the GPU (labels repeat, ~1% empty slots)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    num_classes = num_classes or max(2, slots // 4)
    x = torch.randn(rows, dim, device="cuda", generator=g)
    k = 0.7 * x + torch.randn(rows, dim, device="cuda", generator=g)
    y = torch.randint(0, num_classes, (rows,), device="cuda", generator=g)
    w = F.normalize(torch.randn(slots, dim, device="cuda", generator=g), dim=1)
    yq = torch.randint(0, num_classes, (slots,), device="cuda", generator=g)
    yq[torch.rand(slots, device="cuda", generator=g) < 0.01] = -1
    return x.to(dtype), k.to(dtype), y, w.to(queue_dtype or dtype), yq


def check_rows_against_reference(inputs, margin, loss, grad, rows):
    """Loss and gradient of the given rows against the fp64 reference (the
    full queue, a subset of the rows: the reference holds their logits)."""
    x, k, y, w, yq = inputs
    sub = (x[rows], k[rows], y[rows], w, yq)
    xr = sub[0].double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, sub[1].double(), sub[2], w.double(), yq, **margin, reduction="none")
    exact.sum().backward()
    gemm_dtype = compute_dtype(x.dtype, w.dtype)
    delta = cosine_rounding(sub[0], w, gemm_dtype)
    assert_loss_close(loss[rows], exact.detach(), scale=margin["scale"], delta=delta)
    slope = positive_slope(sub[0], sub[1], margin.get("m1", 1.0), margin.get("m2", 0.0), margin["scale"],
                           margin.get("straight_through_margin", False))
    assert_grad_close(grad[rows].to(x.dtype), xr.grad, embeddings=sub[0], scale=margin["scale"], delta=delta,
                      slope=slope, gemm_dtype=gemm_dtype)


_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


@cuda_only
@pytest.mark.parametrize(
    "dtype,queue_dtype,rows,slots",
    [(d, qd, 512, 1 << 16) for d in _FLOATS for qd in _FLOATS]
    + [(torch.bfloat16, torch.bfloat16, 129, 40_000), (torch.float16, torch.float32, 129, 40_000)],
    ids=str,
)
def test_cuda_dtypes_and_sizes(dtype, queue_dtype, rows, slots):
    inputs = cuda_inputs(rows, 512, slots, dtype, queue_dtype, seed=rows)
    margin = MARGINS["arcface"]
    loss, grad = triton_ops.triton_dcq_cross_entropy(*inputs, *margin_args(margin), True)
    check_rows_against_reference(inputs, margin, loss, grad, torch.arange(0, rows, 7, device="cuda"))
    if dcq_ops.extension_loaded() and dcq_ops.has_cuda_kernels():
        # The chunked CUDA backend rounds the same GEMM operands: within the same bounds.
        chunked_loss, chunked_grad = torch.ops.dcq_ops.dcq_cross_entropy(*inputs, *margin_args(margin), True, 0)
        check_rows_against_reference(inputs, margin, chunked_loss, chunked_grad,
                                     torch.arange(0, rows, 7, device="cuda"))


@cuda_only
def test_cuda_full_size_memory_and_determinism():
    # N=4096, K=2^20, D=512 in bf16: no N×K allocation (that would be 16 GiB of
    # fp32 logits), bitwise identical results across runs, and the right answer
    # on a subset of the rows.
    rows, slots, dim = 4096, 1 << 20, 512
    inputs = cuda_inputs(rows, dim, slots, torch.bfloat16, seed=1)
    margin = MARGINS["cosface"]
    args = (*inputs, *margin_args(margin), True)
    triton_ops.triton_dcq_cross_entropy(*args)  # compile outside the measurement
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss, grad = triton_ops.triton_dcq_cross_entropy(*args)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 256 << 20, f"peak extra memory {extra / 2**20:.0f} MiB"
    loss2, grad2 = triton_ops.triton_dcq_cross_entropy(*args)
    assert torch.equal(loss, loss2) and torch.equal(grad, grad2)
    check_rows_against_reference(inputs, margin, loss, grad, torch.arange(0, rows, 128, device="cuda"))


@cuda_only
@pytest.mark.parametrize("dim,dtype", [(512, torch.bfloat16), (512, torch.float16), (512, torch.float32),
                                       (128, torch.float16), (100, torch.float32)], ids=str)
def test_cuda_every_configuration(dim, dtype):
    # Every configuration the autotuner may pick compiles and is correct.
    inputs = cuda_inputs(300, dim, 3000, dtype, seed=dim)
    margin = MARGINS["combined"]
    element_size = torch.empty((), dtype=dtype).element_size()
    architecture, _ = launch.device_architecture(torch.cuda.current_device())
    tf32 = launch.input_precision(dtype) == "tf32"
    for config in configs.tile_configs(architecture, element_size, dim, tf32):
        loss, grad = triton_ops.forward(*inputs, *margin_args(margin), True, config=config.as_dict())
        check_rows_against_reference(inputs, margin, loss, grad, torch.arange(0, 300, 3, device="cuda"))


@cuda_only
def test_autotuned_path():
    inputs = cuda_inputs(256, 512, 1 << 15, torch.bfloat16, seed=2)
    margin = MARGINS["arcface"]
    loss, grad = triton_ops.triton_dcq_cross_entropy(*inputs, *margin_args(margin), True)
    assert launch.autotuner_picks(), "the autotuned kernel did not run"
    check_rows_against_reference(inputs, margin, loss, grad, torch.arange(0, 256, 5, device="cuda"))


@cuda_only
def test_cuda_auto_backend_is_triton():
    assert dcq_ops.select_backend("cuda", "auto") == "triton"
    inputs = cuda_inputs(64, 128, 1000, torch.float16, seed=3)
    margin = MARGINS["cosface"]
    auto = dcq_ops.dcq_cross_entropy(*inputs, **margin, reduction="none")
    explicit = dcq_ops.dcq_cross_entropy(*inputs, **margin, reduction="none", backend="triton")
    assert torch.equal(auto, explicit)
