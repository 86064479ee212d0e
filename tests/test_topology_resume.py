"""Checkpoints that do not depend on the topology (docs/distributed.md, "Checkpoints").

dcq-train's Trainer on gloo ranks (CPU) under ``torchrun --standalone``: a run on 2
ranks, in the gathered and in the sharded mode, checkpointed at step 5, resumes

- on the same 2 ranks in the same mode: bit for bit the uninterrupted run (shuffle-BN
  on: the permutation comes from (seed, step); every rank's RNG states and weight
  generator statistics come back);
- on 1, 2 and 3 ranks, gathered <-> sharded: each rank's queue (its block, when
  sharded), the pointer, the weight generator and the backbone are exactly those
  saved, and training goes on from there.

Plus the library's side without a trainer: DCQLoss.global_state_dict in every mode,
loaded in every mode at every world size, and the refusals of a block that is not
this rank's. Each world size runs once per module under torchrun, bounded by a
deadline after which its processes are killed.
"""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import dcq_ops
from dcq_ops.parallel import (ShardedClassQueue, assemble_queue_state, block_state, is_block_state, shard_range,
                              shuffle_permutation, shuffle_seed)
from dcq_ops.training import TrainConfig, Trainer, train
from dcq_ops.training.checkpoint import resumed_step
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

# Tiny runs (as tests/test_checkpoints.py's): a few seconds each on 2 CPU cores.
QUEUE = 64  # 2 ranks: 32 + 32 slots, 3 ranks: 22 + 21 + 21; the global batch of 2 ranks wraps it every 2 steps
TINY = dict(synthetic_identities=120, synthetic_eval_identities=40, image_size=16, width=4, embedding_size=32,
            batch_size=16, queue_size=QUEUE, log_every=1, eval_pairs=100, progress="none", threads=1, steps=8,
            save_every=5, dropout=0.1)
SAVED_AT = 5
EPOCHS = dict(steps=None, epochs=1.5, warmup_epochs=0.5, save_every=SAVED_AT)  # a run of --epochs
PG_TIMEOUT_S = 60
WORLD_DEADLINE_S = 240
# The library scenario's queue: 23 slots, uneven blocks on 2 and 3 ranks.
K, D, NUM_CLASSES = 23, 6, 40


def config(mode: str, output: Path, **changes) -> TrainConfig:
    return TrainConfig(**{**TINY, "queue_mode": mode, "output": str(output), **changes})


def checkpoint(out: Path, mode: str) -> Path:
    """The step-5 checkpoint of the 2-rank run in ``mode``."""
    return out / f"{mode}-part" / f"checkpoint_{SAVED_AT:07d}.pt"


def library_state(mode_seed: int = 0) -> dict:
    """A trained single-process queue state in the global form (wrapped around)."""
    module = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, distributed="none")
    g = torch.Generator().manual_seed(100 + mode_seed)
    for rows in (7, 9, 5, 8, 6):
        module(torch.randn(rows, D, generator=g), torch.randint(0, NUM_CLASSES, (rows,), generator=g),
               torch.randn(rows, D, generator=g))
    return module.global_state_dict()


# --------------------------------------------------------------------------- worker side


def _live(trainer: Trainer) -> dict:
    """What a resumed trainer holds now, on this rank."""
    queue = trainer.head.loss.queue
    return {"rank": trainer.rank, "world": trainer.world_size, "mode": trainer.queue_mode, "step": trainer.step,
            "sharded": isinstance(queue, ShardedClassQueue),
            "start": getattr(queue, "start", 0), "stop": getattr(queue, "stop", queue.queue_size),
            "weights": queue.weights.detach().clone(), "labels": queue.labels.clone(), "ptr": int(queue.ptr),
            "generator": {k: v.clone() for k, v in trainer.generator.state_dict().items()},
            "backbone": {k: v.clone() for k, v in trainer.backbone.state_dict().items()},
            "lr": trainer.optimizer.param_groups[0]["lr"]}


