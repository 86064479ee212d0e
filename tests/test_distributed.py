"""DCQLoss on several ranks (dcq_ops/parallel/): gathered queue, sharded queue,
shuffle-BN, bad input on one rank, uneven batch sizes; gloo on CPU.

The multi-process scenarios run once per world size (2 and 3 ranks: uneven shard
sizes) under ``torchrun --standalone`` (gloo on CPU, a free localhost port), bounded
by a deadline after which the processes are killed; the process group has a short
timeout too, so nothing hangs. Each rank runs every scenario and saves what it saw;
the tests below compare that with a single process running the concatenated batch.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dcq_ops
from bounds import assert_grad_close, assert_loss_close, cosine_rounding, positive_slope
from dcq_ops import reference
from error_model import assert_within, compute_dtype, loss_and_grad, reference_pair
from ranks import results_of, run_ranks
from dcq_ops.parallel import DistributedInputError, ShardedClassQueue, reserve_batch_capacity, resolve_mode, shard_range
from dcq_ops.margin import MarginConfig
from dcq_ops.queue import ClassQueue

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

D = 8
K = 23  # 2 ranks: 12 + 11 slots; 3 ranks: 8 + 8 + 7
NUM_CLASSES = 12  # few classes: labels repeat within and across ranks and in the queue
IMAGE_DIM = 6
# Batch sizes per step and rank: uneven, and the queue wraps around within the run.
SIZES = {
    2: [[4, 4], [3, 5], [5, 2], [6, 6], [1, 6]],
    3: [[3, 3, 3], [2, 5, 4], [4, 1, 3], [5, 5, 5], [6, 2, 1]],
}
WORLDS = (2, 3)
# The largest local batch of any step: the ranks' agreed capacity (a batch that outgrows it
# on one rank only is refused: dcq_ops.parallel.strategy; scenario_async_errors tests that).
CAPACITY = {world: max(max(sizes) for sizes in steps) for world, steps in SIZES.items()}
PG_TIMEOUT_S = 45
WORLD_DEADLINE_S = 150

GATHERED_CONFIGS = {  # name: (dtype, backend)
    "fp64-reference": (torch.float64, "reference"),
    "fp32-chunked": (torch.float32, "chunked" if dcq_ops.extension_loaded() else "reference"),
}
COSFACE = MarginConfig(50.0, 1.0, 0.0, 0.3)
SHARDED_CONFIGS = {  # name: (dtype, margin, reduction, fp16 queue)
    "cosface-mean": (torch.float64, COSFACE, "mean", False),
    "arcface-straight-through-filtered-sum": (torch.float64, MarginConfig(64.0, 1.0, 0.5, 0.0, 0.25, True), "sum",
                                              False),
    "combined-none": (torch.float64, MarginConfig(30.0, 1.5, 0.1, 0.05), "none", False),
    "fp32-fp16-queue-mean": (torch.float32, COSFACE, "mean", True),
}


# --------------------------------------------------------------------------- shared data


def global_batch(world: int, step: int, seed: int, dtype=torch.float64):
    """(embeddings, labels, class_weights) of the concatenated batch: rank 0's rows first."""
    sizes = SIZES[world][step]
    g = torch.Generator().manual_seed(1000 * seed + 10 * world + step)
    n = sum(sizes)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    k = 0.7 * x + torch.randn(n, D, generator=g, dtype=torch.float64)
    return x.to(dtype), y, k.to(dtype)


def global_images(world: int, step: int, seed: int):
    """(view A, view B, labels) of the concatenated batch for the DDP scenario."""
    sizes = SIZES[world][step]
    g = torch.Generator().manual_seed(5000 + 1000 * seed + 10 * world + step)
    n = sum(sizes)
    a = torch.randn(n, IMAGE_DIM, generator=g, dtype=torch.float64)
    b = a + 0.3 * torch.randn(n, IMAGE_DIM, generator=g, dtype=torch.float64)
    return a, b, torch.randint(0, NUM_CLASSES, (n,), generator=g)


def rows_of(sizes, rank) -> slice:
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def make_nets():
    torch.manual_seed(5)
    backbone = torch.nn.Linear(IMAGE_DIM, D, dtype=torch.float64)
    generator = torch.nn.Linear(IMAGE_DIM, D, dtype=torch.float64).requires_grad_(False)
    return backbone, generator


def make_bn_net():
    torch.manual_seed(7)
    return torch.nn.Sequential(torch.nn.Linear(5, 4, dtype=torch.float64),
                               torch.nn.BatchNorm1d(4, dtype=torch.float64)).train()


