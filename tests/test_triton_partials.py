"""The queue-pass kernel's partials against the former kernel's, bit for bit.

Two changes of dcq_ops/triton/kernels.py must not change a single bit of what
the queue pass writes: the second dot's operands computed behind a branch on
the run-time argument ``chain_break`` (so that Triton lays the first dot out
[4, 2] on sm_90: benchmarks/compiled.py), and the one-dimensional grid
(program = split * row_blocks + row block, for more than 65,535 splits). The
kernel as it was before both, with its (row block, split) grid, is kept below
as ``former_queue_pass_kernel`` and ``former_repair_kernel``, the oracle here
and nowhere else.

Both kernels are launched with the same tiles, split plan and arguments on
odd sizes (N = 37, K = 203, D = 45), with empty slots, a split that keeps
nothing, rows with every slot excluded, inter-class filtering, non-finite
queue slots (the repair kernel), several splits and their merge, in fp32 and
fp16 (under Triton's interpreter on a CPU: its fp32 and fp16 dots are exact
there; bf16 is compared on a GPU only). Bitwise equality is the only tolerance:
the same operations in the same order give the same bits, and any change of
order would show.
"""

import os

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

from dcq_ops.triton import import_ops  # noqa: E402  (sets TRITON_INTERPRET for Triton's first import)

try:
    triton_ops = import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dcq_ops.triton import kernels, launch  # noqa: E402
from inputs import make_inputs  # noqa: E402

if not ON_CUDA and not kernels.INTERPRETED:
    pytest.skip("dcq_ops.triton.kernels was imported before this module without TRITON_INTERPRET=1",
                allow_module_level=True)

# NaN and inf in the queue: numpy (the Triton interpreter) warns about them.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

HALF_DTYPES = [torch.float16, torch.bfloat16] if ON_CUDA else [torch.float16]


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # Triton reads it again at each launch
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")


# ----------------------------------------------------------------------------
# The former kernels (dcq_ops/triton/kernels.py before chain_break and the flat
# grid), verbatim but for their names: the oracle of this module. @triton.jit
# reads TRITON_INTERPRET when it decorates, and import_ops left it as it was:
# set for these definitions only, as for dcq_ops.triton.kernels.

_saved_interpret = os.environ.get("TRITON_INTERPRET")
if kernels.INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"


