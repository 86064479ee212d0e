"""Verification metrics on score sets with a known answer; the insightface .bin loader."""

import pickle

import numpy as np
import pytest
import torch
from torch import nn

from dcq_ops.training.verification import (embed, evaluate_bin, insightface_accuracy, kfold_accuracy, kfold_splits, load_bin,
                          pairs_from_labels, tar_at_far, verification_report, write_bin)


def test_kfold_splits_are_sklearn_kfold():
    folds = kfold_splits(23, 10)
    assert [len(f) for f in folds] == [3, 3, 3, 2, 2, 2, 2, 2, 2, 2]
    assert np.array_equal(np.concatenate(folds), np.arange(23))


def test_kfold_accuracy_one_error_per_fold():
    """100 pairs, 10 folds of 10: genuine 0.8, impostor 0.2, and in every fold one
    genuine pair scored 0.1 (below every impostor). Any threshold in (0.2, 0.8)
    is best on the training folds, and each test fold is then 9/10 right."""
    issame = np.tile([True, False], 50)
    scores = np.where(issame, 0.8, 0.2)
    scores[np.arange(10) * 10] = 0.1  # index 10k is genuine (even) and in fold k
    result = kfold_accuracy(scores, issame, n_folds=10)
    assert result["accuracy"] == pytest.approx(0.9)
    assert result["std"] == pytest.approx(0.0)
    assert all(0.2 < t < 0.8 for t in result["thresholds"])


def test_kfold_accuracy_threshold_from_training_folds_only():
    """Fold 0's genuine pairs (0.35) sit below the impostors of the other folds
    (0.4): the training folds choose a threshold near 0.5, which rejects them,
    though a threshold chosen on fold 0 itself (0.325) would be perfect there."""
    issame = np.tile([True, False], 50)
    scores = np.where(issame, 0.6, 0.4)
    scores[:10] = np.where(issame[:10], 0.35, 0.3)
    result = kfold_accuracy(scores, issame, n_folds=10)
    assert result["thresholds"][0] == pytest.approx(0.5)
    assert result["fold_accuracies"][0] == pytest.approx(0.5)
    assert result["fold_accuracies"][1:] == pytest.approx([1.0] * 9)
    assert result["accuracy"] == pytest.approx(0.95)


def test_kfold_accuracy_matches_brute_force_on_random_scores():
    rng = np.random.default_rng(0)
    issame = rng.random(257) < 0.5
    scores = rng.normal(size=257) + 1.2 * issame
    result = kfold_accuracy(scores, issame, n_folds=10)
    expected = []
    for test in kfold_splits(257, 10):
        train = np.setdiff1d(np.arange(257), test)
        candidates = np.sort(np.unique(scores[train]))
        candidates = np.concatenate([[candidates[0] - 1], (candidates[1:] + candidates[:-1]) / 2, [candidates[-1] + 1]])
        accs = [np.mean((scores[train] > t) == issame[train]) for t in candidates]
        t = candidates[int(np.argmax(accs))]
        expected.append(np.mean((scores[test] > t) == issame[test]))
    assert result["accuracy"] == pytest.approx(np.mean(expected))
    # Distances with the insightface grid and "same iff distance < t" give the same as negated scores.
    flipped = kfold_accuracy(-scores, issame, thresholds=np.arange(-5, 5, 0.01), greater_is_same=False)
    direct = kfold_accuracy(scores, issame, thresholds=-np.arange(-5, 5, 0.01))
    assert flipped["accuracy"] == pytest.approx(direct["accuracy"])