def shuffle_images(world, seed=3):
    g = torch.Generator().manual_seed(seed + world)
    sizes = SIZES[world][1]
    return torch.randn(sum(sizes), 5, generator=g, dtype=torch.float64), sizes


# --------------------------------------------------------------------------- worker side


def _queue_state(queue):
    return dict(weights=queue.weights.clone(), labels=queue.labels.clone(), ptr=int(queue.ptr.item()))


def scenario_gathered(rank, world):
    out = {}
    for name, (dtype, backend) in GATHERED_CONFIGS.items():
        module = dcq_ops.DCQLoss(COSFACE, D, queue_size=K, backend=backend, distributed="gathered")
        reserve_batch_capacity(module, CAPACITY[world])
        steps = []
        for step, sizes in enumerate(SIZES[world]):
            x, y, k = global_batch(world, step, seed=1, dtype=dtype)
            mine = rows_of(sizes, rank)
            xe = x[mine].clone().requires_grad_(True)
            loss = module(xe, y[mine], k[mine])
            loss.backward()  # after the in-place enqueue
            steps.append(dict(loss=loss.detach(), grad=xe.grad, queue=_queue_state(module.queue)))
        out[name] = steps
    return out


def scenario_ddp(rank, world):
    from torch.nn.parallel import DistributedDataParallel

    backbone, generator = make_nets()
    model = DistributedDataParallel(backbone)
    module = dcq_ops.DCQLoss(None, D, queue_size=K, backend="reference")  # distributed="auto": gathered
    reserve_batch_capacity(module, CAPACITY[world])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    steps = []
    for step, sizes in enumerate(SIZES[world]):
        a, b, y = global_images(world, step, seed=2)
        mine = rows_of(sizes, rank)
        optimizer.zero_grad()
        loss = module(model(a[mine]), y[mine], generator(b[mine]))
        loss.backward()
        steps.append(dict(loss=loss.detach(), weight_grad=backbone.weight.grad.clone(),
                          bias_grad=backbone.bias.grad.clone()))
        optimizer.step()
    return dict(steps=steps, weight=backbone.weight.detach().clone(), queue=_queue_state(module.queue))


def scenario_sharded(rank, world):
    from dcq_ops.parallel import gather_queue

    out = {}
    for name, (dtype, margin, reduction, fp16) in SHARDED_CONFIGS.items():
        module = dcq_ops.DCQLoss(margin, D, fp16=fp16, queue_size=K, reduction=reduction, distributed="sharded")
        reserve_batch_capacity(module, CAPACITY[world])
        steps = []
        for step, sizes in enumerate(SIZES[world]):
            x, y, k = global_batch(world, step, seed=3, dtype=dtype)
            mine = rows_of(sizes, rank)
            xe = x[mine].clone().requires_grad_(True)
            loss = module(xe, y[mine], k[mine])
            loss.sum().backward()
            weights, labels, ptr = gather_queue(module.queue)
            steps.append(dict(loss=loss.detach(), grad=xe.grad, full_weights=weights, full_labels=labels,
                              ptr=int(ptr.item()), shard=_queue_state(module.queue)))
        # Eval: the loss against the whole queue, nothing enqueued, no gradient.
        module.eval()
        x, y, k = global_batch(world, 2, seed=4, dtype=dtype)
        mine = rows_of(SIZES[world][2], rank)
        with torch.no_grad():
            eval_loss = module(x[mine], y[mine], k[mine])
        out[name] = dict(steps=steps, eval_loss=eval_loss, after_eval=_queue_state(module.queue),
                         slots=(module.queue.start, module.queue.stop))
    return out


def _outcome(fn):
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - recorded and checked by the parent
        return type(exc).__name__, str(exc)
    return "ok", ""


