"""The Gluon sm_90 queue passes (the pipelined dcq_ops/triton/hopper.py and the seesaw
dcq_ops/triton/hopper_seesaw_kernel.py) and where each applies.

The Gluon kernel cannot run without a GPU (Gluon has no interpreter). Its
numerics rest on its plain-Triton twin (dcq_ops/triton/hopper_twin.py: the same
algebra, the same order of operations, tensor descriptors for the tiles, the
accumulator rescaled only when some row's alpha is not 1; the algebra of both
kernels), which runs under Triton's interpreter wherever DCQ_OPS_SM90_KERNEL=pipelined
or seesaw selects a Gluon kernel that applies. Here:

- the twin's partials against queue_pass_kernel's, bit for bit (fp32 and fp16
  operands, the interpreter's dots are exact for both), on odd sizes with empty
  slots, a split that keeps nothing, rows that exclude every slot, filtering
  and non-finite queue slots (the repair kernel after it), one and many splits;
- the seesaw selected: the twin on the seesaw's square tiles, bit for bit;
- the loss and gradient through the op with the pipelined kernel selected,
  against the float64 reference within the error model (tests/bounds.py);
- where each Gluon kernel applies, and the default (on a GPU the ranked chain, the
  seesaw then the pipelined kernel, each behind its probe,
  tests/test_hopper_probe_chain.py; under the interpreter the classic one);
- the Gluon kernel compiled for sm_90 (no GPU needed), its SASS read by
  benchmarks/hopper_sass.py: ideal work, no serialized wgmma, TMA tiles, no spills;
- the seesaw kernel (the same algebra, so the twin stands for it too) likewise, and
  on a GPU its loss and gradient against the reference in a child process with a
  deadline; the cycle model's reading of its two interleaved consumer loops.
"""

import json
import re
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
ROOT = Path(__file__).resolve().parents[1]

from dcq_ops.triton import import_ops  # noqa: E402  (sets TRITON_INTERPRET for Triton's first import)

try:
    triton_ops = import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

from dcq_ops import reference  # noqa: E402
from dcq_ops.triton import hopper, hopper_launch, kernels, launch  # noqa: E402
from bounds import assert_grad_close, assert_loss_close, cosine_rounding, positive_slope  # noqa: E402
from inputs import MARGINS, make_inputs  # noqa: E402

if not ON_CUDA and not kernels.INTERPRETED:
    pytest.skip("dcq_ops.triton.kernels was imported before this module without TRITON_INTERPRET=1",
                allow_module_level=True)

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

# D = 48: TMA needs 16-byte row strides (D a multiple of 8 in 16 bits, of 4 in fp32);
# BLOCK_D = 64 pads it, the descriptor reading the padded columns as 0.
ROWS, DIM, SLOTS = 37, 48, 203
CONFIG = dict(BLOCK_M=16, BLOCK_K=32, num_warps=4, num_stages=1)


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def scenario(name: str, dtype: torch.dtype):
    """(q in the GEMM dtype, labels, queue weights, queue labels)."""
    x, _, y, w, yq = make_inputs(ROWS, DIM, SLOTS, num_classes=25, empty=17, dtype=torch.float64, seed=29)
    yq, w = yq.clone(), w.clone()
    if name == "random":
        yq[:64] = -1  # a split of 32 or 64 slots that keeps nothing
    elif name == "all_excluded":
        yq = torch.where(torch.rand(SLOTS, generator=torch.Generator().manual_seed(3)) < 0.3, -1, y[0])
    elif name == "nonfinite":
        yq[100:102] = y[0]
        w[100, 3] = float("nan")
        w[101, 7] = float("inf")
    q = F.normalize(x, dim=1).to(dtype).to(DEVICE)
    return q, y.to(DEVICE), w.to(dtype).to(DEVICE), yq.to(DEVICE)


def queue_pass(monkeypatch, kernel, *inputs, scale=64.0, threshold=0.0, compute_grad=True, split_size=64):
    monkeypatch.setenv(hopper_launch.ENV, kernel)
    return launch.queue_pass(*inputs, scale, threshold, compute_grad, split_size=split_size, config=CONFIG)


def assert_same_bits(new, old, what):
    for name, a, b in (("row max", new.max_ws, old.max_ws), ("row sum", new.sum_ws, old.sum_ws),
                       ("accumulator", new.acc_ws, old.acc_ws)):
        if name == "accumulator" and not new.compute_grad:
            continue
        differ = bits(a) != bits(b)
        assert not differ.any(), (f"{what}: {name} differs in {int(differ.sum())} of {a.numel()} values, e.g. "
                                  f"{a[differ][:3].tolist()} against {b[differ][:3].tolist()}")


