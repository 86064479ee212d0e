"""No host read in a steady-state multi-rank step, BatchGuard that never blocks, and the
byte count of the collectives.

The multi-rank part runs gathered and sharded steps on 2 and 3 gloo ranks (torchrun,
CPU) and, after warm-up steps, runs more steps - forward, backward and enqueue, uneven
batch sizes, a bad batch on one rank and the call that reports it, then eval steps - inside
``no_host_reads``: every way a tensor's value reaches the host from Python (``.item()``,
``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``, ``int()``, ``float()``,
``__index__``) raises. On a GPU each of those would wait for the device. The only tensors
let through are BatchGuard's host copies (``dcq_ops.batch_guard.host_copy``: pinned
memory read after its event has passed, on a GPU). The detector is tested on its own too.
"""

from __future__ import annotations

import contextlib
import datetime
import traceback
from pathlib import Path

import pytest
import torch

import dcq_ops
from dcq_ops.batch_guard import host_copy
from dcq_ops.parallel import collectives
from dcq_ops.queue import ClassQueue
from ranks import results_of, run_ranks

D = 8
K = 29
NUM_CLASSES = 50
WORLDS = (2, 3)
WARMUP = 2
# Local batch sizes per step and rank: step 0 agrees on the capacity (its largest batch);
# later steps are uneven and never larger. Step BAD_STEP has a NaN on the last rank.
SIZES = {
    2: [[5, 4], [5, 5], [3, 5], [5, 1], [2, 4], [4, 4], [1, 5]],
    3: [[4, 5, 3], [5, 5, 5], [2, 5, 4], [5, 1, 3], [3, 3, 3], [4, 2, 5], [1, 1, 5]],
}
BAD_STEP = 4   # inside the window; the next call (step 5) reports it
CAPACITY = 5
MODES = {  # name: (distributed, backend)
    "gathered-reference": ("gathered", "reference"),
    "gathered-auto": ("gathered", "auto"),
    "sharded-auto": ("sharded", "auto"),
}
PG_TIMEOUT_S = 45
WORLD_DEADLINE_S = 150

FORBIDDEN = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


class HostRead(BaseException):
    """A tensor read on the host where none may be: a BaseException, so that no
    ``except Exception`` of the code under test can swallow it."""


@contextlib.contextmanager
def no_host_reads(seen: list):
    """Make every Python-level read of a tensor's value raise HostRead (and note it in
    ``seen``), except for BatchGuard's host copies."""
    saved = {name: torch.Tensor.__dict__.get(name) for name in FORBIDDEN}
    originals = {name: getattr(torch.Tensor, name) for name in FORBIDDEN}

    def forbid(name):
        original = originals[name]

        def read(self, *args, **kwargs):
            if getattr(self, "_dcq_host_copy", False):
                return original(self, *args, **kwargs)
            where = "".join(traceback.format_stack(limit=6)[:-1])
            seen.append(f"Tensor.{name}\n{where}")
            raise HostRead(f"Tensor.{name}() read a tensor on the host inside a steady-state step:\n{where}")
        return read

    for name in FORBIDDEN:
        setattr(torch.Tensor, name, forbid(name))
    try:
        yield
    finally:
        for name in FORBIDDEN:
            if saved[name] is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, saved[name])


# --------------------------------------------------------------------------- the detector itself


@pytest.mark.parametrize("read", [
    lambda t: t.item(), lambda t: t.tolist(), lambda t: t.cpu(), lambda t: t.numpy(), lambda t: bool(t),
    lambda t: int(t), lambda t: float(t), lambda t: [1, 2, 3][t], lambda t: t.sum().item(),
    lambda t: 1 if t > 0 else 0,
], ids=["item", "tolist", "cpu", "numpy", "bool", "int", "float", "index", "sum-item", "if"])
def test_the_detector_catches_every_host_read(read):
    seen = []
    t = torch.ones((), dtype=torch.long)
    with pytest.raises(HostRead), no_host_reads(seen):
        read(t)
    assert len(seen) == 1
    assert read(t) is not None  # restored afterwards