def scenario_errors(rank, world):
    """validate="eager": every bad input raises at once, on every rank (a host read per step)."""
    from dcq_ops.parallel import shuffled_forward

    bad = world - 1
    out = {}
    for mode in ("gathered", "sharded"):
        module = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, backend="reference",
                                 distributed=mode, validate="eager")
        g = torch.Generator().manual_seed(rank)
        n = 3
        x = torch.randn(n, D, generator=g, requires_grad=True)
        k = torch.randn(n, D, generator=g)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)

        def bad_labels():
            yb = y.clone()
            yb[1] = -1
            module(x, yb if rank == bad else y, k)

        def bad_shape():
            if rank == bad:
                module(torch.randn(n, D + 1), y, torch.randn(n, D + 1))
            else:
                module(x, y, k)

        def bad_type():
            module(x, y.tolist() if rank == bad else y, k)

        def label_too_large():
            module(x, torch.full_like(y, NUM_CLASSES) if rank == bad else y, k)

        def nan_embeddings():
            xb = x.detach().clone()
            xb[0, 0] = float("nan")
            module(xb if rank == bad else x, y, k)

        def train_eval_mismatch():
            module.train(rank != 0)
            try:
                module(x, y, k)
            finally:
                module.train()

        def batch_too_large():
            m = K // world + 2
            module(torch.randn(m, D), torch.zeros(m, dtype=torch.long), torch.randn(m, D))

        def valid():
            module(x, y, k).backward()

        def out_of_sync():
            if rank == 0:
                module.queue.enqueue(k[:1], y[:1])  # the (global) pointer moves on rank 0 only
            module(x, y, k)

        cases = {}
        for case in (bad_labels, bad_shape, bad_type, label_too_large, nan_embeddings, train_eval_mismatch,
                     batch_too_large, valid, out_of_sync):
            outcome = _outcome(case)
            cases[case.__name__] = dict(outcome=outcome, queue=_queue_state(module.queue))
        out[mode] = cases

    def shuffle_bad_shape():
        shuffled_forward(torch.nn.Identity(), torch.randn(2, 5 if rank == bad else 4))

    def shuffle_bad_type():
        shuffled_forward(torch.nn.Identity(), [1.0, 2.0] if rank == bad else torch.randn(2, 4))

    out["shuffle"] = {case.__name__: dict(outcome=_outcome(case)) for case in (shuffle_bad_shape, shuffle_bad_type)}
    return out


def scenario_async_errors(rank, world):
    """validate="async" (the default): a bad step on one rank raises nothing at once and enters
    no rank's queue; every rank raises at its next call, naming the rank, the step and the reason."""
    bad = world - 1
    out = {}
    for mode in ("gathered", "sharded"):
        module = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, backend="reference",
                                 distributed=mode)
        g = torch.Generator().manual_seed(rank)
        n = 3
        x = torch.randn(n, D, generator=g, requires_grad=True)
        k = torch.randn(n, D, generator=g)
        y = torch.randint(0, NUM_CLASSES, (n,), generator=g)

        def step(xs, ys, ks):
            module(xs, ys, ks).sum().backward()

        def good():
            step(x, y, k)

        def bad_labels():
            yb = y.clone()
            yb[1] = -1
            step(x, yb if rank == bad else y, k)

        def nan_embeddings():
            xb = x.detach().clone()
            xb[0, 0] = float("nan")
            step(xb.requires_grad_(True) if rank == bad else x, y, k)

        def bad_shape():
            if rank == bad:
                step(torch.randn(n, D + 1, requires_grad=True), y, torch.randn(n, D + 1))
            else:
                good()

        def grows_alone():  # beyond the capacity agreed at step 1 (3 rows), on one rank only
            m = n + 2 if rank == bad else n
            step(torch.randn(m, D, requires_grad=True), torch.randint(0, NUM_CLASSES, (m,)), torch.randn(m, D))

        def train_eval_mismatch():
            module.train(rank != 0)
            try:
                good()
            finally:
                module.train()

        def out_of_sync():
            good()

        def move_rank_0():
            if rank == 0:
                module.queue.enqueue(k[:1], y[:1])  # the (global) pointer moves on rank 0 only

        out_of_sync.setup = move_rank_0
        good()  # step 1: the ranks agree (the one host read)
        cases = {}
        for case in (bad_labels, nan_embeddings, bad_shape, grows_alone, train_eval_mismatch, out_of_sync):
            getattr(case, "setup", lambda: None)()
            number = int(module.guard.calls) + 1
            before = _queue_state(module.queue)
            outcome = _outcome(case)
            after = _queue_state(module.queue)
            report = _outcome(good)  # the next call: every rank raises, and does nothing else
            after_report = _queue_state(module.queue)
            if case is out_of_sync:
                module.queue.reset()  # the pointers stay apart until the queues are made equal again
            cases[case.__name__] = dict(step=number, outcome=outcome, report=report, before=before, after=after,
                                        after_report=after_report, again=_outcome(good))
        ptr = int(module.queue.ptr)
        cases["all_grow"] = dict(  # every rank's batch grows at once: they agree on a new capacity
            outcome=_outcome(lambda: step(torch.randn(5, D, requires_grad=True), torch.randint(0, NUM_CLASSES, (5,)),
                                          torch.randn(5, D))), moved=(int(module.queue.ptr) - ptr) % K)
        m = K // world + 2
        cases["batch_too_large"] = dict(outcome=_outcome(
            lambda: step(torch.randn(m, D), torch.zeros(m, dtype=torch.long), torch.randn(m, D))))
        cases["valid"] = dict(outcome=_outcome(good))
        out[mode] = cases
    return out