class LaunchList(list):
    def __init__(self):
        super().__init__()
        self.kernels = []


@pytest.fixture
def launches(monkeypatch):
    """The Gluon kernels' launches made (their compute_grad; ``.kernels`` the kernel of
    each), to prove the twin ran."""
    made = LaunchList()
    original = hopper_launch.launch

    def spy(*args, **kwargs):
        made.append(args[13])
        made.kernels.append(kwargs["kernel"])
        return original(*args, **kwargs)

    monkeypatch.setattr(hopper_launch, "launch", spy)
    return made


@pytest.mark.skipif(ON_CUDA, reason="the twin runs under the interpreter; on a GPU the Gluon kernel runs")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", ["random", "all_excluded", "nonfinite"])
@pytest.mark.parametrize("split_size", [64, 224])  # 4 splits (one keeps nothing), 1 split of 7 tiles
def test_twin_partials_equal_the_classic_kernel_bit_for_bit(monkeypatch, launches, dtype, name, split_size):
    inputs = scenario(name, dtype)
    new = queue_pass(monkeypatch, "pipelined", *inputs, split_size=split_size)
    old = queue_pass(monkeypatch, "classic", *inputs, split_size=split_size)
    assert launches == [True], "the pipelined kernel did not run"
    assert_same_bits(new, old, f"{name} {dtype} split {split_size}")
    if name == "all_excluded":
        assert (old.sum_ws == 0).any() and torch.isinf(old.max_ws).any()
    if name == "nonfinite":
        assert torch.isnan(old.sum_ws).any() and torch.isfinite(old.acc_ws).any()


@pytest.mark.skipif(ON_CUDA, reason="the twin runs under the interpreter")
@pytest.mark.parametrize("threshold", [0.0, 0.1])
def test_the_seesaw_selected_runs_the_twin_on_square_tiles(monkeypatch, launches, threshold):
    """DCQ_OPS_SM90_KERNEL=seesaw under the interpreter: the twin (the seesaw's algebra)
    where the seesaw's own rule holds (BLOCK_M = BLOCK_K), bit for bit the classic
    kernel's partials; on CONFIG's 16 x 32 tiles the classic kernel (no launch)."""
    inputs = scenario("random", torch.float16)
    square = dict(CONFIG, BLOCK_M=32, BLOCK_K=32)
    monkeypatch.setenv(hopper_launch.ENV, "seesaw")
    new = launch.queue_pass(*inputs, 64.0, threshold, True, split_size=96, config=square)
    monkeypatch.setenv(hopper_launch.ENV, "classic")
    old = launch.queue_pass(*inputs, 64.0, threshold, True, split_size=96, config=square)
    assert launches.kernels == ["seesaw"], "the seesaw's twin did not run"
    assert_same_bits(new, old, f"seesaw, threshold {threshold}")
    queue_pass(monkeypatch, "seesaw", *inputs, threshold=threshold, split_size=96)
    assert launches.kernels == ["seesaw"], "the twin ran for the seesaw on tiles the seesaw cannot run"


@pytest.mark.skipif(ON_CUDA, reason="the twin runs under the interpreter")
@pytest.mark.parametrize("compute_grad", [True, False])
def test_twin_filtering_and_loss_only_equal_the_classic_kernel(monkeypatch, launches, compute_grad):
    inputs = scenario("random", torch.float16)
    kwargs = dict(threshold=0.1, compute_grad=compute_grad, split_size=96, scale=50.0)
    new = queue_pass(monkeypatch, "pipelined", *inputs, **kwargs)
    old = queue_pass(monkeypatch, "classic", *inputs, **kwargs)
    assert launches == [compute_grad]
    assert_same_bits(new, old, f"filtered, compute_grad={compute_grad}")


@pytest.mark.skipif(ON_CUDA, reason="the twin runs under the interpreter")
def test_conditional_rescale_skips_tiles_and_keeps_the_bits(monkeypatch):
    """Sorted queue slots (cosines falling along the queue): after the first tile no
    row's max grows, so the twin skips the rescale on every later tile, and the
    result is still the classic kernel's, bit for bit. A twin that rescaled with a
    wrong alpha or skipped a needed rescale would differ here or in the tests above."""
    q, y, w, yq = scenario("random", torch.float32)
    yq = torch.where(yq < 0, 1000, yq)  # every slot kept by every row
    order = (q.double() @ w.double().t()).mean(0).argsort(descending=True)
    w, yq = w[order].contiguous(), yq[order].contiguous()
    new = queue_pass(monkeypatch, "pipelined", q, y, w, yq, split_size=224)
    old = queue_pass(monkeypatch, "classic", q, y, w, yq, split_size=224)
    assert_same_bits(new, old, "sorted queue")