def test_the_detector_lets_device_work_and_host_copies_through():
    seen = []
    t = torch.arange(6)
    with no_host_reads(seen):
        u = (t * 2).cumsum(0)[t % 2 == 0]
        torch.where(u > 3, u, -u).index_copy_(0, torch.tensor([0]), torch.tensor([7]))
        assert host_copy(u.clone()).tolist() == [0, 6, 20]
    assert seen == [] and u.tolist() == [0, 6, 20]


# --------------------------------------------------------------------------- the padded enqueue


@pytest.mark.parametrize("slots, world, blocks", [(7, 1, 1), (7, 3, 2), (13, 2, 3), (23, 3, 3), (23, 2, 1)])
def test_padded_enqueue_writes_exactly_the_valid_rows_in_rank_order(slots, world, blocks):
    """Every wrap-around position, empty ranks, bad steps: the blocks written from a padded
    gather with device-side counts put end to end are the one-process queue."""
    from dcq_ops.parallel import ShardedClassQueue
    from dcq_ops.parallel.padded import enqueue_padded

    g = torch.Generator().manual_seed(slots * 10 + world)
    full = ClassQueue(slots, 4)
    shards = [ShardedClassQueue(slots, 4, world_size=blocks, rank=r) for r in range(blocks)]
    steps = 0
    while steps < 25:
        capacity = int(torch.randint(1, 6, (1,), generator=g))
        counts = torch.randint(0, capacity + 1, (world,), generator=g)
        if not 1 <= int(counts.sum()) <= slots:
            continue
        steps += 1
        weights, labels = torch.randn(world * capacity, 4, generator=g), torch.randint(0, 50, (world * capacity,),
                                                                                        generator=g)
        valid = torch.cat([torch.arange(r * capacity, r * capacity + int(counts[r])) for r in range(world)])
        bad = steps % 7 == 3
        if not bad:
            full.enqueue(weights[valid], labels[valid])
        for shard in shards:
            enqueue_padded(shard.weights, shard.labels, shard.ptr, start=shard.start, queue_size=slots,
                           class_weights=weights, class_labels=labels, counts=counts, capacity=capacity,
                           bad_reasons=torch.tensor([int(bad) * 4]))
        assert torch.equal(torch.cat([s.weights for s in shards]), full.weights), steps
        assert torch.equal(torch.cat([s.labels for s in shards]), full.labels), steps
        assert all(int(s.ptr) == int(full.ptr) for s in shards), steps


# --------------------------------------------------------------------------- BatchGuard never blocks


class FakeEvent:
    """A CUDA event stand-in (the CPU has none): query() says whether the copy arrived;
    synchronize() is a wait, counted."""

    def __init__(self, waits: list):
        self.done = False
        self.waits = waits

    def query(self) -> bool:
        return self.done

    def synchronize(self) -> None:
        self.waits.append(self)
        self.done = True


def guard_with_fake_events(loss_fn):
    events, waits = [], []
    guard = loss_fn.guard

    def snapshot():
        events.append(FakeEvent(waits))
        return host_copy(guard.status.clone()), events[-1]

    guard._snapshot = snapshot
    return events, waits