def scenario_shuffle(rank, world):
    from dcq_ops.parallel import shuffled_forward

    images, sizes = shuffle_images(world)
    mine = images[rows_of(sizes, rank)]
    net = make_bn_net()
    generator = torch.Generator().manual_seed(11)
    shuffled = shuffled_forward(net, mine, generator=generator)
    linear = torch.nn.Linear(5, 3, dtype=torch.float64)
    per_sample = shuffled_forward(linear, mine)
    return dict(shuffled=shuffled, unshuffled=net(mine).detach(), per_sample=per_sample,
                per_sample_expected=linear(mine).detach())


SCENARIOS = (scenario_gathered, scenario_ddp, scenario_sharded, scenario_errors, scenario_async_errors,
             scenario_shuffle)


def worker_main(out_dir: str) -> None:
    """Entry point of one rank, started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}
    for scenario in SCENARIOS:
        (out / f"progress{rank}.txt").write_text(scenario.__name__)
        torch.manual_seed(0)
        try:
            results[scenario.__name__] = scenario(rank, world)
        except Exception:  # noqa: BLE001 - reported by the parent's test of that scenario
            results[scenario.__name__] = {"__error__": traceback.format_exc()}
            break  # the ranks may be out of step now: stop rather than risk a hang
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- parent side


_RESULTS: dict[int, list] = {}


def run_world(world: int, tmp: Path) -> list[dict]:
    """Run every scenario on `world` ranks under torchrun (gloo, a free localhost port)."""
    return run_ranks("test_distributed", world, tmp, WORLD_DEADLINE_S)


@pytest.fixture(scope="module", params=WORLDS, ids=[f"world{w}" for w in WORLDS])
def world_results(request, tmp_path_factory):
    world = request.param
    if world not in _RESULTS:
        _RESULTS[world] = run_world(world, tmp_path_factory.mktemp(f"world{world}"))
    return world, _RESULTS[world]


scenario_results = results_of


def check_against_reference(got_loss, got_grad, x, k, y, queue_weights, queue_labels, margin, reduction,
                            grad_factor, what):
    """A multi-rank loss (already reduced as the test needs) and gradient (or None)
    against the reference on the concatenated batch and the queue before the step:
    within the error model (tests/error_model.py) for fp32/fp64 GEMM operands, within
    the rounding bounds (tests/bounds.py) for a 16-bit queue."""
    inputs = (x.detach(), k, y, queue_weights, queue_labels)
    margin = margin.kwargs()
    if queue_weights.dtype in (torch.float16, torch.bfloat16):
        exact_loss, exact_grad = loss_and_grad(reference.dcq_cross_entropy, inputs, margin, dtype=torch.float64,
                                               reduction=reduction)
        delta = cosine_rounding(x, queue_weights, queue_weights.dtype)
        scale = margin["scale"]
        rows = x.shape[0]
        if reduction == "none":
            assert_loss_close(got_loss, exact_loss, scale=scale, delta=delta, what=f"{what} loss")
        else:
            per_row = 1.0 if reduction == "sum" else 1.0 / rows
            bound = 1.01 * scale * delta.sum() * per_row + 2e-4 * exact_loss.abs()
            assert (got_loss.double() - exact_loss).abs() <= bound, (what, got_loss, exact_loss, bound)
        if got_grad is None:
            return
        weights = torch.full((rows,), 1.0 if reduction != "mean" else 1.0 / rows, dtype=torch.float64)
        slope = positive_slope(x, k, margin["m1"], margin["m2"], scale, margin["straight_through_margin"])
        assert_grad_close(got_grad, exact_grad * grad_factor, embeddings=x, scale=scale, delta=delta, slope=slope,
                          gemm_dtype=queue_weights.dtype, row_weights=weights * grad_factor, what=f"{what} gradient")
        return
    (low_loss, low_grad), (exact_loss, exact_grad) = reference_pair(inputs, margin, reduction=reduction)
    dtype = compute_dtype(inputs)
    assert_within(got_loss, exact_loss, low_loss, dtype=dtype, what=f"{what} loss")
    if got_grad is not None:
        assert_within(got_grad, exact_grad * grad_factor, low_grad * grad_factor, dtype=dtype, what=f"{what} gradient")


def assert_same_queue(state, queue, where):
    assert state["ptr"] == int(queue.ptr.item()), where
    assert torch.equal(state["labels"], queue.labels), where
    assert torch.equal(state["weights"], queue.weights), where


def _reduced_grads(world, sizes, rank, single_grad, reduction):
    """What rank's embeddings.grad must be, given the single-process gradient."""
    g = single_grad[rows_of(sizes, rank)]
    return g * world if reduction == "mean" else g