@pytest.mark.skipif(ON_CUDA, reason="the twin runs under the interpreter")
@pytest.mark.parametrize("margin", ["arcface", "cosface_filtered"])
def test_loss_and_gradient_with_the_pipelined_kernel_match_the_reference(monkeypatch, launches, margin):
    monkeypatch.setenv(hopper_launch.ENV, "pipelined")
    margin = MARGINS[margin]
    x, k, y, w, yq = make_inputs(ROWS, DIM, SLOTS, num_classes=25, empty=17, dtype=torch.float32, seed=5)
    args = (margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
            margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False))
    loss, grad = triton_ops.forward(x, k, y, w, yq, *args, True, split_size=64, config=CONFIG)
    assert launches == [True]
    xr = x.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, k.double(), y, w.double(), yq, **margin, reduction="none")
    exact.sum().backward()
    delta = cosine_rounding(x, w, torch.float32)
    assert_loss_close(loss, exact.detach(), scale=margin["scale"], delta=delta)
    assert_grad_close(grad, xr.grad, embeddings=x, scale=margin["scale"], delta=delta,
                      slope=positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), margin["scale"],
                                           margin.get("straight_through_margin", False)),
                      gemm_dtype=torch.float32)


ON_HOPPER = ON_CUDA and torch.cuda.get_device_capability() == (9, 0) and hopper.AVAILABLE


@pytest.mark.skipif(not ON_HOPPER, reason="the Gluon kernel runs on sm_90 only (a GPU test)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("margin", ["arcface", "cosface_filtered"])
def test_gluon_kernel_on_sm90_matches_the_reference(monkeypatch, launches, dtype, margin, kernel="pipelined",
                                                     dim=512):
    """The Gluon kernel itself (never run on a GPU before this test's first run): loss and
    gradient against the float64 reference within the error model of its GEMM dtype, at
    D = 512 over several splits and row blocks, with a partial last tile and empty slots."""
    monkeypatch.setenv(hopper_launch.ENV, kernel)
    margin = MARGINS[margin]
    x, k, y, w, yq = make_inputs(150, dim, 1000, num_classes=40, empty=50, dtype=torch.float32,
                                 queue_dtype=dtype, device="cuda", seed=7)
    args = (margin["scale"], margin.get("m1", 1.0), margin.get("m2", 0.0), margin.get("m3", 0.0),
            margin.get("interclass_filtering_threshold", 0.0), margin.get("straight_through_margin", False))
    loss, grad = triton_ops.forward(x, k, y, w, yq, *args, True, split_size=256)
    assert launches == [True]
    xr = x.double().requires_grad_(True)
    exact = reference.dcq_cross_entropy(xr, k.double(), y, w.double(), yq, **margin, reduction="none")
    exact.sum().backward()
    delta = cosine_rounding(x, w, dtype)
    assert_loss_close(loss, exact.detach(), scale=margin["scale"], delta=delta)
    assert_grad_close(grad, xr.grad, embeddings=x, scale=margin["scale"], delta=delta,
                      slope=positive_slope(x, k, margin.get("m1", 1.0), margin.get("m2", 0.0), margin["scale"],
                                           margin.get("straight_through_margin", False)),
                      gemm_dtype=dtype)


@pytest.mark.skipif(not ON_HOPPER or os.environ.get("DCQ_TEST_SEESAW_CHILD") != "1",
                    reason="the seesaw kernel on sm_90, run by test_seesaw_kernel_on_sm90_in_a_child_process")
@pytest.mark.parametrize("dtype, margin, dim", [
    (dtype, margin, 512) for dtype in (torch.bfloat16, torch.float16) for margin in ("arcface", "cosface_filtered")
] + [(torch.bfloat16, "arcface", 256)])
def test_seesaw_kernel_child(monkeypatch, launches, dtype, margin, dim):
    """test_gluon_kernel_on_sm90_matches_the_reference with the seesaw kernel selected
    (and the probe cleared: this process stands for the probe), at D = 512 (2 queue
    buffers) and D = 256 (4: hopper_seesaw.stages, another ring and other phases)."""
    monkeypatch.setattr(hopper_launch.hopper_probe, "cleared", lambda *args: True)
    test_gluon_kernel_on_sm90_matches_the_reference(monkeypatch, launches, dtype, margin, kernel="seesaw", dim=dim)
    assert launches.kernels == ["seesaw"]


@pytest.mark.skipif(not ON_HOPPER, reason="the seesaw kernel runs on sm_90 only (a GPU test)")
def test_seesaw_kernel_on_sm90_in_a_child_process():
    """The seesaw kernel has never run: its hand-over between the two warpgroups
    (mbarrier phases per parity) could hang, so its checks against the float64
    reference run in a child process with a deadline (test_seesaw_kernel_child): 120 s,
    within gpu_check's test budget (its probe, run before, catches a hang in 40 s)."""
    env = dict(os.environ, DCQ_TEST_SEESAW_CHILD="1")
    try:
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(Path(__file__)), "-k", "test_seesaw_kernel_child"], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the seesaw kernel did not finish in {exc.timeout} s (a hang in its hand-over?)")
    assert run.returncode == 0 and re.search(r"^5 passed", run.stdout, re.M), run.stdout[-4000:] + run.stderr[-2000:]