def batch(labels=(0, 1, 2, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(5, 6, generator=g), torch.tensor(labels), torch.randn(5, 6, generator=g)


def test_batch_guard_never_waits_and_reports_once_the_copy_has_arrived():
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=12)
    events, waits = guard_with_fake_events(loss_fn)
    loss_fn(*batch())                      # step 1
    ptr = int(loss_fn.queue.ptr)
    loss_fn(*batch(labels=(0, 1, 99, 3, 4)))  # step 2: bad, kept out of the queue
    assert int(loss_fn.queue.ptr) == ptr
    for seed in (1, 2):                    # steps 3 and 4: the copies have not arrived: no error, no wait
        loss_fn(*batch(seed=seed))
    assert waits == [] and int(loss_fn.queue.ptr) == (ptr + 10) % 12
    events[0].done = True                  # step 1's copy: nothing to report
    loss_fn(*batch(seed=3))
    events[1].done = events[2].done = True  # step 2's copy has arrived (and step 3's)
    with pytest.raises(ValueError, match="step 2 had a label >= num_classes = 40.*not enqueued"):
        loss_fn(*batch(seed=4))
    for event in events:
        event.done = True
    loss_fn(*batch(seed=5))                # reported once
    assert waits == []


def test_batch_guard_report_reaches_the_user_even_if_the_host_is_always_ahead():
    """The copies are kept oldest first: even if the newest never arrives in time, an
    older one does, and it holds the bad step (the status is cumulative)."""
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=12)
    events, _ = guard_with_fake_events(loss_fn)
    loss_fn(*batch(labels=(0, 1, 99, 3, 4)))  # step 1: bad
    for seed in range(40):  # more steps than copies kept
        if seed > 2:
            events[seed - 3].done = True  # the device three steps behind the host
        try:
            loss_fn(*batch(seed=seed))
        except ValueError as exc:
            assert "step 1 had a label >= num_classes" in str(exc)
            break
    else:
        pytest.fail("the bad step was never reported")


def test_pending_report_and_check_now_keep_their_behaviour():
    loss_fn = dcq_ops.DCQLoss(None, 6, num_classes=40, queue_size=12)
    events, waits = guard_with_fake_events(loss_fn)
    loss_fn(*batch(labels=(0, 1, 99, 3, 4)))
    report = loss_fn.pending_report()      # waits for the last step's copy, as documented
    assert "step 1 had a label >= num_classes" in report and waits == [events[-1]]
    assert loss_fn.pending_report() is None
    loss_fn(*batch(labels=(0, 1, 99, 3, 4)))
    with pytest.raises(ValueError, match="step 2 had"):
        loss_fn.check()                    # now=True: reads the status itself, whatever the events say
    loss_fn.check()


# --------------------------------------------------------------------------- worker side


def global_batch(world: int, step: int):
    sizes = SIZES[world][step]
    g = torch.Generator().manual_seed(100 * world + step)
    n = sum(sizes)
    x = torch.randn(n, D, generator=g)
    k = 0.6 * x + torch.randn(n, D, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    if step == BAD_STEP:
        k[n - 1, 0] = float("nan")  # the last rank's last row
    return x, y, k


def rows_of(sizes, rank) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def run_mode(rank, world, distributed, backend):
    from dcq_ops.parallel import gather_queue

    module = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, backend=backend,
                             distributed=distributed)
    # The first call of each shape class (its launch plan: every local batch size has its own
    # row tail) is checked once, with a host read; the documented way to keep them all out of
    # the training steps is prepare() with the batch sizes the loss will see.
    module.prepare(range(1, CAPACITY + 1), evaluation=True)
    seen, outcomes, traffic = [], [], None
    for step in range(len(SIZES[world])):
        x, y, k = global_batch(world, step)
        mine = rows_of(SIZES[world][step], rank)
        xe = x[mine].clone().requires_grad_(True)
        window = no_host_reads(seen) if step >= WARMUP else contextlib.nullcontext()
        counting = collectives.traffic() if step == WARMUP else contextlib.nullcontext()
        try:
            with window, counting as sent:
                loss = module(xe, y[mine], k[mine])
                loss.backward()
            outcomes.append(("ok", ""))
        except ValueError as exc:
            outcomes.append(("ValueError", str(exc)))
        except HostRead as exc:
            outcomes.append(("HostRead", str(exc)))
        if step == WARMUP:
            traffic = dict(bytes=sent.bytes, calls=sent.calls, by_kind=sent.by_kind)
    # Eval: switching (every rank at once) agrees again (one host read); then steady eval steps.
    module.eval()
    eval_outcomes = []
    for step in range(3):
        x, y, k = global_batch(world, step)
        mine = rows_of(SIZES[world][step], rank)
        window = no_host_reads(seen) if step >= 1 else contextlib.nullcontext()
        try:
            with window, torch.no_grad():
                module(x[mine], y[mine], k[mine])
            eval_outcomes.append(("ok", ""))
        except (ValueError, HostRead) as exc:
            eval_outcomes.append((type(exc).__name__, str(exc)))
    if distributed == "sharded":
        weights, labels, ptr = gather_queue(module.queue)
    else:
        weights, labels, ptr = module.queue.weights, module.queue.labels, module.queue.ptr
    return dict(seen=seen, outcomes=outcomes, eval_outcomes=eval_outcomes, traffic=traffic, weights=weights.clone(),
                labels=labels.clone(),
                ptr=int(ptr), queue_dtype=module.queue.weights.dtype)