# --------------------------------------------------------------------------- tests: gathered


@pytest.mark.parametrize("config", list(GATHERED_CONFIGS))
def test_gathered_equals_single_process_on_concatenated_batch(world_results, config):
    world, per_rank = scenario_results(world_results, "scenario_gathered")
    dtype, backend = GATHERED_CONFIGS[config]
    queue = ClassQueue(K, D, dtype=torch.float32)  # the single process's queue
    for step, sizes in enumerate(SIZES[world]):
        x, y, k = global_batch(world, step, seed=1, dtype=dtype)
        where = f"{config}, step {step}, sizes {sizes}"
        before_w, before_l = queue.weights.clone(), queue.labels.clone()
        queue.enqueue(k, y)
        for rank, result in enumerate(per_rank):
            assert_same_queue(result[config][step]["queue"], queue, f"queue of rank {rank}, {where}")
        # Each rank returns sum(its rows) * W / N_total (the local mean for equal sizes), so that
        # the mean over ranks is the single-process mean and DDP's averaging its gradient.
        loss = torch.stack([r[config][step]["loss"] for r in per_rank]).mean()
        grad = torch.cat([r[config][step]["grad"] for r in per_rank]) / world
        check_against_reference(loss, grad, x, k, y, before_w, before_l, COSFACE, "mean", 1.0, where)
        for rank, result in enumerate(per_rank):
            mine = rows_of(sizes, rank)
            (low, _), (exact, _) = reference_pair((x[mine], k[mine], y[mine], before_w, before_l), COSFACE.kwargs(),
                                                  reduction="sum")
            factor = world / sum(sizes)
            assert_within(result[config][step]["loss"], exact * factor, low * factor, dtype=compute_dtype((x, k)),
                          what=f"loss of rank {rank}, {where}")
        if step == 0:
            assert loss.item() == 0.0  # empty queue: no negatives yet
        else:
            assert loss.item() > 0.0


def test_gathered_with_ddp_gives_the_single_process_gradient(world_results):
    world, per_rank = scenario_results(world_results, "scenario_ddp")
    backbone, generator = make_nets()
    single = dcq_ops.DCQLoss(None, D, queue_size=K, backend="reference", distributed="none")
    optimizer = torch.optim.SGD(backbone.parameters(), lr=0.5)
    for step, sizes in enumerate(SIZES[world]):
        a, b, y = global_images(world, step, seed=2)
        optimizer.zero_grad()
        loss = single(backbone(a), y, generator(b))
        loss.backward()
        for rank, result in enumerate(per_rank):
            got = result["steps"][step]
            # float64 throughout: the error model's float64 promise (1e-7 relative), no measured term.
            for name in ("weight_grad", "bias_grad"):
                exact = getattr(backbone, name[:-5]).grad
                assert_within(got[name], exact, exact, dtype=torch.float64, what=f"{name}, rank {rank}, step {step}")
        mean_over_ranks = torch.stack([r["steps"][step]["loss"] for r in per_rank]).mean()
        assert_within(mean_over_ranks, loss.detach(), loss.detach(), dtype=torch.float64, what=f"loss, step {step}")
        optimizer.step()
    for rank, result in enumerate(per_rank):
        assert_within(result["weight"], backbone.weight.detach(), backbone.weight.detach(), dtype=torch.float64,
                      what=f"weights of rank {rank}")
        assert_same_queue(result["queue"], single.queue, f"rank {rank}")


# --------------------------------------------------------------------------- tests: sharded