def resume_and_continue(out: Path, source_mode: str, mode: str, world: int) -> dict:
    """Resume the 2-rank checkpoint of ``source_mode`` in ``mode`` on this world; what the
    ranks hold just after loading, and the losses of the steps that follow."""
    name = f"{source_mode}-to-{mode}-world{world}"
    trainer = Trainer(config(mode, out / name))
    messages = trainer.resume(str(checkpoint(out, source_mode)))
    live = _live(trainer)
    result = trainer.fit()  # config.resume is None: goes on from the loaded step
    return {"live": live, "messages": messages, "steps": result["steps"],
            "losses": [r["loss"] for r in result["history"]]}


def library_scenario(rank: int, world: int) -> dict:
    """DCQLoss alone: the global form of every mode, loaded in every mode."""
    state = library_state()
    out = {}
    for mode in ("gathered", "sharded"):
        module = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, distributed=mode)
        module.load_state_dict(state)
        own = module.state_dict()
        every = module.global_state_dict()            # every rank gets it
        only0 = module.global_state_dict(dst=0)       # rank 0 only
        out[mode] = {"own": {k: v.clone() for k, v in own.items()}, "global": every, "dst0": only0}
    # A sharded module's block loaded by a module of the same rank and world: as before.
    sharded = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, distributed="sharded")
    sharded.load_state_dict(state)
    again = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K, distributed="sharded")
    again.load_state_dict(sharded.state_dict())
    out["block_round_trip"] = torch.equal(again.queue.weights, sharded.queue.weights) and int(again.queue.ptr) == int(
        sharded.queue.ptr)
    # shuffle-BN from (seed, step): the same permutation whatever the global random state.
    images = torch.randn(3 + rank, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
    torch.manual_seed(1234 + rank)  # a different global state on every rank: must not matter
    out["shuffled"] = dcq_ops.shuffled_forward(centre, images, seed=7, step=3)
    out["images"] = images
    try:
        dcq_ops.shuffled_forward(torch.nn.Identity(), images, seed=7, step=3 + rank)
        out["step_mismatch"] = "no error"
    except ValueError as exc:
        out["step_mismatch"] = str(exc)
    return out


def centre(images: torch.Tensor) -> torch.Tensor:
    """BatchNorm's centring: its output depends on which images share the chunk."""
    return images - images.mean(dim=0, keepdim=True)


def worker_main(out_dir: str) -> None:
    """One rank, started by torchrun (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment)."""
    torch.set_num_threads(1)
    out = Path(out_dir)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    results = {}
    try:
        results["library"] = library_scenario(rank, world)
        if world == 2:
            for mode in ("gathered", "sharded"):
                (out / f"progress{rank}.txt").write_text(mode)
                full = train(config(mode, out / f"{mode}-full"))
                part = train(config(mode, out / f"{mode}-part", stop_after=SAVED_AT))
                resumed = train(config(mode, out / f"{mode}-part", resume=str(checkpoint(out, mode))))
                results[mode] = {key: {"steps": r["steps"], "history": [(h["step"], h["loss"]) for h in r["history"]],
                                       "final_eval": r["final_eval"]}
                                 for key, r in (("full", full), ("part", part), ("resumed", resumed))}
        pairs = {2: [("gathered", "sharded"), ("sharded", "gathered")],
                 3: [("gathered", "sharded"), ("sharded", "gathered"), ("sharded", "sharded")]}.get(world, [])
        for source_mode, mode in pairs:
            (out / f"progress{rank}.txt").write_text(f"{source_mode}->{mode}")
            results[f"{source_mode}->{mode}"] = resume_and_continue(out, source_mode, mode, world)
        if world == 3:  # a one-process run of --epochs, resumed on 3 sharded ranks: other steps per epoch
            (out / f"progress{rank}.txt").write_text("epochs")
            trainer = Trainer(config("sharded", out / "epochs-on-3", **EPOCHS))
            messages = trainer.resume(str(out / "epochs-one" / f"checkpoint_{SAVED_AT:07d}.pt"))
            live = _live(trainer)
            expected_lr = trainer.config.lr * trainer.scheduler.lr_lambdas[0](trainer.step)
            result = trainer.fit()
            results["epochs"] = {"live": live, "messages": messages, "expected_lr": expected_lr,
                                 "total_steps": trainer.total_steps, "steps": result["steps"]}
    except Exception:  # noqa: BLE001 - reported by the parent
        results["__error__"] = traceback.format_exc()
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------- parent side


def run_world(world: int, tmp: Path) -> list[dict]:
    results = run_ranks("test_topology_resume", world, tmp, WORLD_DEADLINE_S)
    for r, result in enumerate(results):
        if "__error__" in result:
            pytest.fail(f"rank {r} of {world}: {result['__error__']}")
    return results


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{world: per-rank results}; the 2-rank run first (it writes the checkpoints), then 3."""
    tmp = tmp_path_factory.mktemp("topology")
    two = run_world(2, tmp)
    train(config("auto", tmp / "epochs-one", stop_after=SAVED_AT, **EPOCHS))  # one process, for the 3 ranks
    return tmp, {2: two, 3: run_world(3, tmp)}


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"


# --------------------------------------------------------------------------- same world: bit for bit


@pytest.mark.parametrize("mode", ["gathered", "sharded"])
def test_same_world_resume_is_bit_exact_with_shuffle_bn(runs, mode):
    tmp, results = runs
    r = results[2][0][mode]
    assert r["part"]["steps"] == SAVED_AT and r["resumed"]["steps"] == TINY["steps"]
    full_losses = [loss for step, loss in r["full"]["history"] if step > SAVED_AT]
    resumed_losses = [loss for step, loss in r["resumed"]["history"]]
    assert len(full_losses) == TINY["steps"] - SAVED_AT
    assert full_losses == resumed_losses, "rank 0's losses after the resume differ from the uninterrupted run"
    assert r["full"]["final_eval"] == r["resumed"]["final_eval"]
    a, b = load(tmp / f"{mode}-full" / "checkpoint.pt"), load(tmp / f"{mode}-part" / "checkpoint.pt")
    assert a["world_size"] == b["world_size"] == 2 and a["queue_mode"] == b["queue_mode"] == mode
    for part in ("backbone", "head", "generator"):
        assert_same_tensors(a[part], b[part], part)
    assert (a["head"]["loss.queue.labels"] >= 0).all(), "the queue was filled"
    assert a["head"]["loss.queue.weights"].shape[0] == QUEUE, "one global queue in the file, in either mode"
    assert "loss.queue.shard" not in a["head"]
    for rank in range(2):  # every rank's own streams and generator statistics
        assert torch.equal(a["rng"][rank]["torch"], b["rng"][rank]["torch"]), f"rank {rank}'s torch RNG"
        assert_same_tensors(a["generator_buffers"][rank], b["generator_buffers"][rank], f"rank {rank} buffers")
    assert not torch.equal(a["rng"][0]["torch"], a["rng"][1]["torch"]), "the ranks have streams of their own"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert a["scheduler"] == b["scheduler"]


def test_gathered_and_sharded_runs_save_the_same_queue(runs):
    """The mode does not change what is computed: both 2-rank runs' step-5 files hold the
    same global queue and pointer (the sharded run gathered its blocks at the save)."""
    tmp, _ = runs
    g, s = load(checkpoint(tmp, "gathered")), load(checkpoint(tmp, "sharded"))
    for key in ("loss.queue.weights", "loss.queue.labels", "loss.queue.ptr"):
        torch.testing.assert_close(g["head"][key], s["head"][key], rtol=1e-5, atol=1e-6)
    assert int(g["head"]["loss.queue.ptr"]) == (SAVED_AT * 2 * TINY["batch_size"]) % QUEUE


# --------------------------------------------------------------------------- other world sizes and modes


def check_resumed(live: dict, saved: dict, world: int, where: str) -> None:
    """A rank's queue (its block when sharded), pointer, generator and backbone are those saved."""
    head = saved["head"]
    start, stop = live["start"], live["stop"]
    if live["sharded"]:
        assert (start, stop) == shard_range(QUEUE, world, live["rank"]), where
    else:
        assert (start, stop) == (0, QUEUE), where
    assert torch.equal(live["weights"], head["loss.queue.weights"][start:stop]), f"{where}: queue weights"
    assert torch.equal(live["labels"], head["loss.queue.labels"][start:stop]), f"{where}: queue labels"
    assert live["ptr"] == int(head["loss.queue.ptr"]), f"{where}: pointer"
    assert_same_tensors(live["backbone"], saved["backbone"], f"{where}: backbone")
    buffers = saved["generator_buffers"]
    expected = dict(saved["generator"])
    if world == saved["world_size"]:  # each rank its own statistics
        expected.update(buffers[live["rank"]])
    assert_same_tensors(live["generator"], expected, f"{where}: weight generator")
    assert live["step"] == SAVED_AT  # --steps: the same number of steps on any world size


@pytest.mark.parametrize("world,source,mode", [
    (2, "gathered", "sharded"), (2, "sharded", "gathered"),
    (3, "gathered", "sharded"), (3, "sharded", "gathered"), (3, "sharded", "sharded"),
])
def test_two_rank_checkpoint_resumes_on_other_worlds_and_modes(runs, world, source, mode):
    tmp, results = runs
    saved = load(checkpoint(tmp, source))
    for rank, result in enumerate(results[world]):
        r = result[f"{source}->{mode}"]
        check_resumed(r["live"], saved, world, f"rank {rank}/{world} {source}->{mode}")
        assert r["live"]["mode"] == mode and r["live"]["sharded"] == (mode == "sharded")
        assert r["steps"] == TINY["steps"]
        if rank == 0:
            assert len(r["losses"]) == TINY["steps"] - SAVED_AT and all(torch.isfinite(torch.tensor(r["losses"])))
            if source != mode:
                assert any(f"saved in {source!r} mode and loads in {mode!r}" in m for m in r["messages"])
            if world != 2:
                assert any("written by 2 process(es), this run has 3" in m and "data order" in m
                           for m in r["messages"])
    # The next checkpoint holds one global queue whatever the mode and world wrote it.
    after = load(tmp / f"{source}-to-{mode}-world{world}" / "checkpoint.pt")
    assert after["world_size"] == world and after["head"]["loss.queue.weights"].shape == (QUEUE, 32)


@pytest.mark.parametrize("source", ["gathered", "sharded"])
def test_two_rank_checkpoint_resumes_on_one_process(runs, tmp_path, source):
    tmp, _ = runs
    saved = load(checkpoint(tmp, source))
    trainer = Trainer(config("auto", tmp_path / "one"))
    messages = trainer.resume(str(checkpoint(tmp, source)))
    check_resumed(_live(trainer), saved, 1, f"1 process from {source}")
    assert any("written by 2 process(es), this run has 1" in m for m in messages)
    result = trainer.fit()
    assert result["steps"] == TINY["steps"] and len(result["history"]) == TINY["steps"] - SAVED_AT
    assert all(torch.isfinite(torch.tensor([r["loss"] for r in result["history"]])))


def test_an_epochs_run_resumes_on_three_ranks_at_the_same_share_of_the_run(runs):
    tmp, results = runs
    saved = load(tmp / "epochs-one" / f"checkpoint_{SAVED_AT:07d}.pt")
    assert saved["world_size"] == 1 and saved["generator_buffers"] is None
    for rank, result in enumerate(results[3]):
        r = result["epochs"]
        total = r["total_steps"]
        assert total < saved["total_steps"], "3 ranks: fewer steps per epoch"
        assert r["live"]["step"] == resumed_step(SAVED_AT, saved["total_steps"], total) != SAVED_AT
        assert r["live"]["lr"] == pytest.approx(r["expected_lr"], rel=1e-12), "the schedule at the new step"
        start, stop = shard_range(QUEUE, 3, rank)
        assert torch.equal(r["live"]["weights"], saved["head"]["loss.queue.weights"][start:stop])
        assert r["live"]["ptr"] == int(saved["head"]["loss.queue.ptr"]) == SAVED_AT * TINY["batch_size"] % QUEUE
        assert_same_tensors(r["live"]["generator"], saved["generator"], "weight generator")
        assert r["steps"] == total
        if rank == 0:
            assert any(f"step {SAVED_AT} of {saved['total_steps']} resumes as step {r['live']['step']} of {total}"
                       in m for m in r["messages"])
            assert any("saved in 'none' mode and loads in 'sharded'" in m for m in r["messages"])


def test_another_world_size_keeps_the_share_of_an_epochs_run():
    assert resumed_step(5, 8, 8) == 5                 # --steps: the same steps on any world size
    assert resumed_step(20, 40, 80) == 40             # 2 -> 1 process: twice the steps per epoch
    assert resumed_step(60, 80, 40) == 30 and resumed_step(40, 40, 27) == 27


# --------------------------------------------------------------------------- the library


@pytest.mark.parametrize("world", [2, 3])
def test_global_state_of_every_mode_loads_in_every_mode(runs, world):
    _, results = runs
    state = library_state()
    for rank, result in enumerate(results[world]):
        lib = result["library"]
        start, stop = shard_range(K, world, rank)
        own = lib["sharded"]["own"]
        assert torch.equal(own["queue.weights"], state["queue.weights"][start:stop]), "a sharded rank keeps its block"
        assert own["queue.shard"].tolist() == [K, start, stop, world, rank]
        assert is_block_state(own) and not is_block_state(state)
        assert torch.equal(lib["gathered"]["own"]["queue.weights"], state["queue.weights"])
        for mode in ("gathered", "sharded"):
            assert_same_tensors(lib[mode]["global"], state, f"rank {rank} {mode} global_state_dict")
            if rank == 0:
                assert_same_tensors(lib[mode]["dst0"], state, f"{mode} global_state_dict(dst=0)")
            else:
                assert lib[mode]["dst0"] is None
        assert lib["block_round_trip"]
    # Every rank's block, assembled offline (per-rank files), is the global form again;
    # and so are older per-rank states without the block's description, in rank order.
    blocks = [result["library"]["sharded"]["own"] for result in results[world]]
    assert_same_tensors(assemble_queue_state(blocks[::-1]), state, "assembled")
    old = [{k: v for k, v in b.items() if k != "queue.shard"} for b in blocks]
    assert_same_tensors(assemble_queue_state(old), state, "assembled from older per-rank states")
    with pytest.raises(ValueError, match="every rank's block of the queue sharded over"):
        assemble_queue_state(blocks[:-1])


@pytest.mark.parametrize("world", [2, 3])
def test_shuffle_permutation_comes_from_seed_and_step(runs, world):
    _, results = runs
    images = torch.cat([r["library"]["images"] for r in results[world]])
    sizes = [r["library"]["images"].shape[0] for r in results[world]]
    permutation = shuffle_permutation(images.shape[0], 7, 3)
    # MoCo's shuffle with that permutation: rank r centres the r-th chunk of the permuted batch.
    shuffled = images[permutation]
    outputs = torch.cat([centre(chunk) for chunk in torch.split(shuffled, sizes)])
    expected = torch.empty_like(outputs)
    expected[permutation] = outputs
    offset = 0
    for result, n in zip(results[world], sizes):
        torch.testing.assert_close(result["library"]["shuffled"], expected[offset:offset + n], rtol=0, atol=1e-12)
        assert not torch.allclose(result["library"]["shuffled"], centre(result["library"]["images"]))
        assert "every rank must pass the same seed and step" in result["library"]["step_mismatch"]
        offset += n
    assert sorted(permutation.tolist()) == list(range(images.shape[0]))
    assert torch.equal(permutation, shuffle_permutation(images.shape[0], 7, 3))
    assert not torch.equal(permutation, shuffle_permutation(images.shape[0], 7, 4))
    assert shuffle_seed(0, 0) != shuffle_seed(0, 1) != shuffle_seed(1, 0)


def test_a_block_is_refused_where_it_is_not_this_ranks():
    """Without a process group: ShardedClassQueue of any rank/world stands in for a rank."""
    state = {k[len("queue."):]: v for k, v in library_state().items()}
    block = block_state(library_state(), 3, 1)
    queue_block = {k[len("queue."):]: v for k, v in block.items()}
    mine = ShardedClassQueue(K, D, world_size=3, rank=1)
    mine.load_state_dict(queue_block)  # its own block: as before
    assert torch.equal(mine.weights, state["weights"][8:16])
    with pytest.raises(ValueError, match=r"rank 1's block, global slots \[8, 16\) of a queue sharded over 3 ranks, "
                                         r"and this rank holds \[0, 12\)"):
        ShardedClassQueue(K, D, world_size=2, rank=0).load_state_dict(queue_block)
    with pytest.raises(ValueError, match=r"rank 1's block, global slots \[8, 16\).*not the whole queue"):
        dcq_ops.ClassQueue(K, D).load_state_dict(queue_block)
    old = {k: v for k, v in queue_block.items() if k != "shard"}  # an older per-rank block: no description
    ShardedClassQueue(K, D, world_size=3, rank=1).load_state_dict(old)  # loads where it loaded before
    with pytest.raises(ValueError, match=r"weights must be \[23, 6\] \(the global queue\) or \[12, 6\] \(this "
                                         r"rank's block\), got \(8, 6\)"):
        ShardedClassQueue(K, D, world_size=2, rank=0).load_state_dict(old)
    with pytest.raises(ValueError, match=r"weights must be \[23, 6\].*got \(8, 6\).*assemble_queue_state"):
        dcq_ops.ClassQueue(K, D).load_state_dict(old)
    # The global form: every rank of every world keeps its block.
    for world in (1, 2, 3, 4):
        for rank in range(world):
            q = ShardedClassQueue(K, D, world_size=world, rank=rank)
            q.load_state_dict(state)
            a, b = shard_range(K, world, rank)
            assert torch.equal(q.weights, state["weights"][a:b]) and int(q.ptr) == int(state["ptr"])
    # A corrupt global state is refused before any block of it is taken.
    bad = dict(state, weights=state["weights"].clone())
    bad["weights"][20] = F.normalize(torch.randn(D), dim=0) * 2
    with pytest.raises(ValueError, match="unit-norm row.*slot 20"):
        ShardedClassQueue(K, D, world_size=2, rank=0).load_state_dict(bad)


def test_global_state_dict_of_one_process_is_its_state_dict():
    state = library_state()
    module = dcq_ops.DCQLoss(None, D, num_classes=NUM_CLASSES, queue_size=K)
    module.load_state_dict(state)
    assert_same_tensors(module.global_state_dict(), module.state_dict(), "none")
    assert module.global_state_dict()["queue.weights"].device.type == "cpu"
    with pytest.raises(ValueError, match=r"dst must be a rank of the group, in \[0, 1\), got 1"):
        module.global_state_dict(dst=1)
    unsaved = dcq_ops.DCQLoss(None, D, queue_size=K, save_queue=False)
    assert dict(unsaved.global_state_dict()) == {}
