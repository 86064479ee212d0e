"""The weight generator's EMA, backbones, the schedule, and the training loop:
it learns, and a resumed run equals an uninterrupted one."""

import csv
import dataclasses
import json
import math
import os

import pytest
import torch
from torch import nn

from dcq_ops import MomentumEncoder
from dcq_ops.training.backbones import IResNet, SmallCNN, build_backbone
from dcq_ops.training.cli import main
from dcq_ops.training import TrainConfig, Trainer, TrainingError, load_backbone, train
from dcq_ops.training.schedules import lr_factor

# --------------------------------------------------------------------------- EMA


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 2)
        self.bn = nn.BatchNorm1d(2)

    def forward(self, x):
        return self.bn(self.linear(x))


def _set(module, weight, bias, mean):
    with torch.no_grad():
        module.linear.weight.copy_(torch.tensor(weight))
        module.linear.bias.copy_(torch.tensor(bias))
        module.bn.running_mean.copy_(torch.tensor(mean))


def test_ema_update_against_a_hand_computation():
    f = Tiny()
    _set(f, [[1.0, 2.0], [3.0, 4.0]], [0.5, -0.5], [0.0, 0.0])
    g = MomentumEncoder(f, momentum=0.9)
    _set(f, [[2.0, 0.0], [3.0, 8.0]], [1.5, 0.5], [7.0, -7.0])
    g.update()
    # g = 0.9 g + 0.1 f, by hand: 0.9*1 + 0.1*2 = 1.1, 0.9*2 + 0 = 1.8, 3, 0.9*4 + 0.8 = 4.4; biases 0.6, -0.4.
    torch.testing.assert_close(g.module.linear.weight, torch.tensor([[1.1, 1.8], [3.0, 4.4]]))
    torch.testing.assert_close(g.module.linear.bias, torch.tensor([0.6, -0.4]))
    # Buffers (BatchNorm statistics) are copied, not averaged.
    torch.testing.assert_close(g.module.bn.running_mean, torch.tensor([7.0, -7.0]))
    # BatchNorm's affine parameters move too: 0.9*1 + 0.1*1 = 1 (unchanged), bias 0.
    g.update()  # a second step: 0.9 * 1.1 + 0.1 * 2 = 1.19
    torch.testing.assert_close(g.module.linear.weight[0, 0], torch.tensor(1.19))
    assert all(not p.requires_grad for p in g.parameters())


def test_ema_call_is_no_grad_and_state_dict_round_trips():
    f = Tiny()
    g = MomentumEncoder(f, momentum=0.5)
    out = g(torch.randn(4, 2))
    assert not out.requires_grad
    assert set(g.state_dict()) == {f"module.{k}" for k in f.state_dict()}, "only the generator's own weights"
    h = MomentumEncoder(Tiny(), momentum=0.5)
    h.load_state_dict(g.state_dict())
    for a, b in zip(g.state_dict().values(), h.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_through_ddp(tmp_path):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialised")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        f = Tiny()
        wrapped = nn.parallel.DistributedDataParallel(f)
        g = MomentumEncoder(wrapped, momentum=0.0)  # momentum 0: g becomes f
        with torch.no_grad():
            f.linear.weight.add_(1.0)
        g.update()
        assert torch.equal(g.module.linear.weight, f.linear.weight)
        assert not any(isinstance(m, nn.parallel.DistributedDataParallel) for m in g.modules())
    finally:
        dist.destroy_process_group()


# --------------------------------------------------------------------------- backbones and schedule


def test_backbones_shapes_and_iresnet_size():
    x = torch.randn(2, 3, 32, 32)
    assert SmallCNN(embedding_size=24, width=4).eval()(x).shape == (2, 24)
    assert IResNet(18, embedding_size=16, image_size=32).eval()(x).shape == (2, 16)
    # IResNet-50 at 112x112 with 512-d embeddings has the published 43.6M parameters.
    r50 = build_backbone("iresnet50")
    assert sum(p.numel() for p in r50.parameters()) == pytest.approx(43.6e6, rel=0.01)
    with pytest.raises(ValueError, match="backbone must be one of"):
        build_backbone("resnet50")
    with pytest.raises(ValueError, match="multiple of 16"):
        IResNet(18, image_size=40)


def test_lr_schedule_warmup_cosine_and_step():
    factors = [lr_factor(s, 100, 10, "cosine", (), 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[55] == pytest.approx(0.5)
    assert factors[99] == pytest.approx(0.5 * (1 + math.cos(math.pi * 89 / 90)))
    steps = [lr_factor(s, 100, 0, "step", (0.5, 0.8), 0.1) for s in (0, 49, 50, 79, 80, 99)]
    assert steps == pytest.approx([1, 1, 0.1, 0.1, 0.01, 0.01])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="head must be one of"):
        TrainConfig(head="arcface")
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TrainConfig(batch_size=0)
    with pytest.raises(ValueError, match="momentum must be in"):
        TrainConfig(momentum=1.5)
    with pytest.raises(ValueError, match="must hold one global batch"):
        Trainer(TrainConfig(**{**TINY, "queue_size": 16, "batch_size": 32}))
    # NaN and inf are no numbers a setting takes (NaN passes no comparison, so a bare
    # "< 0" check lets it through).
    for name, value in (("warmup_epochs", math.nan), ("clip_grad", math.nan), ("lr", math.inf), ("epochs", math.inf),
                        ("sample_rate", math.nan), ("scale", 0.0), ("decay_at", [math.nan])):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: value})
    for name, value in (("stop_after", -1), ("queue_size", 0), ("max_bad_steps", -1), ("seed", -1)):
        with pytest.raises(ValueError, match=name):
            TrainConfig(**{name: value})
    with pytest.raises(ValueError, match="--batch-size.*BatchNorm"):
        TrainConfig(batch_size=1)
    with pytest.raises(ValueError, match="--image-size.*multiple of 4"):
        TrainConfig(image_size=3)
    with pytest.raises(ValueError, match="validate must be one of"):
        TrainConfig(validate="sometimes")