@pytest.mark.parametrize("config", list(SHARDED_CONFIGS))
def test_sharded_equals_unsharded_loss_gradient_and_queue(world_results, config):
    world, per_rank = scenario_results(world_results, "scenario_sharded")
    dtype, margin, reduction, fp16 = SHARDED_CONFIGS[config]
    queue = ClassQueue(K, D, dtype=torch.float16 if fp16 else torch.float32)
    for rank, result in enumerate(per_rank):
        assert result[config]["slots"] == shard_range(K, world, rank)
    for step, sizes in enumerate(SIZES[world]):
        x, y, k = global_batch(world, step, seed=3, dtype=dtype)
        before_w, before_l = queue.weights.clone(), queue.labels.clone()
        queue.enqueue(k, y)
        where = f"{config}, step {step}, sizes {sizes}"
        for rank, result in enumerate(per_rank):
            got = result[config]["steps"][step]
            start, stop = shard_range(K, world, rank)
            assert got["ptr"] == int(queue.ptr.item()), where
            assert torch.equal(got["full_labels"], queue.labels), where
            assert torch.equal(got["full_weights"], queue.weights), where  # the union of the shards
            assert torch.equal(got["shard"]["weights"], queue.weights[start:stop]), where
            assert torch.equal(got["shard"]["labels"], queue.labels[start:stop]), where
            assert got["shard"]["ptr"] == int(queue.ptr.item()), where  # the global pointer on every rank
        losses = [r[config]["steps"][step]["loss"] for r in per_rank]
        loss = {"none": lambda: torch.cat(losses), "sum": lambda: torch.stack(losses).sum(),
                "mean": lambda: torch.stack(losses).mean()}[reduction]()
        grad = torch.cat([r[config]["steps"][step]["grad"] for r in per_rank])
        factor = world if reduction == "mean" else 1.0  # as DDP expects (see the gathered test)
        check_against_reference(loss, grad, x, k, y, before_w, before_l, margin, reduction, factor, where)
        if step > 0:
            assert loss.sum() > 0
    # Eval mode: the loss against every shard, nothing enqueued.
    x, y, k = global_batch(world, 2, seed=4, dtype=dtype)
    losses = [r[config]["eval_loss"] for r in per_rank]
    loss = {"none": lambda: torch.cat(losses), "sum": lambda: torch.stack(losses).sum(),
            "mean": lambda: torch.stack(losses).mean()}[reduction]()
    check_against_reference(loss, None, x, k, y, queue.weights, queue.labels, margin, reduction, 1.0,
                            f"{config}, eval")
    for rank, result in enumerate(per_rank):
        start, stop = shard_range(K, world, rank)
        assert torch.equal(result[config]["after_eval"]["labels"], queue.labels[start:stop])
        assert result[config]["after_eval"]["ptr"] == int(queue.ptr.item())


# --------------------------------------------------------------------------- tests: bad input


BAD_INPUT_CASES = {  # case: (exception on the bad rank, words in its message)
    "bad_labels": ("ValueError", "labels must be >= 0"),
    "bad_shape": ("ValueError", "embeddings must be [N, 8] (DCQLoss's embedding_size), got shape (3, 9)"),
    "bad_type": ("TypeError", "labels must be a tensor"),
    "label_too_large": ("ValueError", f"labels must be < num_classes = {NUM_CLASSES}"),
    "nan_embeddings": ("ValueError", "embeddings must be finite"),
}
DISAGREEMENT_CASES = {  # case: words in the ValueError every rank raises
    "train_eval_mismatch": "same training mode",
    "batch_too_large": "must fit the queue of 23 slots",
    "out_of_sync": "queues are out of sync",
}


@pytest.mark.parametrize("mode", ["gathered", "sharded"])
def test_bad_input_on_one_rank_raises_on_every_rank_and_leaves_queues_alone(world_results, mode):
    world, per_rank = scenario_results(world_results, "scenario_errors")
    bad = world - 1
    for case, (error, words) in BAD_INPUT_CASES.items():
        for rank, result in enumerate(per_rank):
            kind, message = result[mode][case]["outcome"]
            if rank == bad:
                assert (kind, words in message) == (error, True), (case, rank, kind, message)
            else:  # the peers learn what happened on the bad rank instead of blocking in a collective
                assert kind == "DistributedInputError", (case, rank, kind, message)
                assert f"rank(s) [{bad}]" in message and words in message, (case, rank, message)
            queue = result[mode][case]["queue"]
            assert queue["ptr"] == 0 and bool((queue["labels"] == -1).all()), (case, rank)
    for case, words in DISAGREEMENT_CASES.items():
        for rank, result in enumerate(per_rank):
            kind, message = result[mode][case]["outcome"]
            assert kind == "ValueError" and words in message, (case, rank, kind, message)
    # A valid step after all those errors: the ranks are still in step.
    for rank, result in enumerate(per_rank):
        assert result[mode]["valid"]["outcome"] == ("ok", ""), rank
        queue = result[mode]["valid"]["queue"]
        assert queue["ptr"] == 3 * world
        # The global slots 0 .. 3W-1 are filled: all of them on a gathered rank, its own on a sharded one.
        start, stop = (0, K) if mode == "gathered" else shard_range(K, world, rank)
        filled = [slot for slot in range(start, stop) if slot < 3 * world]
        assert (queue["labels"] >= 0).nonzero().view(-1).add(start).tolist() == filled, rank
    assert issubclass(DistributedInputError, ValueError)


