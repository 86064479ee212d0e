"""Launch limits of the Triton backend (dcq_ops/triton/launch.py).

CUDA caps grid dimensions 1 and 2 at 65,535 programs and dimension 0 at
2^31 - 1. The queue pass runs row_blocks x num_splits programs on one grid
dimension (program = split * row_blocks + row block), so an explicit split
plan of 100,000 splits launches; past 2^31 - 1 programs a ValueError names the
limit.

Triton's interpreter runs every program of a grid one after the other in
Python (tens of milliseconds each here), so the 100,000-split plan is checked
on a CPU in two halves: the launches it makes (recorded, not run: the grid and
the workspace), and the merge and finalize kernels run for real on the
workspace of 100,000 splits that the queue pass writes for split_size=1
(computed here in torch), against the reference. The queue pass itself runs
under the interpreter with many splits over several row blocks, and on a GPU
with the whole 100,000-split plan.
"""

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"

from dcq_ops.triton import import_ops  # noqa: E402

try:
    triton_ops = import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

from dcq_ops import reference  # noqa: E402
from dcq_ops.triton import kernels, launch  # noqa: E402
from bounds import assert_grad_close, assert_loss_close, positive_slope  # noqa: E402
from inputs import MARGINS, make_inputs  # noqa: E402

if not ON_CUDA and not kernels.INTERPRETED:
    pytest.skip("dcq_ops.triton.kernels was imported before this module without TRITON_INTERPRET=1",
                allow_module_level=True)

CUDA_GRID_Y_LIMIT = 65_535
SPLITS = 100_000
UNIT_ROUNDOFF = 2.0**-24  # fp32


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")


def margin_args(margin):
    return (margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
            margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False))


def exact(inputs, margin):
    """The reference's loss rows and gradient (summed rows) in float64."""
    x, k, y, w, yq = inputs
    xr = x.double().requires_grad_(True)
    loss = reference.dcq_cross_entropy(xr, k.double(), y, w.double(), yq, **margin, reduction="none")
    loss.sum().backward()
    return loss.detach(), xr.grad


def test_grid_is_one_dimensional_within_cuda_limits():
    # 100,000 splits of 1 row block, and split_size=128 over K = 10^7 (78,125 splits)
    # at N = 4096, BLOCK_M = 64: more splits than dimension 1 could hold, on dimension 0.
    assert launch.queue_pass_grid(5, 16, SPLITS) == (SPLITS,)
    assert launch.queue_pass_grid(4096, 64, 78_125) == (64 * 78_125,)
    assert launch.queue_pass_grid(37, 16, 3) == (9,)
    assert 78_125 > CUDA_GRID_Y_LIMIT
    # Past 2^31 - 1 programs: a ValueError naming the limit and the way out.
    with pytest.raises(ValueError, match=r"2\^31 - 1 = 2147483647; use a larger split_size"):
        launch.queue_pass_grid(1 << 20, 16, 1 << 20)  # 2^16 row blocks x 2^20 splits
    assert launch.queue_pass_grid(1 << 20, 16, (2**31 - 1) // (1 << 16)) == ((2**31 - 1) // (1 << 16) << 16,)


class _Recorder:
    """Stands for a kernel: records each launch's grid and arguments instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_hundred_thousand_splits_launch(monkeypatch):
    """What launch.queue_pass launches for an explicit plan of 100,000 splits (D=4,
    K=100,000, split_size=1): one grid dimension of 100,000 programs for the queue
    pass and for the repair kernel, never a dimension past CUDA's caps."""
    x, _, y, w, yq = make_inputs(5, 4, SPLITS, num_classes=50, empty=100, seed=30)
    passes, repairs = _Recorder(), _Recorder()
    monkeypatch.setattr(launch, "queue_pass_kernel", passes)
    monkeypatch.setattr(launch, "repair_kernel", repairs)
    ws = launch.queue_pass(F.normalize(x, dim=1), y, w, yq, 64.0, 0.0, True, split_size=1,
                           config=dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1))
    assert ws.max_ws.shape == (5, SPLITS) and ws.acc_ws.shape == (5, SPLITS, 4)
    for recorder in (passes, repairs):
        (grid, args, _), = recorder.launches
        assert grid == (SPLITS,), grid
        assert args[9:12] == (4, SPLITS, 1)  # dim, num_splits, split_size
    for limit, size in zip((2**31 - 1, CUDA_GRID_Y_LIMIT, CUDA_GRID_Y_LIMIT), passes.launches[0][0] + (1, 1)):
        assert size <= limit


