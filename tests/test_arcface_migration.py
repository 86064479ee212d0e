"""The arcface_torch migration: the patch is a well-formed git patch of the
files it names, makes the changes the guide describes (checkpoints that load with
torch.load's defaults, the schedule carried over to another world size, bad steps
skipped and bounded), the helpers it calls do what it relies on, and the guide and
the example name the upstream commit they were written against.

(Whether the patch applies to that commit needs the insightface sources, which
the tests cannot download; it was checked with ``git apply --check`` when the
patch was made, see README.md in examples/arcface_torch.)
"""

import re
from pathlib import Path

import pytest

FOLDER = Path(__file__).resolve().parents[1] / "examples" / "arcface_torch"
PATCH = FOLDER / "train_v2_dcq.patch"
COMMIT = "7fadd420c2351d0ffa8cac403421c1a3ed733365"
HUNK = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")


def file_diffs(text):
    """{path: [(old_start, old_count, new_start, new_count, lines)]}, checking the
    line counts of every hunk against its header (what makes git apply reject a patch)."""
    files = {}
    chunks = re.split(r"^diff --git ", text, flags=re.M)
    assert len(chunks) > 1, "no 'diff --git' section"
    for chunk in chunks[1:]:
        lines = chunk.split("\n")
        a, b = lines[0].split()
        assert a[2:] == b[2:] and a.startswith("a/") and b.startswith("b/"), lines[0]
        assert f"--- {a}" in lines and f"+++ {b}" in lines, f"{a}: no ---/+++ header"
        hunks, i = [], lines.index(f"+++ {b}") + 1
        while i < len(lines) and lines[i]:
            match = HUNK.match(lines[i])
            assert match, f"{b}: expected a hunk header, got {lines[i]!r}"
            old_start, old_count, new_start, new_count = (int(g) if g is not None else 1 for g in match.groups())
            body, i = [], i + 1
            while i < len(lines) and lines[i][:1] in (" ", "+", "-", "\\"):
                body.append(lines[i])
                i += 1
            old = sum(1 for l in body if l[:1] in (" ", "-"))
            new = sum(1 for l in body if l[:1] in (" ", "+"))
            assert (old, new) == (old_count, new_count), f"{b} hunk {match.group(0)}: counts {old}, {new}"
            hunks.append((old_start, old_count, new_start, new_count, body))
        files[b[2:]] = hunks
    return files


@pytest.fixture(scope="module")
def patch():
    return file_diffs(PATCH.read_text())


def added(hunks):
    return "\n".join(l[1:] for h in hunks for l in h[4] if l.startswith("+"))


def removed(hunks):
    return "\n".join(l[1:] for h in hunks for l in h[4] if l.startswith("-"))


def test_patch_is_well_formed_and_touches_train_v2(patch):
    assert set(patch) == {"recognition/arcface_torch/train_v2.py", "recognition/arcface_torch/dataset.py",
                          "recognition/arcface_torch/configs/base.py"}
    for hunks in patch.values():  # hunks in order, not overlapping
        ends = [(h[0], h[0] + h[1]) for h in hunks]
        assert all(e0 <= s1 for (_, e0), (s1, _) in zip(ends, ends[1:]))


def test_train_v2_uses_dcq_with_sample_rate_and_momentum_from_the_config(patch):
    train = patch["recognition/arcface_torch/train_v2.py"]
    assert "from partial_fc_v2 import PartialFC_V2" in removed(train)
    new = added(train)
    assert "from dcq_ops import DCQLoss, MomentumEncoder, shuffled_forward" in new
    assert new.count("module_partial_fc = DCQLoss(") == 2  # the sgd and the adamw branch
    assert "MomentumEncoder(backbone, momentum=cfg.dcq_momentum)" in new
    assert new.count("weight_generator.update()") == 2  # after the optimizer step of both branches
    assert "for _, (img, img_b, local_labels) in enumerate(train_loader):" in new
    assert '"state_dict_weight_generator": weight_generator.state_dict()' in new
    assert 'weight_generator.load_state_dict(dict_checkpoint["state_dict_weight_generator"])' in new
    context = "\n".join(l[1:] for h in train for l in h[4] if l.startswith(" "))
    assert "cfg.sample_rate, False)" in context  # master's line, unchanged: no cfg.fp16 there since 2023
    assert "cfg.fp16)" not in context + new


def test_dataset_gives_two_views_random_synthetic_labels_and_refuses_dali(patch):
    new = added(patch["recognition/arcface_torch/dataset.py"])
    assert "TwoViewDataset(RecordIOImages(root_dir)" in new
    assert "TwoViewDataset(IdentityFolder(root_dir)" in new
    assert "torch.randint(num_classes" in new and "self.labels[index]" in new
    assert "raise ValueError(" in new and "config.dali = False" in new
    assert "config.dcq_momentum = 0.999" in added(patch["recognition/arcface_torch/configs/base.py"])


def test_guide_and_example_name_the_commit_and_follow_master():
    guide = (FOLDER / "README.md").read_text()
    assert COMMIT in guide and "train_v2_dcq.patch" in guide
    for topic in ("DALI", "Synthetic", "dcq_momentum", "1 / (1 − m)", "starts at 0", "must not exceed the queue",
                  "shuffled_forward", "BatchNorm *buffers*", "recordio pack"):
        assert topic in guide, topic
    example = (FOLDER / "train_dcq.py").read_text()
    assert COMMIT in example
    for leftover in ("PolyScheduler", "lossShow", "cfg.sample_rate, cfg.fp16"):
        assert leftover not in example, leftover
    assert "PolynomialLRWarmup" in example and "cfg.sample_rate, False)" in example