ASYNC_CASES = {  # case: (the bad rank (None: world - 1), words every report has, words of the bad rank's own report)
    "bad_labels": (None, "a label < 0", None),
    "nan_embeddings": (None, "NaN or infinite values in embeddings", None),
    "bad_shape": (None, "an input that rank refused", "embeddings must be [N, 8] (DCQLoss's embedding_size)"),
    "grows_alone": (None, "no longer matched what the ranks had agreed",
                    "its batch of 5 rows exceeds the capacity of 3 rows per rank"),
    "train_eval_mismatch": (0, "no longer matched what the ranks had agreed",
                            "its training is eval where the ranks agreed on train"),
    "out_of_sync": (1, "queue pointer different from rank 0's", None),
}


@pytest.mark.parametrize("mode", ["gathered", "sharded"])
def test_async_bad_step_enters_no_queue_and_every_rank_raises_at_the_next_call(world_results, mode):
    world, per_rank = scenario_results(world_results, "scenario_async_errors")
    for case, (bad, words, own_words) in ASYNC_CASES.items():
        bad = world - 1 if bad is None else bad
        steps = {result[mode][case]["step"] for result in per_rank}
        assert len(steps) == 1, (case, steps)  # the ranks count the same steps
        number = steps.pop()
        for rank, result in enumerate(per_rank):
            got = result[mode][case]
            assert got["outcome"] == ("ok", ""), (case, rank, got["outcome"])  # nothing raised at once
            kind, message = got["report"]
            assert kind == "ValueError", (case, rank, kind, message)
            assert f"step {number} on rank {bad}" in message and words in message, (case, rank, message)
            assert "not enqueued into any rank's queue" in message, (case, rank, message)
            if own_words is not None:
                assert (own_words in message) == (rank == bad), (case, rank, message)
            for name in ("after", "after_report"):  # neither the bad step nor the report changed a queue
                assert_same_state(got[name], got["before"], f"{case}, rank {rank}, {name}")
            assert got["again"] == ("ok", ""), (case, rank, got["again"])  # reported once; in step again
    for rank, result in enumerate(per_rank):
        assert result[mode]["all_grow"] == dict(outcome=("ok", ""), moved=5 * world), rank
        kind, message = result[mode]["batch_too_large"]["outcome"]
        assert kind == "ValueError" and "must fit the queue of 23 slots" in message, (rank, message)
        assert result[mode]["valid"]["outcome"] == ("ok", ""), rank


def assert_same_state(got, expected, where):
    assert got["ptr"] == expected["ptr"], where
    assert torch.equal(got["labels"], expected["labels"]), where
    assert torch.equal(got["weights"], expected["weights"]), where


def test_shuffled_forward_bad_input_raises_on_every_rank(world_results):
    world, per_rank = scenario_results(world_results, "scenario_errors")
    bad = world - 1
    for rank, result in enumerate(per_rank):
        kind, message = result["shuffle"]["shuffle_bad_shape"]["outcome"]
        assert kind == "ValueError" and "same shape after the batch dimension" in message, (rank, message)
        kind, message = result["shuffle"]["shuffle_bad_type"]["outcome"]
        expected = "TypeError" if rank == bad else "DistributedInputError"
        assert kind == expected and "images must be a torch.Tensor" in message, (rank, kind, message)


# --------------------------------------------------------------------------- tests: shuffle-BN


