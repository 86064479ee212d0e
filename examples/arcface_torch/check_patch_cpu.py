"""Run the patched arcface_torch ``train_v2.py`` on CPU ranks (gloo), to check the
migration's checkpoints without GPUs: shims for what a CPU machine may lack (mxnet,
easydict, tensorboard, torchvision, CUDA, NCCL), a record of every step's loss per
rank, a record of the queue right after ``load_state_dict``, and a stop right after
the checkpoint of epoch ``STOP_EPOCH`` (as a kill would).

From ``recognition/arcface_torch`` of an insightface checkout with the patch applied,
with ``dcq_ops`` importable and a config whose ``output`` is ``$OUT``, ``rec`` a small
image folder (one sub-folder per identity), ``save_all_states = True`` and
``resume = os.environ.get("RESUME") == "1"``::

    OUT=run RECORD=full torchrun --standalone --nproc_per_node=2 check_patch_cpu.py configs/tiny.py
    OUT=part RECORD=part STOP_EPOCH=2 torchrun --standalone --nproc_per_node=2 check_patch_cpu.py configs/tiny.py
    OUT=part RECORD=resumed RESUME=1 torchrun --standalone --nproc_per_node=2 check_patch_cpu.py configs/tiny.py

then ``torch.load("resumed.rank0.pt") == torch.load("full.rank0.pt")[16:]`` (the steps
after epoch 2), and the same for every rank. ``RESUME=1`` with another
``--nproc_per_node`` resumes on another world size (``RECORD.loaded<rank>.pt`` holds
the global queue each rank's module holds after loading; ``RECORD.lr<rank>.pt`` the
learning rate after every scheduler step, to see the schedule carried over).
``INF_STEPS=3,10`` (and ``INF_RANK``, default 0) puts an infinite class weight on that
rank at those steps of the run, to see bad steps skipped on every rank and counted
(``config.dcq_max_bad_steps`` bounds them). README.md ("Checkpoints that resume on any
number of GPUs", "Bad steps") gives the results.
"""
import os, runpy, sys, types

import torch
import torch.distributed as dist

sys.modules["mxnet"] = types.ModuleType("mxnet")
ed = types.ModuleType("easydict")
class EasyDict(dict):
    def __getattr__(self, k):
        try:
            return self[k]
        except KeyError:
            raise AttributeError(k)
    def __setattr__(self, k, v):
        self[k] = v
ed.EasyDict = EasyDict
sys.modules["easydict"] = ed
tb = types.ModuleType("torch.utils.tensorboard")
class SummaryWriter:
    def __init__(self, *a, **k): pass
    def add_scalar(self, *a, **k): pass
tb.SummaryWriter = SummaryWriter
sys.modules["torch.utils.tensorboard"] = tb
tv = types.ModuleType("torchvision"); tv.__path__ = []
for sub in ("transforms", "datasets"):
    m = types.ModuleType(f"torchvision.{sub}"); setattr(tv, sub, m); sys.modules[f"torchvision.{sub}"] = m
sys.modules["torchvision.datasets"].ImageFolder = object
sys.modules["torchvision"] = tv
ev = types.ModuleType("eval"); ev.__path__ = []
sys.modules["eval"] = ev
sys.modules["eval.verification"] = types.ModuleType("eval.verification")
ev.verification = sys.modules["eval.verification"]

torch.nn.Module.cuda = lambda self, *a, **k: self
torch.Tensor.cuda = lambda self, *a, **k: self
torch.cuda.set_device = lambda *a, **k: None
_init = dist.init_process_group
dist.init_process_group = lambda backend=None, **kw: _init("gloo", **kw)
_ddp_init = torch.nn.parallel.DistributedDataParallel.__init__
def ddp_init(self, *a, **kw):
    kw["device_ids"] = None
    _ddp_init(self, *a, **kw)
torch.nn.parallel.DistributedDataParallel.__init__ = ddp_init
torch.nn.parallel.DistributedDataParallel.register_comm_hook = lambda self, *a, **k: None

_lrs = torch.optim.lr_scheduler.LRScheduler.__init__
def lrs_init(self, optimizer, last_epoch=-1, verbose=None):  # newer torch has no verbose
    _lrs(self, optimizer, last_epoch)
torch.optim.lr_scheduler.LRScheduler.__init__ = lrs_init
here = os.getcwd()
sys.path.insert(0, here)
import dataset
import utils.utils_distributed_sampler as uds
_sync = uds.sync_random_seed
uds.sync_random_seed = lambda seed=None, device="cpu": _sync(seed, "cpu")
class DL(torch.utils.data.DataLoader):
    def __init__(self, local_rank, **kw):
        kw.pop("pin_memory", None)
        super().__init__(**kw)
dataset.DataLoaderX = DL

import dcq_ops
LOSSES = []
_forward = dcq_ops.DCQLoss.forward
def forward(self, *a, **k):
    loss = _forward(self, *a, **k)
    LOSSES.append(float(loss))
    return loss
dcq_ops.DCQLoss.forward = forward
_load = dcq_ops.DCQLoss.load_state_dict
def load_state_dict(self, state, *a, **k):
    result = _load(self, state, *a, **k)
    after = self.global_state_dict()  # a collective when sharded: every rank loads
    torch.save({"after": after, "block": self.queue.state_dict()}, f"{os.environ['RECORD']}.loaded{os.environ.get('RANK', '0')}.pt")
    return result
dcq_ops.DCQLoss.load_state_dict = load_state_dict

rank = int(os.environ.get("RANK", "0"))
out = os.environ["RECORD"]

# The learning rate of every step (the scheduler's, after each of its steps).
LRS = []
_lr_step = torch.optim.lr_scheduler.LRScheduler.step
def lr_step(self, *a, **k):
    _lr_step(self, *a, **k)
    LRS.append(self.get_last_lr()[0])
torch.optim.lr_scheduler.LRScheduler.step = lr_step

# INF_STEPS=3,5 (with INF_RANK, default 0): an infinite class weight on that rank at those
# steps of this run (counted from 1), as a bad image would give.
inf_steps = {int(s) for s in os.environ.get("INF_STEPS", "").split(",") if s}
calls_sf = {"n": 0}
_shuffled = dcq_ops.shuffled_forward
def shuffled_forward(*a, **k):
    weights = _shuffled(*a, **k)
    calls_sf["n"] += 1
    if calls_sf["n"] in inf_steps and rank == int(os.environ.get("INF_RANK", "0")):
        weights = weights.clone()
        weights[0, 0] = float("inf")
    return weights
dcq_ops.shuffled_forward = shuffled_forward

def dump():
    torch.save(LOSSES, f"{out}.rank{rank}.pt")
    torch.save(LRS, f"{out}.lr{rank}.pt")

stop = int(os.environ.get("STOP_EPOCH", "0"))
calls = {"n": 0}
_gather = dist.all_gather_object
def all_gather_object(*a, **k):
    _gather(*a, **k)
    calls["n"] += 1
    if stop and calls["n"] == stop and rank != 0:
        dist.barrier(); dump(); os._exit(0)
dist.all_gather_object = all_gather_object
_replace = os.replace
def replace(src, dst):
    _replace(src, dst)
    if stop and calls["n"] == stop and dst.endswith("checkpoint_dcq.pt"):
        dist.barrier(); dump(); os._exit(0)
os.replace = replace

sys.argv = ["train_v2.py", sys.argv[1]]
try:
    runpy.run_path("train_v2.py", run_name="__main__")
finally:
    dump()