def test_checkpoint_loads_with_torch_load_defaults(patch):
    """Item 15: checkpoint_dcq.pt holds RNG states as tensors and plain types, and the
    resume loads it with torch.load's defaults (weights_only=True)."""
    new = added(patch["recognition/arcface_torch/train_v2.py"])
    assert "weights_only=False" not in new
    assert 'torch.load(os.path.join(cfg.output, "checkpoint_dcq.pt"), map_location="cpu")' in new
    assert "distributed.all_gather_object(rng_per_rank, portable_rng_state())" in new
    assert 'set_portable_rng_state(dict_checkpoint["rng_per_rank"][rank])' in new
    assert "rng_state()" not in new.replace("portable_rng_state()", "")


def test_resume_on_another_world_size_rescales_and_announces_the_schedule(patch):
    """Item 16: the saved scheduler's total_iters is of the old global batch; the patch
    carries the schedule over to this run's (rescale_schedule) and logs what it did."""
    new = added(patch["recognition/arcface_torch/train_v2.py"])
    assert ("global_step, how = rescale_schedule(lr_scheduler, global_step, lr_scheduler.total_iters,\n"
            "                                                cfg.total_step, cfg.warmup_step)") in new
    assert "ranks resumed on" in new and "{how}" in new


def test_bad_steps_are_skipped_logged_and_bounded_by_a_config_entry(patch):
    """Item 17: a non-finite step is skipped on the device (LoopGuard, fused optimizers),
    logged, counted (in the checkpoint too), and stops the run only past
    config.dcq_max_bad_steps; DCQLoss never sees a batch it would refuse."""
    train = patch["recognition/arcface_torch/train_v2.py"]
    new, gone = added(train), removed(train)
    assert "guard = LoopGuard(opt, [backbone, weight_generator], amp if cfg.fp16 else None)" in new
    assert new.count("fused=True") == 2
    assert "problem = guard.check_batch(local_embeddings, local_labels, class_weights, cfg.num_classes)" in new
    assert new.count("kept = guard.kept(loss, local_embeddings, class_weights, problem)") == 2
    assert new.count("guard.step(kept)") == 2
    assert "opt.step()" in gone and "amp.step(opt)" in gone
    assert "if bad_steps > cfg.dcq_max_bad_steps:" in new and '"bad_steps": bad_steps' in new
    assert "config.dcq_max_bad_steps = 10" in added(patch["recognition/arcface_torch/configs/base.py"])


# --------------------------------------------------------------------------- the helpers the patch calls

def test_portable_rng_state_loads_with_torch_load_defaults_and_replays(tmp_path):
    import random

    import numpy as np
    import torch

    from dcq_ops.training.migration import portable_rng_state, set_portable_rng_state
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.standard_normal()  # numpy's cached gaussian is part of its state
    torch.save({"rng": portable_rng_state()}, tmp_path / "c.pt")
    expected = (torch.rand(3), np.random.standard_normal(3), [random.random() for _ in range(3)])
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_portable_rng_state(torch.load(tmp_path / "c.pt")["rng"])  # weights_only=True, torch's default
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.standard_normal(3), expected[1])
    assert [random.random() for _ in range(3)] == expected[2]


class _WarmupPoly:
    """A step schedule with the attributes rescale_schedule sets (arcface_torch's
    PolynomialLRWarmup has them): linear warm-up, then linear decay to 0 at total_iters."""

    @staticmethod
    def make(optimizer, warmup_iters, total_iters):
        import torch

        class WarmupPoly(torch.optim.lr_scheduler.LRScheduler):
            def __init__(self):
                self.warmup_iters, self.total_iters = warmup_iters, total_iters
                super().__init__(optimizer)

            def _get_closed_form_lr(self):
                s, w, t = self.last_epoch, self.warmup_iters, self.total_iters
                if s <= w:
                    return [b * s / w for b in self.base_lrs]
                return [b * (1 - (min(t, s) - w) / (t - w)) for b in self.base_lrs]

            def get_lr(self):
                return self._get_closed_form_lr() if self.last_epoch else [g["lr"] for g in optimizer.param_groups]
        return WarmupPoly()


def test_rescale_schedule_carries_the_share_of_the_run_and_decays_to_the_new_end():
    """2 ranks -> 1: the checkpoint's step 16 of 24 is step 32 of 48, and the learning rate
    reaches 0 at the new end (kept at the old total_iters, it was 0 for the last 16 steps)."""
    import torch

    from dcq_ops.training.migration import rescale_schedule
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    scheduler = _WarmupPoly.make(optimizer, 8, 24)
    for _ in range(16):
        optimizer.step(), scheduler.step()
    step, message = rescale_schedule(scheduler, 16, scheduler.total_iters, 48, 16)
    assert step == 32 and "step 16 of 24 resumes as step 32 of 48" in message
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05) and scheduler.get_last_lr() == [optimizer.param_groups[0]["lr"]]
    lrs = []
    for _ in range(16):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step(), scheduler.step()
    assert all(a > b > 0 for a, b in zip(lrs, lrs[1:])), "decays over every remaining step"
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0, abs=1e-12)
    with pytest.raises(ValueError, match="saved_total and total must be > 0"):
        rescale_schedule(scheduler, 16, 0, 48, 16)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        rescale_schedule(scheduler, -1, 24, 48, 16)