def test_shuffled_forward_matches_moco_batch_shuffle(world_results):
    world, per_rank = scenario_results(world_results, "scenario_shuffle")
    images, sizes = shuffle_images(world)
    net = make_bn_net()
    permutation = torch.randperm(sum(sizes), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        chunks = [net(images[permutation[rows_of(sizes, r)]]) for r in range(world)]
    expected = torch.empty(sum(sizes), 4, dtype=torch.float64)
    expected[permutation] = torch.cat(chunks)  # un-shuffle
    for rank, result in enumerate(per_rank):
        mine = rows_of(sizes, rank)
        torch.testing.assert_close(result["shuffled"], expected[mine], rtol=1e-12, atol=1e-12)
        # BatchNorm saw a different mix of samples than this rank's own batch.
        assert not torch.allclose(result["shuffled"], result["unshuffled"])
        torch.testing.assert_close(result["per_sample"], result["per_sample_expected"], rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- single-process tests


def test_shard_range_splits_the_queue_in_contiguous_blocks():
    for size in (3, 7, 23, 100, 101):
        for world in range(1, 4):
            if size < world:
                continue
            blocks = [shard_range(size, world, r) for r in range(world)]
            assert blocks[0][0] == 0 and blocks[-1][1] == size
            assert all(blocks[r][1] == blocks[r + 1][0] for r in range(world - 1))
            lengths = [b - a for a, b in blocks]
            assert max(lengths) - min(lengths) <= 1 and lengths == sorted(lengths, reverse=True)
    with pytest.raises(ValueError, match="queue_size must be >= world_size = 3, got 2"):
        shard_range(2, 3, 0)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 3\), got 3"):
        shard_range(10, 3, 3)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_sharded_queue_blocks_follow_the_unsharded_fifo(world):
    size, dim = 13, 5
    full = ClassQueue(size, dim)
    shards = [ShardedClassQueue(size, dim, world_size=world, rank=r) for r in range(world)]
    g = torch.Generator().manual_seed(world)
    for batch in (1, 5, 13, 7, 12, 2, 13, 6, 9, 4, 1, 11):  # every wrap-around position, full-queue batches
        keys, labels = torch.randn(batch, dim, generator=g), torch.randint(0, 50, (batch,), generator=g)
        head = int(full.ptr.item())
        full.enqueue(keys, labels)
        for i, shard in enumerate(shards):
            shard.enqueue(keys, labels, ptr=head if i % 2 == 0 else None)  # known on the host, or read
        assert torch.equal(torch.cat([s.weights for s in shards]), full.weights)
        assert torch.equal(torch.cat([s.labels for s in shards]), full.labels)
        assert all(int(s.ptr.item()) == int(full.ptr.item()) for s in shards)
    with pytest.raises(ValueError, match="between 1 and the global queue size 13, got 14"):
        shards[0].enqueue(torch.randn(14, dim), torch.zeros(14, dtype=torch.long))


def test_sharded_queue_load_global_and_state_dict():
    full_w, full_l = F.normalize(torch.randn(10, 4), dim=1), torch.arange(10)
    shard = ShardedClassQueue(10, 4, world_size=3, rank=1)
    shard.load_global_(full_w, full_l, 7)
    assert (shard.start, shard.stop) == (4, 7)
    assert torch.equal(shard.weights, full_w[4:7]) and shard.labels.tolist() == [4, 5, 6] and int(shard.ptr) == 7
    other = ShardedClassQueue(10, 4, world_size=3, rank=1)
    other.load_state_dict(shard.state_dict())
    assert torch.equal(other.weights, shard.weights) and int(other.ptr) == 7
    with pytest.raises(ValueError, match=r"weights must be \[10, 4\] \(the global queue\), got \(9, 4\)"):
        shard.load_global_(full_w[:9], full_l[:9], 0)


def test_modes_without_a_process_group():
    assert resolve_mode("auto") == "none" and resolve_mode("none") == "none"
    with pytest.raises(ValueError, match="distributed='gathered' needs an initialised"):
        resolve_mode("gathered")
    with pytest.raises(ValueError, match="distributed must be one of"):
        dcq_ops.DCQLoss(None, 4, queue_size=8, distributed="ring")
    with pytest.raises(ValueError, match="distributed='sharded' needs an initialised"):
        dcq_ops.DCQLoss(None, 4, queue_size=8, distributed="sharded")
    module = dcq_ops.DCQLoss(None, 4, queue_size=8, distributed="gathered")  # the group may come later
    with pytest.raises(ValueError, match="needs an initialised torch.distributed process group"):
        module(torch.randn(2, 4), torch.tensor([0, 1]), torch.randn(2, 4))
    assert int(module.queue.ptr) == 0
    from dcq_ops.parallel import shuffled_forward

    net = torch.nn.Linear(4, 3)
    x = torch.randn(5, 4)
    torch.testing.assert_close(shuffled_forward(net, x), net(x))
