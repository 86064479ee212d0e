"""The arcface_torch migration: the patch is a well-formed git patch of the
files it names, makes the changes the guide describes, and the guide and the
example name the upstream commit they were written against.

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
