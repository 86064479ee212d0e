"""DCQ's training levers and the weight generator's evaluation: the generator
momentum schedule, the queue warm-up, the generator's own BatchNorm statistics,
and ``--eval-model backbone|generator|both``."""

import dataclasses
import json
import math

import pytest
import torch

from dcq_ops.training.cli import main
from dcq_ops.training import TrainConfig, Trainer, train
from dcq_ops.training.schedules import generator_momentum

from test_training import TINY as TRAINING_TINY

# test_training.py's tiny run, logging every step.
TINY = dict(TRAINING_TINY, log_every=1)


def test_generator_momentum_schedules():
    assert [generator_momentum(s, 100, 0.99, 0.999, "constant") for s in (0, 50, 99)] == [0.99] * 3
    cosine = [generator_momentum(s, 101, 0.99, 0.999, "cosine") for s in range(101)]
    assert cosine[0] == pytest.approx(0.99) and cosine[-1] == pytest.approx(0.999)
    assert cosine[50] == pytest.approx(0.9945)  # half way: the mean of the two ends
    # BYOL's form with end = 1: m_t = 1 - (1 - m_0) (cos(pi t / T) + 1) / 2.
    assert generator_momentum(25, 101, 0.99, 1.0, "cosine") == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    assert all(a <= b for a, b in zip(cosine, cosine[1:])), "the momentum only rises"
    with pytest.raises(ValueError, match="schedule must be one of"):
        generator_momentum(0, 10, 0.9, 0.99, "linear")


def test_config_rejects_bad_lever_values():
    with pytest.raises(ValueError, match="momentum_schedule must be one of"):
        TrainConfig(momentum_schedule="linear")
    with pytest.raises(ValueError, match="queue_warmup must be one of"):
        TrainConfig(queue_warmup="zeros")
    with pytest.raises(ValueError, match="momentum_end must be in"):
        TrainConfig(momentum_end=1.5)
    with pytest.raises(ValueError, match="eval_model must be one of"):
        TrainConfig(eval_model="ema")
    with pytest.raises(ValueError, match="needs a weight generator"):
        TrainConfig(head="softmax", eval_model="generator")


def test_cosine_schedule_sets_the_generator_momentum_of_each_update():
    trainer = Trainer(TrainConfig(**TINY, steps=5, momentum=0.5, momentum_end=0.9, momentum_schedule="cosine"))
    seen = []
    update = trainer.generator.update
    trainer.generator.update = lambda *a, **k: (seen.append(trainer.generator.momentum), update(*a, **k))
    trainer.fit()
    assert seen == pytest.approx([generator_momentum(s, 5, 0.5, 0.9, "cosine") for s in range(5)])
    assert seen[0] == pytest.approx(0.5) and seen[-1] == pytest.approx(0.9)


@pytest.mark.parametrize("warmup", ["empty", "random", "prefill"])
def test_queue_warmup(warmup):
    config = TrainConfig(**TINY, steps=1, queue_warmup=warmup)
    trainer = Trainer(config)
    queue = trainer.head.loss.queue
    trainer.warm_queue()
    if warmup == "empty":
        assert (queue.labels == -1).all()
    elif warmup == "random":
        assert (queue.labels == trainer.num_classes).all(), "a label that no class has: every slot a negative"
        torch.testing.assert_close(queue.weights.norm(dim=1), torch.ones(trainer.head.loss.queue_size))
    else:
        assert ((queue.labels >= 0) & (queue.labels < trainer.num_classes)).all()
        assert queue.labels.unique().numel() > 1
    # The first step's loss: with an empty queue there is no negative at all, so it is 0.
    first = train(config)["history"][0]["loss"]
    assert (first == 0) == (warmup == "empty"), first


def test_generator_keeps_its_own_batchnorm_statistics():
    """generator_bn=train: the generator's running statistics come from its own
    forward passes (as the official code's encoder_k), not from the feature
    extractor; generator_bn=eval copies the feature extractor's."""
    for mode in ("train", "eval"):
        trainer = Trainer(TrainConfig(**TINY, steps=3, generator_bn=mode))
        trainer.fit()
        mine = dict(trainer.generator.module.named_buffers())
        theirs = dict(trainer.backbone.named_buffers())
        means = [k for k in mine if k.endswith("running_mean")]
        same = all(torch.equal(mine[k], theirs[k]) for k in means)
        assert same == (mode == "eval"), mode


def test_resumed_run_with_levers_equals_uninterrupted_run(tmp_path):
    config = TrainConfig(**{**TINY, "steps": 6, "synthetic_identities": 80, "sample_rate": 0.2, "eval_pairs": 100,
                            "momentum_schedule": "cosine", "queue_warmup": "prefill", "eval_model": "both"})
    full = train(dataclasses.replace(config, output=str(tmp_path / "full")))
    train(dataclasses.replace(config, output=str(tmp_path / "part"), stop_after=3))
    resumed = train(dataclasses.replace(config, output=str(tmp_path / "part"), resume="auto"))
    assert [r["loss"] for r in full["history"] if r["step"] > 3] == [r["loss"] for r in resumed["history"]]
    assert full["final_eval_generator"] == resumed["final_eval_generator"]
    assert full["final_eval"] == resumed["final_eval"]


def test_command_line_eval_model_generator_reports(tmp_path, capsys):
    out = tmp_path / "run"
    main(["--threads", "1", "--synthetic-identities", "80", "--synthetic-eval-identities", "20", "--image-size", "16",
          "--width", "4", "--embedding-size", "16", "--batch-size", "16", "--queue-size", "32", "--steps", "4",
          "--log-every", "2", "--eval-pairs", "100", "--eval-model", "generator", "--log-format", "json",
          "--progress", "lines", "--output", str(out)])
    printed = capsys.readouterr().out
    assert "eval step 4 heldout [generator]: accuracy" in printed
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["kind"] == "eval"]
    assert {r["model"] for r in evals} == {"generator"}
    assert {r["set"] for r in evals} == {"heldout", "tail", "head"}
    result = json.loads((out / "result.json").read_text())
    assert result["eval_model"] == "generator" and result["final_eval"] == {}
    assert set(result["final_eval_generator"]) == {"heldout", "tail", "head"}
    assert 0.5 <= result["final_eval_generator"]["heldout"]["accuracy"] <= 1


def test_both_models_are_evaluated_and_differ():
    result = train(TrainConfig(**TINY, steps=6, eval_model="both", momentum=0.9))
    backbone, generator = result["final_eval"], result["final_eval_generator"]
    assert set(backbone) == set(generator) == {"heldout", "tail", "head"}
    # Two different networks (the generator lags the feature extractor): not one evaluated twice.
    assert backbone["heldout"] != generator["heldout"]
    # Evaluating the generator directly gives the same report.
    assert result["trainer"].evaluate("generator") == generator