def worker_main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}
    for name, (distributed, backend) in MODES.items():
        try:
            results[name] = run_mode(rank, world, distributed, backend)
        except BaseException:  # noqa: BLE001 - reported by the parent
            results[name] = {"__error__": traceback.format_exc()}
            break
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- parent side


_RESULTS: dict[int, list] = {}


def run_world(world: int, tmp: Path) -> list[dict]:
    return run_ranks("test_distributed_host_sync", world, tmp, WORLD_DEADLINE_S)


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def world_results(request, tmp_path_factory):
    world = request.param
    if world not in _RESULTS:
        _RESULTS[world] = run_world(world, tmp_path_factory.mktemp(f"sync{world}"))
    return world, _RESULTS[world]


mode_results = results_of


@pytest.mark.parametrize("name", list(MODES))
def test_steady_state_step_reads_nothing_on_the_host(world_results, name):
    world, per_rank = mode_results(world_results, name)
    for rank, result in enumerate(per_rank):
        assert result["seen"] == [], f"rank {rank}: host reads in a steady-state step:\n" + "\n".join(result["seen"])
        for step, (kind, message) in enumerate(result["outcomes"]):
            if step == BAD_STEP + 1:  # the call after the bad step reports it, on every rank
                assert kind == "ValueError", (rank, step, kind, message)
                assert (f"step {BAD_STEP + 1} on rank {world - 1}" in message
                        and "NaN or infinite values in class_weights" in message), (rank, message)
            else:
                assert (kind, message) == ("ok", ""), (rank, step)
        assert result["eval_outcomes"] == [("ok", "")] * 3, rank


@pytest.mark.parametrize("name", list(MODES))
def test_the_queue_is_what_one_process_makes_of_the_concatenated_batches(world_results, name):
    world, per_rank = mode_results(world_results, name)
    queue = ClassQueue(K, D, dtype=per_rank[0]["queue_dtype"])
    for step in range(len(SIZES[world])):
        if step in (BAD_STEP, BAD_STEP + 1):  # refused; and the reporting call ran no step
            continue
        x, y, k = global_batch(world, step)
        queue.enqueue(k, y)
    for rank, result in enumerate(per_rank):
        assert result["ptr"] == int(queue.ptr.item()), rank
        assert torch.equal(result["labels"], queue.labels), rank
        assert torch.equal(result["weights"], queue.weights), rank


@pytest.mark.parametrize("name", list(MODES))
def test_traffic_counts_the_bytes_of_the_cost_model(world_results, name):
    world, per_rank = mode_results(world_results, name)
    distributed = MODES[name][0]
    header = 15 * 8  # int64 fields
    f32 = 4
    expected = {"all_gather": [3, (world - 1) * (header + CAPACITY * 8 + CAPACITY * D * f32)]}
    if distributed == "sharded":  # + embeddings; the maxima and the merged partials
        expected["all_gather"] = [4, expected["all_gather"][1] + (world - 1) * CAPACITY * D * f32]
        expected["all_reduce"] = [1, 2 * (world - 1) / world * world * CAPACITY * f32]
        expected["reduce_scatter"] = [1, (world - 1) / world * world * CAPACITY * (1 + D) * f32]
    for rank, result in enumerate(per_rank):
        got = result["traffic"]
        assert {kind: [calls, pytest.approx(sent)] for kind, (calls, sent) in got["by_kind"].items()} == expected, rank
        assert got["bytes"] == pytest.approx(sum(sent for _, sent in expected.values()))
