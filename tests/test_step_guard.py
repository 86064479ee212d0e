"""The bad-step guard: a bad step leaves every piece of state a step can change as it
was, whichever way the update is skipped (a fused optimizer's found_inf, or the full
copy for any other optimizer), and a run without bad steps is the same with and
without the guard."""

import copy
import math

import pytest
import torch

from dcq_ops.training import TrainConfig, Trainer
from dcq_ops.training.data import batch_loader
from dcq_ops.training.step_guard import skips_in_optimizer

TINY = dict(synthetic_identities=120, synthetic_eval_identities=40, image_size=16, width=4, embedding_size=32,
            batch_size=32, queue_size=64, log_every=5, eval_pairs=400, progress="none", threads=1)


def _batches(trainer, count):
    return list(batch_loader(trainer.dataset, trainer.sampler, 0))[:count]


def _nan_image(batch):
    images_a, images_b, labels = batch
    images_a = images_a.clone()
    images_a[0, 0, 0, 0] = math.nan  # NaN loss, NaN gradients, NaN BatchNorm statistics of the forward
    return images_a, images_b, labels


def _state(trainer):
    """Everything of the trainer's checkpoint that a bad step must leave as it was: the
    backbone (its BatchNorm statistics too), the head (the DCQ queue), the optimizer's
    state (and its groups' settings but the learning rate, which the schedule moves),
    the grad scaler and the weight generator's buffers. Its parameters follow the
    backbone by EMA even after a bad step: checked separately."""
    state = copy.deepcopy(trainer.state_dict())
    groups = [{k: v for k, v in g.items() if k not in ("lr", "initial_lr")} for g in state["optimizer"]["param_groups"]]
    return {"backbone": state["backbone"], "head": state["head"], "optimizer_state": state["optimizer"]["state"],
            "optimizer_groups": groups, "scaler": state["scaler"],
            "generator_buffers": {k: v for k, v in state["generator"].items()
                                  if k in dict(trainer.generator.named_buffers(prefix="module"))}}


def _assert_same(before, after, where=""):
    """Equal to the bit, key by key; an optimizer state a bad step created counts as
    absent when it is a fresh one (all zeros: SGD's momentum, Adam's moments and step)."""
    if isinstance(before, dict) or isinstance(after, dict):
        for key in set(before) | set(after):
            if key not in before:
                fresh = after[key]
                values = fresh.values() if isinstance(fresh, dict) else [fresh]
                assert all(isinstance(v, torch.Tensor) and not v.any() for v in values), \
                    f"{where}/{key}: created by the bad step, and not a fresh state"
                continue
            assert key in after, f"{where}/{key}: gone after the bad step"
            _assert_same(before[key], after[key], f"{where}/{key}")
    elif isinstance(before, (list, tuple)):
        assert len(before) == len(after), where
        for i, (b, a) in enumerate(zip(before, after)):
            _assert_same(b, a, f"{where}[{i}]")
    elif isinstance(before, torch.Tensor):
        assert torch.equal(before, after) or (before.is_floating_point() and torch.equal(
            before.nan_to_num(), after.nan_to_num())), f"{where}: changed by the bad step"
    else:
        assert before == after, f"{where}: {before!r} -> {after!r}"


PATHS = [("sgd", "fused", "none"), ("sgd", "copy", "none"), ("adamw", "fused", "none"), ("adamw", "copy", "none"),
         ("sgd", "fused", "fp16")]