def test_tar_at_far_known_answer():
    impostor = np.arange(10_000) / 10_000  # 0, 0.0001, ..., 0.9999
    genuine = np.array([0.5, 0.99895, 0.9995, 1.0])
    scores = np.concatenate([genuine, impostor])
    issame = np.concatenate([np.ones(4, bool), np.zeros(10_000, bool)])
    result = tar_at_far(scores, issame, fars=(1e-3, 1e-4))
    # FAR 1e-3: 10 impostors may pass -> threshold = 11th highest = 0.9989.
    assert result[1e-3]["threshold"] == pytest.approx(0.9989)
    assert result[1e-3]["far"] == pytest.approx(1e-3)
    assert result[1e-3]["tar"] == pytest.approx(0.75)
    # FAR 1e-4: 1 impostor may pass -> threshold 0.9998 -> only 1.0 is accepted.
    assert result[1e-4]["threshold"] == pytest.approx(0.9998)
    assert result[1e-4]["tar"] == pytest.approx(0.25)
    assert result[1e-4]["resolved"]
    small = tar_at_far(scores[:104], issame[:104], fars=(1e-3,))  # 100 impostors: FAR 1e-3 unresolvable
    assert not small[1e-3]["resolved"] and small[1e-3]["far"] == 0.0


def test_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="one entry per pair"):
        kfold_accuracy(np.zeros(20), np.zeros(19, bool))
    with pytest.raises(ValueError, match="finite"):
        kfold_accuracy(np.full(20, np.nan), np.zeros(20, bool))
    with pytest.raises(ValueError, match="n_folds"):
        kfold_accuracy(np.zeros(20), np.zeros(20, bool), n_folds=1)
    with pytest.raises(ValueError, match="genuine and impostor"):
        tar_at_far(np.zeros(5), np.ones(5, bool))
    with pytest.raises(ValueError, match=r"fars must be in \(0, 1\)"):
        tar_at_far(np.zeros(4), np.array([1, 0, 1, 0]), fars=(0.0,))


def test_pairs_and_report_on_perfect_and_random_embeddings():
    labels = torch.arange(50).repeat_interleave(4)
    a, b, issame = pairs_from_labels(labels, 600, seed=1)
    assert issame.sum() == 300
    assert np.array_equal(labels[a] == labels[b], torch.from_numpy(issame))
    assert not np.any(a[issame] == b[issame]), "a genuine pair is two different images"
    perfect = torch.nn.functional.one_hot(labels, 50).float() + 0.01 * torch.randn(200, 50)
    report = verification_report(perfect, labels, num_pairs=600)
    assert report["accuracy"] == 1.0 and report["tar@far=0.001"] == 1.0
    assert report["genuine_pairs_all"] == 50 * 6
    chance = verification_report(torch.randn(200, 64), labels, num_pairs=600)
    assert 0.4 < chance["accuracy"] < 0.62


# --------------------------------------------------------------------------- .bin


def _pairs_images(n_pairs, size, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(2 * n_pairs)]


def test_bin_round_trip(tmp_path):
    pytest.importorskip("PIL")
    images = _pairs_images(5, 16)
    issame = [True, False, True, True, False]
    path = tmp_path / "toy.bin"
    write_bin(path, images, issame)
    (data, flipped), loaded_issame = load_bin(path, image_size=(16, 16))
    assert loaded_issame == issame
    assert data.dtype == torch.uint8 and data.shape == (10, 3, 16, 16)
    for k, image in enumerate(images):
        assert torch.equal(data[k], torch.from_numpy(image).permute(2, 0, 1))
        assert torch.equal(flipped[k], torch.from_numpy(image[:, ::-1].copy()).permute(2, 0, 1))
    # Files written by insightface hold the bytes in other containers too.
    with open(path, "rb") as f:
        bins, flags = pickle.load(f)
    alt = tmp_path / "alt.bin"
    with open(alt, "wb") as f:
        pickle.dump(([bytearray(b) for b in bins], np.array(flags)), f)
    (alt_data, _), alt_issame = load_bin(alt, image_size=(16, 16))
    assert torch.equal(alt_data, data) and alt_issame == issame


def test_bin_resizes_short_side_and_rejects_bad_files(tmp_path):
    pytest.importorskip("PIL")
    path = tmp_path / "big.bin"
    write_bin(path, _pairs_images(2, 24), [True, False])
    (data, _), _ = load_bin(path, image_size=(12, 12))
    assert data.shape == (4, 3, 12, 12)
    bad = tmp_path / "bad.bin"
    with open(bad, "wb") as f:
        pickle.dump(([b"x"] * 3, [True, False]), f)
    with pytest.raises(ValueError, match="2 images per pair"):
        load_bin(bad)
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"not a pickle")
    with pytest.raises(ValueError, match="not an insightface .bin"):
        load_bin(junk)


