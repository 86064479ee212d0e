"""The sizes the Triton kernels are launched with, and the kernels Triton compiles for them.

Triton's launcher compiles a kernel of its own for each way it specialises an integer
argument: a 1 becomes a constant, a multiple of 16 gets a divisibility hint. Some of
those kernels spilled registers where the one benchmarks/compiled.py checks did not
(num_splits = 1, a batch not a multiple of 16). So the queue-pass and repair kernels
never specialise num_splits, queue_size and split_size (kernels.RUNTIME_INTEGERS), and
the launch pads the rows to a multiple of 16 (launch.ROW_ALIGN): every launch compiles
the kernel the report compiles. The padding rows read what the kernels' masked loads
read past the last row (zeros, label -1), so the results are those of the rows alone
(tests/test_triton_partials.py compares them bit for bit with the former launch of
37 rows).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

ON_CUDA = torch.cuda.is_available()

from dcq_ops.triton import import_ops  # noqa: E402

try:
    import_ops(interpret=not ON_CUDA)
except ImportError:
    pytest.skip("Triton is not installed", allow_module_level=True)

from dcq_ops.triton import kernels, launch  # noqa: E402
from dcq_ops.triton.configs import ARCHITECTURES, tile_configs  # noqa: E402
from inputs import make_inputs  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"

if not ON_CUDA and not kernels.INTERPRETED:
    pytest.skip("dcq_ops.triton.kernels was imported before this module without TRITON_INTERPRET=1",
                allow_module_level=True)


@pytest.fixture(autouse=True)
def _triton_env(monkeypatch):
    if not ON_CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DCQ_TRITON_AUTOTUNE", "0")


class _Recorder:
    """Stands for a kernel: records each launch's grid and arguments instead of running it."""

    def __init__(self):
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, args, kwargs))


def test_padded_rows():
    assert [launch.padded_rows(n) for n in (0, 1, 15, 16, 17, 4095, 4096)] == [0, 16, 16, 16, 32, 4096, 4096]
    assert launch.ROW_ALIGN % 16 == 0  # what Triton's divisibility hint asks


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_padding_adds_no_program(name):
    """Every BLOCK_M a launch can choose (and the repair's) is a multiple of ROW_ALIGN, so
    the padded rows have the row blocks of the rows: no program, no work more."""
    for element_size, tf32 in ((2, False), (4, False), (4, True)):
        for dim in (64, 512):
            for config in tile_configs(ARCHITECTURES[name], element_size, dim, tf32):
                for tile in (config, launch.repair_tile(config), launch.repair_tile(config, fma=True)):
                    assert tile.block_m % launch.ROW_ALIGN == 0, (name, tile)


@pytest.mark.parametrize("rows", [5, 16, 37])
def test_kernels_launched_with_rows_padded_to_16(monkeypatch, rows):
    """The queue pass and the repair see a row count that is a multiple of 16 (so Triton
    gives it its divisibility hint) and rows padded with zeros and label -1; the
    workspace the caller gets holds the rows, its storage the padding rows too."""
    x, _, y, w, yq = make_inputs(rows, 8, 96, num_classes=20, empty=5, seed=41)
    q = F.normalize(x, dim=1)
    passes, repairs = _Recorder(), _Recorder()
    monkeypatch.setattr(launch, "queue_pass_kernel", passes)
    monkeypatch.setattr(launch, "repair_kernel", repairs)
    ws = launch.queue_pass(q, y, w, yq, 64.0, 0.0, True, split_size=32,
                           config=dict(BLOCK_M=16, BLOCK_K=16, num_warps=4, num_stages=1))
    padded = -(-rows // 16) * 16
    assert ws.max_ws.shape == (rows, 3) and ws.sum_ws.shape == (rows, 3) and ws.acc_ws.shape == (rows, 3, 8)
    for recorder in (passes, repairs):
        (grid, args, _), = recorder.launches
        assert grid == (padded // 16 * 3,)
        q_arg, labels_arg = args[0], args[1]
        assert args[7] == padded and args[7] % 16 == 0  # num_rows
        assert q_arg.shape == (padded, 8) and labels_arg.shape == (padded,)
        assert torch.equal(q_arg[:rows], q) and torch.equal(labels_arg[:rows], y)
        assert not q_arg[rows:].any() and (labels_arg[rows:] == -1).all()
        # The workspace's pointers: the views' storage, with room for the padding rows.
        for view in args[4:7]:
            assert view.untyped_storage().nbytes() >= padded * view[0].numel() * view.element_size()
    # The padding rows' sums are NaN until a kernel writes them: the repair never marks them.
    base = torch.as_strided(ws.sum_ws, (padded, 3), ws.sum_ws.stride())
    assert base[rows:].isnan().all()


def test_every_launch_compiles_the_reported_kernel(tmp_path):
    """For every launch of benchmarks/kernel_variants.LAUNCHES (num_splits = 1, sizes not
    multiples of 16, num_splits a multiple of 16, one row and one queue entry, an empty
    queue), Triton's launcher specialises the queue-pass and repair kernels' integers as
    for the sizes the report compiles: one kernel each. With num_splits specialised again
    (as before), num_splits = 1 is a kernel of its own, which the report then compiles.
    The merge kernel's num_splits gets no divisibility hint (with one, Triton 3.6's
    BLOCK_R = 1, BLOCK_S = 8 merge spills 16 B on sm_100); its 1 stays a constant, a
    kernel the report compiles (the merge's num_splits = 1)."""
    pytest.importorskip("triton.backends.nvidia.compiler", reason="Triton without its NVIDIA backend")
    script = tmp_path / "groups.py"
    script.write_text(
        "import sys\n"
        f"sys.path[:0] = [{str(BENCHMARKS)!r}, {str(BENCHMARKS.parent)!r}]\n"
        "import kernel_variants as kv\n"
        "from dcq_ops.triton import kernels\n"
        "every = list(kv.SPECIALIZATIONS)\n"
        "for fn, keys in ((kernels.queue_pass_kernel, True), (kernels.repair_kernel, False)):\n"
        "    groups = kv.specialization_groups(fn, 512, keys)\n"
        "    assert groups == {None: every}, (fn.__name__, groups)\n"
        "    assert kv.launch_integers(fn, 512, keys, 'unaligned')['num_rows'] == ('i32', 'D')\n"
        "    next(p for p in fn.params if p.name == 'num_splits').do_not_specialize = False\n"
        "    groups = kv.specialization_groups(fn, 512, keys)\n"
        "    assert groups['one_split'] == ['one_split', 'one_row', 'empty_queue'], groups\n"
        "from triton_compile import launch_specialization\n"
        "merge = kernels.merge_kernel\n"
        "assert launch_specialization(merge, 'num_splits', 16) == ('i32', ''), 'merge: num_splits hinted'\n"
        "assert launch_specialization(merge, 'num_splits', 1) == ('constexpr', 1)  # compiled: merge one_split\n"
        "print('ok')\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