# --------------------------------------------------------------------------- the loop

# A tiny run: 120 identities at 16x16, a 4-channel CNN; a second or two per run.
# One thread: these models are too small to gain from two, and on a loaded
# machine OpenMP threads that wait on each other make every op many times slower.
TINY = dict(synthetic_identities=120, synthetic_eval_identities=40, image_size=16, width=4, embedding_size=32,
            batch_size=32, queue_size=64, log_every=5, eval_pairs=400, progress="none", threads=1)


def _final_eval_of_random_init(config):
    trainer = Trainer(config)
    return trainer.evaluate()


def test_short_training_lowers_loss_and_beats_chance():
    config = TrainConfig(**{**TINY, "head": "dcq", "steps": 90, "lr": 0.05, "warmup_epochs": 0.5,
                            "synthetic_identities": 200, "width": 8, "scale": 16.0})
    before = _final_eval_of_random_init(config)["heldout"]["accuracy"]
    result = train(config)
    losses = [r["loss"] for r in result["history"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.5, losses
    after = result["final_eval"]["heldout"]["accuracy"]
    assert after > 0.65, result["final_eval"]
    assert after > before + 0.03, (before, after)
    assert set(result["final_eval"]) == {"heldout", "tail", "head"}


@pytest.mark.parametrize("head,amp", [("dcq", "none"), ("partial_fc", "none"), ("dcq", "fp16")])
def test_resumed_run_equals_uninterrupted_run(tmp_path, head, amp):
    """Bitwise: on the CPU the same operations in the same order on the same
    values give the same bits, and a checkpoint restores every value (weights,
    generator, queue, optimizer, scheduler, scaler, RNG; the data is a function
    of (seed, epoch, index)). 8 steps over 3 epochs, interrupted after step 5
    (mid-epoch), cover the epoch boundary and the mid-epoch restart."""
    config = TrainConfig(**{**TINY, "head": head, "amp": amp, "steps": 8, "synthetic_identities": 80,
                            "sample_rate": 0.2, "dropout": 0.1, "eval_pairs": 100})
    full = train(dataclasses.replace(config, output=str(tmp_path / "full")))
    first = train(dataclasses.replace(config, output=str(tmp_path / "part"), stop_after=5))
    assert first["steps"] == 5 and first["final_eval"] == {}
    resumed = train(dataclasses.replace(config, output=str(tmp_path / "part"),
                                        resume=str(tmp_path / "part" / "checkpoint_0000005.pt")))
    assert resumed["steps"] == 8
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for part in ("backbone", "head", "generator"):
        if a[part] is None:
            continue
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), f"{part}.{key} differs after resuming"
    if head == "dcq":
        assert (a["head"]["loss.queue.labels"] >= 0).all(), "the queue was filled"
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa if isinstance(sa[k], torch.Tensor))
    assert a["scheduler"] == b["scheduler"] and a["scaler"] == b["scaler"]
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert [r["loss"] for r in full["history"] if r["step"] > 5] == [r["loss"] for r in resumed["history"]]
    assert full["final_eval"] == resumed["final_eval"]


def test_resume_refuses_a_different_run(tmp_path):
    config = TrainConfig(**{**TINY, "steps": 2, "output": str(tmp_path)})
    train(config)
    with pytest.raises(ValueError, match="lr: checkpoint 0.1, now 0.2"):
        train(dataclasses.replace(config, lr=0.2, resume="auto"))