class MeanColour(nn.Module):
    """A toy backbone: the mean RGB of the image, plus a left-right asymmetric
    feature that flip TTA cancels."""

    def forward(self, x):
        colour = x.mean(dim=(2, 3))
        half = x.shape[-1] // 2
        asym = (x[..., :half].mean(dim=(1, 2, 3)) - x[..., half:].mean(dim=(1, 2, 3))).unsqueeze(1)
        return torch.cat([colour, 10 * asym], dim=1)


def test_evaluate_bin_flip_tta_known_answer(tmp_path):
    """Genuine pairs share a colour; impostor pairs have distinct colours; half
    the images carry a strong left/right gradient that only flip TTA removes.
    With flip TTA the pairs separate perfectly; without it they do not."""
    pytest.importorskip("PIL")
    rng = np.random.default_rng(0)
    palette = [np.array(c) for c in ([200, 30, 30], [30, 200, 30], [30, 30, 200], [200, 200, 30], [30, 200, 200])]
    images, issame = [], []
    ramp = np.linspace(-60, 60, 16).reshape(1, 16, 1)
    for k in range(60):
        same = k % 2 == 0
        first = int(rng.integers(5))
        c1 = palette[first]
        c2 = c1 if same else palette[(first + 1 + int(rng.integers(4))) % 5]
        for colour, sign in ((c1, 1), (c2, -1 if same else 1)):
            image = np.clip(colour.reshape(1, 1, 3) + sign * ramp + np.zeros((16, 16, 3)), 0, 255).astype(np.uint8)
            images.append(image)
        issame.append(same)
    path = tmp_path / "colours.bin"
    write_bin(path, images, issame)
    result = evaluate_bin(MeanColour(), path, batch_size=7)
    assert result["accuracy"] == 1.0
    assert result["accuracy_noflip"] < 0.9
    assert result["pairs"] == 60 and result["xnorm"] > 0
    # The same numbers from the pieces: embeddings of both copies summed, insightface's thresholds.
    (data, flipped), flags = load_bin(path, image_size=(16, 16))
    summed = embed(MeanColour(), data) + embed(MeanColour(), flipped)
    assert insightface_accuracy(summed.numpy(), flags)["accuracy"] == 1.0


def test_embed_normalises_uint8_and_restores_mode():
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.BatchNorm1d(3)).train()
    images = torch.randint(0, 256, (5, 3, 2, 2), dtype=torch.uint8)
    out = embed(model, images, batch_size=2)
    model.eval()
    torch.testing.assert_close(out, model((images.float() / 255 - 0.5) / 0.5))
    assert embed(model.train(), images).shape == (5, 3) and model.training


def test_insightface_accuracy_matches_a_literal_threshold_sweep():
    """The protocol as insightface's calculate_roc spells it: squared distances of
    normalised embeddings, thresholds 0..3.99 step 0.01, "same" iff distance < t,
    the first best threshold of the training folds."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(150, 8))
    second = np.where(rng.random((150, 1)) < 0.5, base + 0.8 * rng.normal(size=(150, 8)), rng.normal(size=(150, 8)))
    embeddings = np.empty((300, 8))
    embeddings[0::2], embeddings[1::2] = base, second
    issame = np.linalg.norm(second - base, axis=1) < np.linalg.norm(base, axis=1)  # any fixed labelling works
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    dist = np.sum(np.square(e[0::2] - e[1::2]), 1)
    thresholds = np.arange(0, 4, 0.01)
    accs = []
    for test in kfold_splits(150, 10):
        train = np.setdiff1d(np.arange(150), test)
        train_acc = [np.mean(np.less(dist[train], t) == issame[train]) for t in thresholds]
        t = thresholds[int(np.argmax(train_acc))]
        accs.append(np.mean(np.less(dist[test], t) == issame[test]))
    result = insightface_accuracy(embeddings, issame)
    assert result["accuracy"] == pytest.approx(np.mean(accs), abs=1e-12)
    assert result["std"] == pytest.approx(np.std(accs), abs=1e-12)