def test_hundred_thousand_splits_merge_and_finalize():
    """The merge and finalize kernels, run, on the workspace of a 100,000-split plan
    (D=4, K=100,000, split_size=1), against the reference.

    With one slot a split, the queue pass writes, for a kept slot j of row i, the max
    z_ij (log2 units), the sum 1 and the accumulator W_j; for an excluded one, -inf,
    0 and 0: built here in fp32 as the kernel computes them. The merge sums S = 10^5
    terms in fp32, S / BLOCK_S of them one after the other in each of BLOCK_S columns,
    then the columns (a tree of log2 BLOCK_S levels), each term rescaled by one
    exponential (2 ulps): relative errors of the sums, and of the accumulator against
    the sum of its terms' magnitudes, of at most gamma = (S / BLOCK_S + log2 BLOCK_S + 2) u.
    The loss moves by at most gamma (log is 1-Lipschitz in relative terms); the
    gradient through the accumulator and through the negatives' total probability
    by at most 2 gamma s / ||x|| (unit queue rows, probabilities summing to <= 1)."""
    rows, dim = 6, 4
    inputs = tuple(t.to(DEVICE) for t in make_inputs(rows, dim, SPLITS, num_classes=50, empty=100, seed=31))
    x, k, y, w, yq = inputs
    margin = MARGINS["arcface"]
    scale = margin["scale"]
    # Row 0 excludes every slot but one, so the merge also meets a row almost all -inf.
    yq = torch.where((yq >= 0) & (torch.arange(SPLITS, device=DEVICE) > 0), y[0], yq)
    yq[0] = (y[0] + 1) % 50
    inputs = (x, k, y, w, yq)

    finalize_inputs = triton_ops.prologue(x, k, *margin_args(margin)[:4], False)
    q = finalize_inputs.q
    kept = (yq[None, :] >= 0) & (yq[None, :] != y[:, None])
    z = (q @ w.t()) * torch.tensor(scale * kernels.LOG2E, dtype=torch.float32)
    max_ws = torch.where(kept, z, torch.tensor(float("-inf"), device=DEVICE)).contiguous()
    sum_ws = kept.float().contiguous()
    acc_ws = (kept[:, :, None] * w[None, :, :]).contiguous()
    workspace = launch.Workspace(max_ws, sum_ws, acc_ws, dim, True)

    loss, grad = launch.finalize(workspace, finalize_inputs, scale)
    exact_loss, exact_grad = exact(inputs, margin)

    # The merge kernel's tile as launch plans it: about 1 program on the interpreter, 2 a multiprocessor on a GPU.
    programs = 2 * torch.cuda.get_device_properties(0).multi_processor_count if ON_CUDA else 1
    _, block_s = launch.merge_blocks(rows, SPLITS, launch.block_d_of(dim), programs)
    gamma = (SPLITS / block_s + block_s.bit_length() + 2) * UNIT_ROUNDOFF
    x_norm = x.double().norm(dim=1)
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    loss_err = (loss.double() - exact_loss).abs()
    assert (loss_err <= gamma + 2e-4 * exact_loss.abs()).all(), (loss_err, gamma)
    grad_err = (grad.double() - exact_grad).norm(dim=1)
    bound = 2 * gamma * scale / x_norm + 1e-5 * exact_grad.norm(dim=1) + 1e-7 * exact_grad.norm(dim=1).max()
    assert (grad_err <= bound).all(), (grad_err, bound)
    # The merged partials: the maximum exact (then one rounding to natural-log units),
    # the sum within gamma of the float64 sum of the rescaled terms.
    row_max, row_sum, _ = launch.merge(workspace)
    m = max_ws.double().amax(dim=1)
    assert ((row_max.double() - m * 0.6931471805599453).abs() <= 2 * UNIT_ROUNDOFF * m.abs()).all()
    exact_sum = torch.where(kept, torch.exp2(max_ws.double() - m[:, None]), 0.0).sum(dim=1)
    assert ((row_sum.double() - exact_sum).abs() <= gamma * exact_sum).all()
    assert row_sum[0].item() == 1.0  # row 0 keeps one slot


def test_many_splits_over_several_row_blocks():
    """The queue pass, run, with a split per slot over three row blocks (40 splits,
    120 programs on one grid dimension), against an unsplit run and the reference:
    program p is row block p % 3 of split p // 3."""
    inputs = tuple(t.to(DEVICE) for t in make_inputs(37, 4, 40, num_classes=12, empty=5, seed=32))
    x, k, y, w, yq = inputs
    margin = MARGINS["combined"]
    config = dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1)
    split_loss, split_grad = triton_ops.forward(*inputs, *margin_args(margin), True, split_size=1, config=config)
    whole_loss, whole_grad = triton_ops.forward(*inputs, *margin_args(margin), True, split_size=40, config=config)
    exact_loss, exact_grad = exact(inputs, margin)
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device=DEVICE)
    slope = positive_slope(x, k, margin["m1"], margin["m2"], margin["scale"])
    for loss, grad, what in ((split_loss, split_grad, "40 splits"), (whole_loss, whole_grad, "one split")):
        assert_loss_close(loss, exact_loss, scale=margin["scale"], delta=zero, what=f"loss, {what}")
        assert_grad_close(grad, exact_grad, embeddings=x, scale=margin["scale"], delta=zero, slope=slope,
                          gemm_dtype=torch.float32, what=f"gradient, {what}")


@pytest.mark.cuda
@pytest.mark.skipif(not ON_CUDA, reason="needs a CUDA GPU")
def test_cuda_hundred_thousand_splits():
    """The whole 100,000-split plan on a GPU (more splits than grid dimension 1
    holds), against an unsplit run and the reference."""
    inputs = tuple(t.to("cuda") for t in make_inputs(50, 4, SPLITS, num_classes=500, empty=100, seed=33))
    x, k, y, w, yq = inputs
    margin = MARGINS["cosface"]
    split_loss, split_grad = triton_ops.forward(*inputs, *margin_args(margin), True, split_size=1)
    whole_loss, whole_grad = triton_ops.forward(*inputs, *margin_args(margin), True, split_size=SPLITS)
    exact_loss, exact_grad = exact(inputs, margin)
    zero = torch.zeros(x.shape[0], dtype=torch.float64, device="cuda")
    slope = positive_slope(x, k, margin["m1"], margin["m2"], margin["scale"])
    for loss, grad in ((split_loss, split_grad), (whole_loss, whole_grad)):
        assert_loss_close(loss, exact_loss, scale=margin["scale"], delta=zero)
        assert_grad_close(grad, exact_grad, embeddings=x, scale=margin["scale"], delta=zero, slope=slope,
                          gemm_dtype=torch.float32)