def test_the_default_kernel_and_the_choice_is_checked(monkeypatch):
    q, _, w, _ = scenario("random", torch.float16)
    monkeypatch.delenv(hopper_launch.ENV, raising=False)
    assert hopper_launch.selected_kernel() == ("classic" if kernels.INTERPRETED else hopper_launch.RANKED)
    if kernels.INTERPRETED:
        assert hopper_launch.choose_kernel(q, w, 64, 32, 32, CONFIG, (9, 0)) is None
    monkeypatch.setenv(hopper_launch.ENV, "classic")
    assert hopper_launch.choose_kernel(q, w, 64, 32, 32, CONFIG, (9, 0)) is None
    monkeypatch.setenv(hopper_launch.ENV, "fastest")
    with pytest.raises(ValueError, match="DCQ_OPS_SM90_KERNEL must be one of classic, pipelined, seesaw, "
                                         "got 'fastest'"):
        hopper_launch.selected_kernel()


@pytest.mark.parametrize("kernel", ["pipelined", "seesaw"])
def test_where_a_gluon_kernel_applies_under_the_interpreter(monkeypatch, kernel):
    """The twin's rules: the kernel's structural ones on the interpreter's tiles."""
    monkeypatch.setattr(hopper_launch, "INTERPRETED", True)
    q, _, w, _ = scenario("random", torch.float16)
    block_k = 32
    assert hopper_launch.applies(kernel, q, w, 64, 32, block_k, None, None)
    assert not hopper_launch.applies(kernel, q, w, 48, 32, block_k, None, None)  # a tile would straddle two splits
    assert not hopper_launch.applies(kernel, q, w[:0], 64, 32, block_k, None, None)  # an empty queue
    assert not hopper_launch.applies(kernel, q[:, :45], w[:, :45], 64, 32, block_k, None, None)  # 90-byte rows
    # BLOCK_M != BLOCK_K: the pipelined kernel's twin, never the seesaw's.
    assert hopper_launch.applies(kernel, q, w, 64, 16, block_k, None, None) == (kernel == "pipelined")