def test_command_line_writes_log_checkpoint_and_result(tmp_path, capsys):
    out = tmp_path / "run"
    assert 0 == main(["--threads", "1", "--synthetic-identities", "80", "--synthetic-eval-identities", "20", "--image-size", "16",
          "--width", "4", "--embedding-size", "16", "--batch-size", "16", "--queue-size", "32", "--steps", "4",
          "--log-every", "2", "--eval-pairs", "100", "--optimizer", "adamw", "--lr", "1e-3",
          "--schedule", "step", "--amp", "bf16", "--log-format", "json", "--progress", "lines",
          "--output", str(out)])
    printed = capsys.readouterr().out
    assert "step 2/4" in printed and "samples/s" in printed and "eval step 4 heldout" in printed
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [2, 4]
    assert {r["set"] for r in records if r["kind"] == "eval"} == {"heldout", "tail", "head"}
    result = json.loads((out / "result.json").read_text())
    assert result["steps"] == 4 and 0 <= result["final_eval"]["heldout"]["accuracy"] <= 1
    model = load_backbone(str(out / "checkpoint.pt"))
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 16)
    assert os.path.exists(out / "checkpoint_0000004.pt")


def test_momentum_encoder_keeps_its_own_buffers_when_asked():
    net = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    generator = MomentumEncoder(net, momentum=0.5)
    net(torch.randn(8, 4))  # the feature extractor's running statistics move
    generator.update(copy_buffers=False)
    assert not torch.equal(generator.module[1].running_mean, net[1].running_mean)
    generator.update()
    assert torch.equal(generator.module[1].running_mean, net[1].running_mean)


# --------------------------------------------------------------------------- bad steps


def _inject_inf_class_weight(monkeypatch, trainer, steps):
    """An inf in one class weight (one row of the generator's output) at the given steps
    (1-based, as logged)."""
    generate = trainer._class_weights

    def class_weights(images):
        weights = generate(images)
        if trainer.step + 1 in steps:
            weights = weights.clone()
            weights[1] = math.inf
        return weights
    monkeypatch.setattr(trainer, "_class_weights", class_weights)


def _finite_state(trainer):
    """Every floating tensor of the backbone, the generator and the optimizer state is finite."""
    tensors = list(trainer.backbone.state_dict().values()) + list(trainer.generator.state_dict().values())
    tensors += [v for state in trainer.optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


@pytest.mark.parametrize("validate", ["async", "eager"])
def test_a_nonfinite_class_weight_is_skipped_and_the_run_finishes(tmp_path, monkeypatch, capsys, validate):
    out = tmp_path / "run"
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 8, "progress": "lines", "output": str(out),
                                     "validate": validate}))
    _inject_inf_class_weight(monkeypatch, trainer, {3})
    result = trainer.fit()
    assert result["steps"] == 8 and set(result["final_eval"]) == {"heldout", "tail", "head"}, "the run finished"
    assert result["skipped_steps"] == [3] and result["bad_steps"] == 1
    assert [r["skipped"] for r in result["history"]] == [1, 0]  # the rows of steps 5 and 8
    assert all(math.isfinite(r["loss"]) for r in result["history"])
    assert _finite_state(trainer), "the bad step reached the weights"
    queue = trainer.head.loss.queue
    assert bool(torch.isfinite(queue.weights).all()), "a non-finite class weight entered the queue"
    assert (queue.labels >= 0).sum() == 64, "the other batches filled the queue"
    printed = capsys.readouterr().out
    assert "step 3:" in printed and "update skipped" in printed and "skipped 1" in printed
    with open(out / "log.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["step"], r["skipped"]) for r in rows if r["kind"] == "skip"] == [("3", "1")]
    assert [r["skipped"] for r in rows if r["kind"] == "train"] == ["1", "0"]
    assert torch.load(out / "checkpoint.pt", weights_only=False)["bad_steps"] == 1


def test_a_nonfinite_batch_leaves_batchnorm_statistics_alone(monkeypatch):
    """A NaN image makes the forward's BatchNorm statistics NaN: they are undone with the step."""
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 5}))
    step = trainer.train_step

    def train_step(batch):
        if trainer.step + 1 == 3:
            images_a, images_b, labels = batch
            images_a = images_a.clone()
            images_a[0, 0, 0, 0] = math.nan
            batch = (images_a, images_b, labels)
        return step(batch)
    monkeypatch.setattr(trainer, "train_step", train_step)
    result = trainer.fit()
    assert result["skipped_steps"] == [3]
    assert _finite_state(trainer)
    assert bool(torch.isfinite(trainer.head.loss.queue.weights).all())


def test_more_bad_steps_than_allowed_stop_the_run(monkeypatch):
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 8, "max_bad_steps": 2}))
    _inject_inf_class_weight(monkeypatch, trainer, {2, 3, 4})
    with pytest.raises(TrainingError, match="3 bad steps, more than --max-bad-steps 2"):
        trainer.fit()
    assert trainer.step == 5, "read at the log line of step 5 (log_every 5): no host sync per step"
    assert _finite_state(trainer)
    # 0: the first bad step stops the run.
    trainer = Trainer(TrainConfig(**{**TINY, "steps": 8, "max_bad_steps": 0, "validate": "eager"}))
    _inject_inf_class_weight(monkeypatch, trainer, {2})
    with pytest.raises(TrainingError, match="more than --max-bad-steps 0 .the last at step 2"):
        trainer.fit()
    assert trainer.step == 2, "eager validation reads every step"