@triton.jit
def _former_block(num_rows, dim, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < dim
    return rows, row_ok, cols, col_ok


@triton.jit
def _former_block_partials(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, rows, row_ok, cols, col_ok,
                           dim, queue_size, split_size, scale_log2, interclass_filtering_threshold,
                           FILTER: tl.constexpr, COMPUTE_GRAD: tl.constexpr, ZERO_NONFINITE_IN_GEMM2: tl.constexpr,
                           INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    q = tl.load(q_ptr + rows[:, None].to(tl.int64) * dim + cols[None, :],
                mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    labels = tl.load(labels_ptr + rows, mask=row_ok, other=-1)
    k_begin = tl.program_id(1) * split_size
    k_end = tl.minimum(k_begin + split_size, queue_size)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        w = tl.load(w_ptr + ks[:, None].to(tl.int64) * dim + cols[None, :],
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(q.dtype)
        queue_labels = tl.load(queue_labels_ptr + ks, mask=k_ok, other=-1)

        cos = tl.dot(q, tl.trans(w), input_precision=INPUT_PRECISION)
        keep = (queue_labels[None, :] >= 0) & (queue_labels[None, :] != labels[:, None])
        z = cos * scale_log2
        if FILTER:
            filtered = cos > interclass_filtering_threshold
            z = tl.where(filtered, 0.0, z)
        z = tl.where(keep, z + cos * 0.0, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(z, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(z - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        if COMPUTE_GRAD:
            if FILTER:
                p = tl.where(filtered, 0.0, p)
            if ZERO_NONFINITE_IN_GEMM2:
                w = tl.where(w - w == 0.0, w, 0.0)
            acc = tl.dot(p.to(w.dtype), w, acc * alpha[:, None], input_precision=INPUT_PRECISION)
        m_i = m_new
    return m_i, l_i, acc


@triton.jit
def former_queue_pass_kernel(
    q_ptr, labels_ptr, w_ptr, queue_labels_ptr,
    max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
    num_rows, queue_size, dim, num_splits, split_size,
    scale_log2, interclass_filtering_threshold,
    row_bucket, split_bucket,
    FILTER: tl.constexpr, COMPUTE_GRAD: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows, row_ok, cols, col_ok = _former_block(num_rows, dim, BLOCK_M, BLOCK_D)
    m_i, l_i, acc = _former_block_partials(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, rows, row_ok, cols, col_ok,
                                           dim, queue_size, split_size, scale_log2, interclass_filtering_threshold,
                                           FILTER, COMPUTE_GRAD, False, INPUT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_D)
    if COMPUTE_GRAD:
        acc_finite = tl.min(tl.where(acc - acc == 0.0, 1, 0), axis=1) == 1
        m_i = tl.where((l_i - l_i == 0.0) & ~acc_finite, float("nan"), m_i)

    ws = rows.to(tl.int64) * num_splits + tl.program_id(1)
    tl.store(max_ws_ptr + ws, m_i, mask=row_ok)
    tl.store(sum_ws_ptr + ws, l_i, mask=row_ok)
    if COMPUTE_GRAD:
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def former_repair_kernel(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, max_ws_ptr, sum_ws_ptr, acc_ws_ptr,
                         num_rows, queue_size, dim, num_splits, split_size, scale_log2,
                         interclass_filtering_threshold,
                         FILTER: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    rows, row_ok, cols, col_ok = _former_block(num_rows, dim, BLOCK_M, BLOCK_D)
    ws = rows.to(tl.int64) * num_splits + tl.program_id(1)
    m_old = tl.load(max_ws_ptr + ws, mask=row_ok, other=0.0)
    l_old = tl.load(sum_ws_ptr + ws, mask=row_ok, other=0.0)
    marked = row_ok & (m_old != m_old) & (l_old - l_old == 0.0)
    if tl.max(marked.to(tl.int32), axis=0) > 0:
        m_i, l_i, acc = _former_block_partials(q_ptr, labels_ptr, w_ptr, queue_labels_ptr, rows, row_ok, cols,
                                               col_ok, dim, queue_size, split_size, scale_log2,
                                               interclass_filtering_threshold,
                                               FILTER, True, True, INPUT_PRECISION, BLOCK_M, BLOCK_K, BLOCK_D)
        tl.store(max_ws_ptr + ws, m_i, mask=marked)
        tl.store(sum_ws_ptr + ws, l_i, mask=marked)
        tl.store(acc_ws_ptr + ws[:, None] * dim + cols[None, :], acc, mask=marked[:, None] & col_ok[None, :])


if _saved_interpret is None:
    os.environ.pop("TRITON_INTERPRET", None)
else:
    os.environ["TRITON_INTERPRET"] = _saved_interpret


def former_queue_pass(q, labels, w, yq, scale, threshold, compute_grad, *, split_size, config) -> launch.Workspace:
    """launch.queue_pass's plan with the former kernels on the former (row block, split) grid."""
    rows, dim = q.shape
    queue_size = w.shape[0]
    num_splits = max(1, -(-queue_size // split_size))
    f32 = dict(dtype=torch.float32, device=q.device)
    workspace = launch.Workspace(torch.empty((rows, num_splits), **f32), torch.empty((rows, num_splits), **f32),
                                 torch.empty((rows, num_splits, dim) if compute_grad else (1,), **f32), dim,
                                 compute_grad)
    args = (q.contiguous(), labels.contiguous(), w.contiguous(), yq.contiguous(), *workspace[:3], rows, queue_size,
            dim, num_splits, split_size, float(scale) * kernels.LOG2E, float(threshold))
    buckets = (max(16, 1 << max(0, rows - 1).bit_length()), 1 << max(0, split_size - 1).bit_length())
    flags = dict(FILTER=threshold > 0, INPUT_PRECISION=launch.input_precision(q.dtype), BLOCK_M=config["BLOCK_M"],
                 BLOCK_D=max(16, 1 << max(0, dim - 1).bit_length()))
    grid = (-(-rows // config["BLOCK_M"]), num_splits)
    former_queue_pass_kernel[grid](*args, *buckets, **flags, COMPUTE_GRAD=compute_grad, BLOCK_K=config["BLOCK_K"],
                                   num_warps=config["num_warps"], num_stages=config["num_stages"])
    if compute_grad:
        former_repair_kernel[grid](*args, **flags, BLOCK_K=config["BLOCK_K"], num_warps=config["num_warps"],
                                   num_stages=config["num_stages"])
    return workspace


# ----------------------------------------------------------------------------
# Inputs and the comparison


def bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 as its bit patterns: -0.0 differs from 0.0, NaN equals NaN of the same payload."""
    return t.contiguous().view(torch.int32)


def assert_bitwise(new: launch.Workspace, old: launch.Workspace, what: str) -> None:
    for name, a, b in (("row max", new.max_ws, old.max_ws), ("row sum", new.sum_ws, old.sum_ws),
                       ("accumulator", new.acc_ws, old.acc_ws)):
        if name == "accumulator" and not new.compute_grad:
            continue
        assert a.shape == b.shape, (what, name, a.shape, b.shape)
        differ = bits(a) != bits(b)
        assert not differ.any(), (f"{what}: {name} differs in {int(differ.sum())} of {a.numel()} values, e.g. "
                                  f"{a[differ][:3].tolist()} against the former {b[differ][:3].tolist()}")


def normalised(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return F.normalize(x.double(), dim=1).to(dtype).to(DEVICE)


def scenario(name: str, dtype: torch.dtype):
    """(q in the GEMM dtype, labels, queue weights, queue labels, what it covers)."""
    x, _, y, w, yq = make_inputs(37, 45, 203, num_classes=25, empty=17, dtype=torch.float64, seed=21)
    yq = yq.clone()
    w = w.clone()
    if name == "random":
        yq[:64] = -1  # the first 64 slots empty: a split (of 48 or 64) that keeps nothing
    elif name == "all_excluded":
        # The queue holds row 0's class and empty slots only: rows of that class exclude
        # every slot (max -inf, sum 0 in every split), the others keep the same slots.
        yq = torch.where(torch.rand(203, generator=torch.Generator().manual_seed(2)) < 0.3, -1, y[0])
    elif name == "nonfinite":
        # A NaN and an inf in slots of row 0's class: excluded by the rows of that class
        # (whose accumulators the repair kernel computes again), kept by the others (NaN).
        yq[100:102] = y[0]
        w[100, 3] = float("nan")
        w[101, 7] = float("inf")
    return normalised(x, dtype), y.to(DEVICE), w.to(dtype).to(DEVICE), yq.to(DEVICE)


CONFIGS = {
    "m16k32": dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1),
    "m32k16": dict(BLOCK_M=32, BLOCK_K=16, num_warps=4, num_stages=1),
}


def run_both(q, y, w, yq, *, scale=64.0, threshold=0.0, compute_grad=True, split_size=48, config="m16k32"):
    config = CONFIGS[config]
    new = launch.queue_pass(q, y, w, yq, scale, threshold, compute_grad, split_size=split_size, config=config)
    old = former_queue_pass(q, y, w, yq, scale, threshold, compute_grad, split_size=split_size, config=config)
    return new, old


# ----------------------------------------------------------------------------
# The tests


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
@pytest.mark.parametrize("name,threshold,split_size,config", [
    ("random", 0.0, 48, "m16k32"),      # 5 splits, partial last tiles, an empty split
    ("random", 0.1, 203, "m32k16"),     # filtering, one split, 13 tiles of 16
    ("all_excluded", 0.0, 64, "m16k32"),
    ("nonfinite", 0.1, 100, "m32k16"),  # the repair kernel, with filtering
])
def test_partials_equal_the_former_kernel_bitwise(dtype, name, threshold, split_size, config):
    q, y, w, yq = scenario(name, dtype)
    new, old = run_both(q, y, w, yq, threshold=threshold, split_size=split_size, config=config)
    what = f"{name} {dtype} split {split_size} {config}"
    assert_bitwise(new, old, what)
    # The merge of the splits (the loss algebra's partials of the whole queue), too.
    for a, b, part in zip(launch.merge(new), launch.merge(old), ("merged max", "merged sum", "merged acc")):
        assert torch.equal(bits(a), bits(b)), (what, part)

    # What the scenario is meant to cover is there (else the equality proves little).
    m = new.max_ws
    if name == "random" and split_size == 48:
        assert new.num_splits == 5 and torch.isneginf(m[:, 0]).all(), "the first split keeps nothing"
        assert torch.isfinite(m[:, 1:]).any()
    if name == "all_excluded":
        excluded = (y == y[0]).nonzero().flatten()
        assert excluded.numel() >= 2 and (new.sum_ws[excluded] == 0).all() and torch.isneginf(m[excluded]).all()
        assert (new.sum_ws[y != y[0]] > 0).all()
    if threshold > 0:
        cos = q.double() @ w.double().t()
        kept = (yq[None, :] >= 0) & (yq[None, :] != y[:, None])
        assert ((cos > threshold) & kept & torch.isfinite(cos)).sum() >= 20, "too few filtered entries"
    if name == "nonfinite":
        same_class = y == y[0]
        # Rows of the slots' class were repaired (finite); the others keep a NaN.
        assert torch.isfinite(new.acc_ws[same_class]).all()
        assert torch.isnan(new.sum_ws[~same_class]).any(dim=1).all()


@pytest.mark.parametrize("dtype", [torch.float32] + HALF_DTYPES, ids=str)
def test_without_gradient_equal_the_former_kernel_bitwise(dtype):
    q, y, w, yq = scenario("random", dtype)
    new, old = run_both(q, y, w, yq, threshold=0.1, compute_grad=False, split_size=100)
    assert_bitwise(new, old, f"loss only {dtype}")


def test_chain_break_value_does_not_matter(monkeypatch):
    """Both branches of the kernel compute the same operands: any chain_break gives
    the same bits (here the other branch: 12345 != 0)."""
    q, y, w, yq = scenario("random", torch.float32)
    expected = launch.queue_pass(q, y, w, yq, 64.0, 0.1, True, split_size=64, config=CONFIGS["m16k32"])
    monkeypatch.setattr(launch, "CHAIN_BREAK", 12345)
    other = launch.queue_pass(q, y, w, yq, 64.0, 0.1, True, split_size=64, config=CONFIGS["m16k32"])
    assert_bitwise(other, expected, "chain_break = 12345")


def test_the_comparison_sees_a_few_ulps():
    """The oracle is sensitive: a scale a few fp32 ulps away (relative 2^-20; the kernel
    takes it in fp32) changes bits of the partials."""
    q, y, w, yq = scenario("random", torch.float32)
    config = CONFIGS["m16k32"]
    new = launch.queue_pass(q, y, w, yq, 64.0, 0.0, True, split_size=203, config=config)
    old = former_queue_pass(q, y, w, yq, 64.0 * (1 + 2.0**-20), 0.0, True, split_size=203, config=config)
    with pytest.raises(AssertionError, match="differs"):
        assert_bitwise(new, old, "scale + 8 ulps")