@pytest.mark.skipif(not hopper.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("kernel", ["pipelined", "seesaw"])
def test_where_a_gluon_kernel_applies_on_sm90(monkeypatch, kernel):
    """The GPU's rules (hopper_launch.RULES; its branch run on CPU tensors)."""
    monkeypatch.setattr(hopper_launch, "INTERPRETED", False)
    q, _, w, _ = scenario("random", torch.bfloat16)
    q, w = q.cpu(), w.cpu()
    tile = dict(BLOCK_M=64, BLOCK_K=64, num_warps=8, num_stages=2)

    def applies(q=q, w=w, split=128, block_m=64, block_k=64, config=None, capability=(9, 0)):
        return hopper_launch.applies(kernel, q, w, split, block_m, block_k, config, capability)

    assert applies() and applies(config=tile)
    assert not applies(capability=(8, 0))  # not sm_90
    assert not applies(q.float(), w.float())  # not 16-bit
    assert not applies(split=96)  # split not a multiple of 64
    assert not applies(block_m=32, block_k=32, config=CONFIG)  # another tile configuration
    assert not applies(config=dict(tile, num_warps=4))  # other warps
    assert not applies(block_m=32)  # the plan's rows per program are not the kernel's
    wide = torch.zeros(q.shape[0], 520, dtype=q.dtype), torch.zeros(w.shape[0], 520, dtype=w.dtype)
    assert not applies(*wide)  # a padded D of 1024
    narrow = torch.zeros(q.shape[0], 24, dtype=q.dtype), torch.zeros(w.shape[0], 24, dtype=w.dtype)
    assert not applies(*narrow)  # a padded D of 32
    assert applies(q[:, :40].contiguous(), w[:, :40].contiguous()) and not applies(q[:, :44].contiguous(),
                                                                                   w[:, :44].contiguous())


class _Recorder:
    """Stands for a Gluon kernel: ``kernel[grid](*args, **kwargs)`` records the call."""

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.calls.append((grid, args, kwargs))


@pytest.mark.skipif(not hopper.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("kernel", ["pipelined", "seesaw"])
def test_the_launch_runs_the_kernel_chosen_with_its_own_arguments(monkeypatch, kernel):
    """hopper_launch.launch on sm_90 (its branch run on CPU tensors, the kernels recorded):
    ``kernel="seesaw"`` launches hopper_seesaw's kernel, never the pipelined one, on the
    same descriptors and workspace, one argument per parameter of its signature, with its
    own warps and register cap; ``"pipelined"`` the pipelined kernel with its stages."""
    from dcq_ops.triton import hopper_seesaw

    monkeypatch.setattr(hopper_launch, "INTERPRETED", False)
    seesaw_kernel, pipelined_kernel = hopper_seesaw.seesaw_queue_pass_kernel, hopper.hopper_queue_pass_kernel
    recorders = {"seesaw": _Recorder(), "pipelined": _Recorder()}
    monkeypatch.setattr(hopper_seesaw, "seesaw_queue_pass_kernel", recorders["seesaw"])
    monkeypatch.setattr(hopper, "hopper_queue_pass_kernel", recorders["pipelined"])
    q, w = torch.zeros(100, 512, dtype=torch.bfloat16), torch.zeros(1000, 512, dtype=torch.bfloat16)
    workspace = tuple(torch.zeros(4) for _ in range(3))
    hopper_launch.launch((4,), q, torch.zeros(100, dtype=torch.long), w, torch.zeros(1000, dtype=torch.long),
                         workspace + (512, True), 100, 1000, 512, 2, 512, 92.3, 0.2, True, 64, 64, "ieee",
                         kernel=kernel)
    assert recorders["pipelined" if kernel == "seesaw" else "seesaw"].calls == []
    [(grid, args, kwargs)] = recorders[kernel].calls
    signature = (seesaw_kernel if kernel == "seesaw" else pipelined_kernel).arg_names
    assert grid == (4,) and len(args) + len(kwargs) - 1 - (kernel == "seesaw") == len(signature), (args, kwargs)
    # The seesaw loads its 2-buffer ring's tiles (D = 512) in two halves of D.
    assert args[0].block_shape == [64, 512] and args[4:7] == workspace
    assert args[1].block_shape == ([64, 256] if kernel == "seesaw" else [64, 512]) and args[1].base is w
    assert args[7:] == (100, 1000, 512, 2, 512, 92.3, 0.2)
    assert kwargs["FILTER"] and kwargs["COMPUTE_GRAD"]
    assert kwargs["RESCALE_ON_GROWTH"] == (hopper_launch.SEESAW_RESCALE_ON_GROWTH if kernel == "seesaw"
                                          else hopper_launch.RESCALE_ON_GROWTH)
    if kernel == "seesaw":
        assert (kwargs["num_warps"], kwargs["maxnreg"]) == (hopper_seesaw.NUM_WARPS, hopper_seesaw.MAXNREG)
        assert kwargs["STAGES"] == hopper_seesaw.stages(512) == 2  # a third buffer does not fit beside q
    else:
        assert (kwargs["num_warps"], kwargs["STAGES"]) == (hopper.NUM_WARPS, hopper.STAGES)


@pytest.mark.skipif(not hopper.AVAILABLE, reason="this Triton has no Gluon")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_launch_descriptors_are_the_compiled_kernels_types(dtype):
    """The host descriptors the launch builds mangle to the types hopper_sass.py (and the
    compiled report) compile the kernel for: what is measured is what would run."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(ROOT / 'benchmarks')!r})
import hopper_sass
from dcq_ops.triton import hopper_launch
from dcq_ops.triton import hopper_seesaw
q, w = torch.zeros(100, 512, dtype={dtype}), torch.zeros(1000, 512, dtype={dtype})
name = {'bf16' if dtype == torch.bfloat16 else 'fp16'!r}
q_desc, w_desc = hopper_launch.gluon_descriptors(q, w)
types = (q_desc.__mangle__(), w_desc.__mangle__())
assert types == hopper_sass.descriptor_types(name, 512), types
# The seesaw's: the queue in half-width blocks (its ring of 2 buffers at D = 512).
seesaw = (q_desc.__mangle__(), hopper_seesaw.queue_descriptor(w_desc).__mangle__())
assert seesaw == hopper_sass.descriptor_types(name, 512, hopper_sass.seesaw_load_block(512)), seesaw
assert seesaw[1] != types[1]
print("same")
"""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "same" in run.stdout, run.stdout[-2000:] + run.stderr[-2000:]


@pytest.fixture(scope="module")
def sass_report(tmp_path_factory):
    """benchmarks/hopper_sass.py's entries for bf16 at D=512 under the running Triton
    (both kernels, every variant; compiled once for the tests that read them)."""
    out = tmp_path_factory.mktemp("hopper_sass") / "hopper.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "hopper_sass.py"), "--dtypes", "bf16",
                          "--json", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())["entries"]


@pytest.mark.skipif(not hopper.AVAILABLE, reason="this Triton has no Gluon")
def test_gluon_kernel_compiles_for_sm90_at_ideal_work_without_serialized_wgmma(sass_report):
    """Compiled for sm_90a without a GPU (bf16, D=512, with the gradient, both
    schedules): each MMA once (FLOPs / ideal 1.0, 1.125 exponentials a logit), at
    most one wgmma wait per four HGMMA in the loop and no ptxas warning
    (C7510/C7515/C7516: serialized wgmma), queue tiles by TMA (UTMALDG, no cp.async),
    no spills in the launch's variant, shared memory within 227 KiB. The load-ahead
    schedule issues the next load while a wgmma is in flight; the softmax-overlap
    schedule every exponential."""
    entries = [e for e in sass_report if e["gradient"] and e["kernel"] == "hopper_queue_pass"]
    assert {e["schedule"] for e in entries} == {"load-ahead", "softmax-overlap"}
    for e in entries:
        counts = e["per_iteration"]
        assert e["mma_flops_over_ideal"] == 1.0 and e["exponentials_per_logit"] <= 1.125, e
        assert counts["hgmma"] == 36 and counts["warpgroup.depbar"] * 4 <= counts["hgmma"], e
        assert not any(w for w in e["ptxas_warnings"] if "C75" in w), e["ptxas_warnings"]
        assert counts["utmaldg"] >= 1 and counts["ldgsts"] == 0 and e["shared"] <= 232448, e
        if e["default"] or e["rescale_on_growth"] == hopper_launch.RESCALE_ON_GROWTH:
            assert e["spill_bytes"] == 0, e
        if e["schedule"] == "load-ahead":
            assert e["utmaldg_under_mma"] >= 1, e
        else:
            assert e["ex2_under_mma"] == counts["mufu.ex2"], e


@pytest.mark.skipif(not hopper.AVAILABLE, reason="this Triton has no Gluon")
def test_seesaw_kernel_compiles_for_sm90_at_ideal_work(sass_report):
    """The seesaw kernel (dcq_ops/triton/hopper_seesaw_kernel.py, the ranked chain's first),
    bf16 at D=512: each consumer warpgroup's loop issues one tile's S GEMM as
    m64n64k16 and its half of two tiles' P W (40 HGMMA, FLOPs / ideal 1.0 for the
    tile it completes), at most one wgmma wait per four HGMMA, no serialized-wgmma
    advisory, its queue tiles by TMA from inside the loop, at most 1.125
    exponentials a logit, no spills (a loop-invariant buffer index let the compiler
    hoist the loop's wgmma descriptors, 92-244 B of spills), shared memory within
    227 KiB; the cycle model (the two consumers taking the tiles in turn, their
    schedule simulated by benchmarks/seesaw_schedule.py on the loop's issue work)
    ranks it above the pipelined kernel, whose softmax runs with no wgmma of its own in
    flight and its two warpgroups in step (no overlap: the model's serialized bound)."""
    entries = [e for e in sass_report if e["kernel"] == "hopper_seesaw_queue_pass"]
    assert {(e["gradient"], e["rescale_on_growth"]) for e in entries} == {
        (True, True), (True, False), (False, hopper_launch.SEESAW_RESCALE_ON_GROWTH)}, entries
    launched = next(e for e in sass_report if e["kernel"] == "hopper_queue_pass" and e["default"] and e["gradient"])
    for e in entries:
        assert "error" not in e, e
        gemms = {"64x64x16"} | ({"64x256x16"} if e["gradient"] else set())
        assert set(e["hgmma_shapes"]) == gemms and e["mma_flops_over_ideal"] == 1.0, e
        assert e["exponentials_per_logit"] <= 1.125, e
        assert not any(w for w in e["ptxas_warnings"] if re.search(r"C751[056]|maxnreg", w)), e["ptxas_warnings"]
        assert e["shared"] <= 232448 and e["per_iteration"]["ldgsts"] == 0, e
        assert len(e["consumer_loops"]) == 2, e  # one loop per consumer warpgroup
        for loop in e["consumer_loops"]:
            assert loop["hgmma"] == (40 if e["gradient"] else 32) and loop["warpgroup.depbar"] * 4 <= loop["hgmma"], e
            assert loop["utmaldg"] >= 1, e
        assert e["spill_bytes"] == 0 and all(loop["local"] == 0 for loop in e["consumer_loops"]), e
        if e["gradient"]:
            model = e["cycle_model"]
            assert not model["serialized"] and model["components"]["mma"] == model["components"]["mma_ideal"], model
            assert model["fraction_of_peak"] > launched["cycle_model"]["fraction_of_peak"], (model, launched)
    assert launched["cycle_model"]["serialized"], launched  # no exponential under its own wgmma


def _synthetic_seesaw_sass(non_mma: int) -> str:
    """A consumer loop as the seesaw's looks to the cycle model: the wait for its
    tile at the top, 32 m64n64k16 and 8 m64n256k16 and a wait, non_mma other
    instructions, the load of a tile; inside a dispatch loop holding 48 more HGMMA."""
    lines = [".L_x_0:"] + [f"        /*{i:04x}*/    HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4].tnspB, R24 ;"
                           for i in range(48)]
    lines += [".L_x_1:", "        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR60], RZ ;"]
    lines += [f"        /*{0x200 + i:04x}*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;"
              for i in range(32)]
    lines += [f"        /*{0x300 + i:04x}*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4].tnspB, R24 ;"
              for i in range(8)]
    lines += ["        /*0400*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;",
              "        /*0410*/                   UTMALDG.2D [UR56], [UR4] ;"]
    lines += [f"        /*{0x1000 + i:05x}*/                   FADD R{i % 200}, R1, R2 ;" for i in range(non_mma)]
    lines += ["        /*90010*/               @P0 BRA `(.L_x_1) ;",
              "        /*90020*/               @P1 BRA `(.L_x_0) ;",
              "        /*90030*/                   EXIT ;"]
    return "\n".join(lines) + "\n"


def test_cycle_model_seesaw_reads_the_consumer_loop_and_simulates_its_schedule():
    """benchmarks/cycle_model.py with interleave=2: the loop read is the consumer's
    innermost one (32 m64n64k16 and 8 m64n256k16: 2,048 tensor-core clocks a tile),
    not the dispatch loop around it (which holds more HGMMA), and the clocks a tile
    are benchmarks/seesaw_schedule.py's run of the protocol on the loop's issue work
    at the ring depth given: with three buffers fewer than with two (whose loads show)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cycle_model import HOPPER, cycle_model
    from seesaw_schedule import simulate

    sass = _synthetic_seesaw_sass(1000)
    two, three = (cycle_model(sass, 64, 64, 512, 4, mma_warpgroups=1, num_stages=stages, gemms=2, interleave=2)
                  for stages in (2, 3))
    # 1,000 FADD and the tile's wait, load and back-edge branch.
    assert two["components"]["mma"] == 2048 and two["components"]["issue"] == 1003, two["components"]
    assert two["clocks_per_tile"] == simulate(64, 2, 512, softmax=1003, hardware=HOPPER)["clocks_per_tile"]
    assert two["components"]["exposed_load"] > 0 and three["clocks_per_tile"] < two["clocks_per_tile"]
    single = cycle_model(sass, 64, 64, 512, 4, mma_warpgroups=1, gemms=2)
    assert single["components"]["mma"] > 2048  # the dispatch loop, read as the MMA loop
    with pytest.raises(ValueError, match="2 consumers with the gradient"):
        cycle_model(sass, 64, 64, 512, 4, mma_warpgroups=1, gemms=1, interleave=2)


# The shape of the Gluon kernel's SASS (Triton 3.8, sm_90a, abridged): tile 0's
# cosines before the loop, the loop over tiles (.L_x_9), the last tile's P W after
# it, and, after the final EXIT, ptxas's out-of-line retry loops of the mbarrier
# waits, each returning into the middle of the code with a BRA back.
_GLUON_SASS = """
.L_x_12:
        /*0a80*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR60+0x32200], RZ ;
        /*0bb0*/              @!P0 BRA `(.L_x_2) ;
.L_x_13:
        /*0d20*/                   HGMMA.64x32x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT, gsb0 ;
        /*0d60*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
.L_x_9:
        /*42b0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*4540*/                   HGMMA.64x32x16.F32.BF16 R152, gdesc[UR56], RZ, !UPT, gsb0 ;
        /*4b70*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*4d10*/                   UTMALDG.2D [UR56], [UR4] ;
        /*5060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*5e50*/                   MUFU.EX2 R163, R154 ;
        /*6540*/              @!P0 BRA `(.L_x_8) ;
        /*6570*/                   BRA `(.L_x_9) ;
.L_x_8:
        /*7ac0*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR4].tnspB, R24, gsb0 ;
        /*7c30*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*9890*/              @!P4 EXIT ;
        /*98c0*/                   EXIT ;
.L_x_2:
        /*9900*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P0, [UR60+0x32200], RZ ;
        /*9910*/              @!P0 BRA `(.L_x_2) ;
        /*9920*/                   BRA `(.L_x_13) ;
.L_x_15:
        /*9960*/                   BRA `(.L_x_15);
"""


def test_sass_loops_ignore_the_retry_loops_after_exit():
    """benchmarks/sass_counts.loops: the back-edges after the last EXIT (mbarrier
    retry loops) are not loops of the kernel, so the MMA loop is the loop over tiles
    (before the fix it was .L_x_13 -> the end: 4 HGMMA instead of 2, and the cycle
    model counted the prologue and the epilogue as one iteration)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts

    # The loop over tiles; the retry loop and the trap, each a branch to itself, hold no MMA.
    assert [loop.label for loop in sass_counts.loops(_GLUON_SASS)] == [".L_x_9", ".L_x_2", ".L_x_15"]
    loop = sass_counts.mma_loop(_GLUON_SASS)
    counts = sass_counts.count(loop.body)
    assert (loop.label, counts["hgmma"], counts["warpgroup_depbar"], counts["utmaldg"]) == (".L_x_9", 2, 2, 1)


def test_sass_counts_read_fp16_hgmma():
    """nvdisasm prints an fp16 HGMMA without its operand type ("HGMMA.64x32x16.F32"):
    benchmarks/sass_counts.hgmma_shape must still size it (before the fix the cycle
    model gave the fp16 kernels 0 tensor-core clocks)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts

    fp16 = """
.L_x_0:
        /*0010*/                   HGMMA.64x32x16.F32 R152, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   HGMMA.64x256x16.F32 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0040*/              @!P0 BRA `(.L_x_0) ;
        /*0050*/                   EXIT ;
"""
    counts = sass_counts.count(sass_counts.mma_loop(fp16).body)
    assert counts["hgmma"] == 2
    assert counts["hgmma_flops"] == 2 * 64 * 32 * 16 + 2 * 64 * 256 * 16
    assert counts["hgmma_smem_bytes"] == (64 * 16 + 32 * 16) * 2 + (64 * 16 + 256 * 16) * 2


def _loop_with_softmax(wait_before_softmax: str) -> str:
    """Two GEMMs, a wait (``wait_before_softmax``), the softmax's exponentials, a full wait."""
    return f"""
.L_x_0:
        /*0010*/                   HGMMA.64x32x16.F32.BF16 R152, gdesc[UR4], RZ, !UPT ;
        /*0020*/                   HGMMA.64x256x16.F32.BF16 R24, gdesc[UR8].tnspB, R24, gsb0 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, {wait_before_softmax} ;
        /*0040*/                   MUFU.EX2 R1, R2 ;
        /*0050*/                   MUFU.EX2 R3, R4 ;
        /*0060*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0070*/              @!P0 BRA `(.L_x_0) ;
        /*0080*/                   EXIT ;
"""


def test_cycle_model_overlaps_the_softmax_only_under_a_wgmma_in_flight():
    """A loop (8 HGMMA a wait or fewer) whose exponentials all follow a wait for every
    wgmma runs its softmax between the GEMMs: the model takes the serialized bound (as
    for the pipelined kernel's load-ahead schedule); the same loop whose wait leaves one
    group in flight overlaps them (its softmax-overlap schedule)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sass_counts
    from cycle_model import cycle_model

    after, under = _loop_with_softmax("0x0"), _loop_with_softmax("0x1")
    assert sass_counts.exponentials_under_mma(sass_counts.mma_loop(after).body) == 0
    assert sass_counts.exponentials_under_mma(sass_counts.mma_loop(under).body) == 2
    # Few waits for the HGMMA: 8 of them a wait, 2 waits.
    many = {name: text.replace("        /*0020*/", "".join(
        f"        /*001{i}*/                   HGMMA.64x32x16.F32.BF16 R152, gdesc[UR4], R152 ;\n"
        for i in range(8)) + "        /*0020*/") for name, text in (("after", after), ("under", under))}
    serial, overlapped = (cycle_model(many[name], 64, 64, 512, 8, gemms=2) for name in ("after", "under"))
    assert serial["serialized"] and serial["softmax_under_mma"] == 0, serial
    assert not overlapped["serialized"] and overlapped["softmax_under_mma"] == 2, overlapped
    assert serial["clocks_per_tile"] == serial["clocks_serialized"] > overlapped["clocks_pipelined"]