@pytest.mark.parametrize("optimizer,path,amp", PATHS)
@pytest.mark.parametrize("bad_step", [1, 3])
def test_a_bad_step_changes_no_state(optimizer, path, amp, bad_step):
    """A NaN image at step ``bad_step`` (the first: the optimizer creates its state then):
    the backbone (BatchNorm statistics included), the queue, the optimizer's state, the
    scaler and the generator's buffers are those before it, and the generator made one
    EMA step toward the unchanged backbone."""
    config = TrainConfig(**{**TINY, "steps": 4, "optimizer": optimizer, "lr": 0.1 if optimizer == "sgd" else 1e-3,
                            "amp": amp})
    trainer = Trainer(config)
    if path == "copy":  # an optimizer without found_inf: the guard copies everything a step changes
        for group in trainer.optimizer.param_groups:
            group["fused"] = False
    assert skips_in_optimizer(trainer.optimizer) == (path == "fused")
    batches = _batches(trainer, bad_step)
    for batch in batches[:-1]:
        trainer.train_step(batch)
    before = _state(trainer)
    generator, backbone = copy.deepcopy(trainer.generator), copy.deepcopy(trainer.backbone)
    loss, _ = trainer.train_step(_nan_image(batches[-1]))
    assert not bool(torch.isfinite(loss))
    assert trainer.guard.in_optimizer == (path == "fused")
    after = _state(trainer)
    if amp == "fp16":  # the GradScaler backs off on non-finite gradients, as it always has
        assert after["scaler"]["scale"] == before["scaler"]["scale"] * before["scaler"]["backoff_factor"]
        after["scaler"] = before["scaler"]
    _assert_same(before, after)
    generator.momentum = trainer.generator.momentum
    generator.update(backbone, copy_buffers=config.generator_bn == "eval")
    for name, value in generator.state_dict().items():
        assert torch.equal(value, trainer.generator.state_dict()[name]), f"generator {name}"


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")
@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_skipped_first_step_then_trains_as_a_fresh_run(optimizer):
    """After a bad first step the optimizer's state is a fresh one: the next steps give
    the weights a run without that step gives (fused SGD allocates its momentum
    uninitialised at its first step; unreset, it would add garbage to the next update)."""
    config = TrainConfig(**{**TINY, "steps": 4, "optimizer": optimizer, "lr": 0.1 if optimizer == "sgd" else 1e-3,
                            "queue_warmup": "empty"})
    skipped, plain = Trainer(config), Trainer(config)
    batches = _batches(skipped, 3)
    skipped.train_step(_nan_image(batches[0]))
    plain.scheduler.step()  # the schedule and the generator count the skipped step
    plain.generator.update(plain.backbone, copy_buffers=config.generator_bn == "eval")
    plain.step += 1
    for batch in batches[1:]:
        skipped.train_step(batch)
        plain.train_step(batch)
    assert skipped.guard.in_optimizer
    for name, value in plain.backbone.state_dict().items():
        assert torch.equal(value, skipped.backbone.state_dict()[name]), name


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_good_steps_are_the_same_with_and_without_the_guard(optimizer):
    config = TrainConfig(**{**TINY, "steps": 3, "optimizer": optimizer, "lr": 0.1 if optimizer == "sgd" else 1e-3})
    guarded, unguarded = Trainer(config), Trainer(TrainConfig(**{**config.__dict__, "validate": "off"}))
    for batch in _batches(guarded, 3):
        guarded.train_step(batch)
        unguarded.train_step(batch)
    for part in ("backbone", "generator"):
        ours, theirs = getattr(guarded, part).state_dict(), getattr(unguarded, part).state_dict()
        for name, value in ours.items():
            assert torch.equal(value, theirs[name]), f"{part} {name}"
    for p, q in zip(guarded._params, unguarded._params):
        for key, value in guarded.optimizer.state[p].items():
            assert torch.equal(value, unguarded.optimizer.state[q][key]), key


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_with_a_fused_optimizer_the_guard_copies_only_the_batchnorm_statistics(optimizer):
    """The cost of the guard: the fused optimizer skips a bad update itself, so the copy
    per step is the BatchNorm statistics (the forward moves them), not the parameters
    and the optimizer state (a full copy of them cost a quarter of the CPU throughput)."""
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 3, "optimizer": optimizer}))
    assert skips_in_optimizer(trainer.optimizer), "dcq-train builds a fused optimizer on the CPU"
    batch = _batches(trainer, 1)[0]
    trainer.train_step(batch)
    trainer.guard.save()
    copied = sum(t.numel() * t.element_size() for t in trainer.guard.undo._saved.values())
    buffers = sum(b.numel() * b.element_size() for b in trainer._buffers.values())
    params = sum(p.numel() * p.element_size() for p in trainer._params)
    assert copied == buffers < params / 4


# --------------------------------------------------------------------------- LoopGuard (a loop of one's own)

@pytest.mark.parametrize("fused", [True, False])
def test_loop_guard_skips_a_bad_step_of_a_loop_of_ones_own(fused):
    """LoopGuard (arcface_torch's patched train_v2.py uses it): a NaN input leaves the
    parameters, the optimizer state and the BatchNorm statistics as they were, through
    the fused optimizer's found_inf or the full copy; a good step goes through; a batch
    refused on the host (``problem``) is skipped as well."""
    from dcq_ops.training.step_guard import LoopGuard
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=fused)
    guard = LoopGuard(optimizer, [model])

    def step(x, problem=None):
        guard.begin()
        out = model(x)
        loss = out.square().mean()
        loss.backward()
        kept = guard.kept(loss, out, None, problem)
        guard.step(kept)
        optimizer.zero_grad()
        return bool(kept)

    assert step(torch.randn(8, 4))
    assert guard.guard.in_optimizer == fused
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"]))
    bad = torch.randn(8, 4)
    bad[3, 1] = math.nan
    assert not step(bad)
    _assert_same(before, (model.state_dict(), optimizer.state_dict()["state"]))
    assert not step(torch.randn(8, 4), problem="labels out of range")
    _assert_same(before, (model.state_dict(), optimizer.state_dict()["state"]))
    assert step(torch.randn(8, 4))
    assert not torch.equal(before[0]["0.weight"], model.state_dict()["0.weight"])
