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


# --------------------------------------------------------------------------- issue 18: the eval command


def _toy_bin(path, size, n_pairs=10, seed=3):
    """Genuine pairs: an image and a slightly noisy copy; impostor pairs: two random images."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for k in range(n_pairs):
        first = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        same = k % 2 == 0
        second = (np.clip(first + rng.integers(-8, 9, first.shape), 0, 255).astype(np.uint8) if same
                  else rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
        images += [first, second]
        issame.append(same)
    write_bin(path, images, issame)
    return path


def _iresnet(depth=18, embedding_size=32, image_size=112, seed=0):
    from dcq_ops.training.backbones import IResNet
    torch.manual_seed(seed)
    model = IResNet(depth, embedding_size=embedding_size, image_size=image_size).eval()
    for m in model.modules():  # running statistics that a missed buffer would show
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2.0)
    return model


def test_eval_command_reads_an_arcface_torch_backbone_pth(tmp_path, capsys):
    """A plain IResNet-18 state dict at arcface_torch's 112x112: the command infers
    r18 and the embedding size and reports what evaluating the model directly gives."""
    pytest.importorskip("PIL")
    from dcq_ops.training.evaluate import evaluate, main
    model = _iresnet()
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    bin_path = _toy_bin(tmp_path / "toy.bin", 112)
    results = evaluate(["--checkpoint", str(tmp_path / "backbone.pth"), "--bin", str(bin_path),
                        "--batch-size", "8", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "state dict, iresnet18, embedding 32, input 112x112" in out
    direct = evaluate_bin(model, load_bin(bin_path, (112, 112)), 8)
    assert results == {"toy.bin": direct}
    assert direct["pairs"] == 10 and direct["xnorm"] > 0


def test_eval_command_in_a_subprocess_exits_0(tmp_path):
    """``python -m dcq_ops.eval`` (exit status 0, no warnings) on a 32x32 r18: the
    input size comes from the FC's shape."""
    pytest.importorskip("PIL")
    import json
    import subprocess
    import sys
    model = _iresnet(image_size=32, embedding_size=16, seed=1)
    torch.save(model.state_dict(), tmp_path / "backbone.pth")
    bin_path = _toy_bin(tmp_path / "toy.bin", 32)
    run = subprocess.run([sys.executable, "-m", "dcq_ops.eval", "--checkpoint", str(tmp_path / "backbone.pth"),
                          "--bin", str(bin_path), "--device", "cpu"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "Warning" not in run.stderr, run.stderr
    line = next(line for line in run.stdout.splitlines() if line.startswith("toy.bin: "))
    reported = json.loads(line[len("toy.bin: "):])
    direct = evaluate_bin(model, load_bin(bin_path, (32, 32)))
    assert reported.keys() == direct.keys()
    for key, value in direct.items():  # another process, maybe another thread count: float sums may differ
        assert reported[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    for bad in (["--checkpoint", str(tmp_path / "none.pth"), "--bin", str(bin_path)],
                ["--checkpoint", str(tmp_path / "backbone.pth"), "--bin", str(tmp_path / "none.bin")]):
        failed = subprocess.run([sys.executable, "-m", "dcq_ops.eval", *bad], capture_output=True, text=True,
                                timeout=300)
        assert failed.returncode == 2 and "no such file" in failed.stderr, failed.stderr


def _exit_message(capsys, argv):
    from dcq_ops.training.evaluate import evaluate
    with pytest.raises(SystemExit) as caught:
        evaluate(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_eval_command_errors_exit_2_with_a_reason(tmp_path, capsys):
    pytest.importorskip("PIL")
    from dcq_ops.training.backbones import SmallCNN
    bin_path = str(_toy_bin(tmp_path / "toy.bin", 16))
    r18 = tmp_path / "r18.pth"
    torch.save(_iresnet(image_size=16, embedding_size=8).state_dict(), r18)
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "none.pth"), "--bin", bin_path])
    assert "--checkpoint" in err and "none.pth: no such file" in err
    err = _exit_message(capsys, ["--checkpoint", str(r18), "--bin", bin_path, "--bin", str(tmp_path / "x.bin")])
    assert "--bin" in err and "x.bin: no such file" in err
    err = _exit_message(capsys, ["--checkpoint", str(r18), "--bin", bin_path, "--network", "r50"])
    assert "(2, 2, 2, 2) blocks per layer (r18), but --network r50 has (3, 4, 14, 3)" in err
    err = _exit_message(capsys, ["--checkpoint", str(r18), "--bin", bin_path, "--network", "r9"])
    assert "invalid choice" in err
    err = _exit_message(capsys, ["--checkpoint", str(r18), "--bin", bin_path, "--embedding-size", "16"])
    assert "embedding size 8, but --embedding-size says 16" in err
    torch.save(SmallCNN(embedding_size=8, image_size=16).state_dict(), tmp_path / "small.pth")
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "small.pth"), "--bin", bin_path])
    assert "cannot infer the network from the state dict's keys" in err and "pass --network r18|r34" in err
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "small.pth"), "--bin", bin_path, "--network", "r18"])
    assert "cannot infer the embedding size (no features.weight or fc.weight): pass --embedding-size" in err
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "small.pth"), "--bin", bin_path, "--network", "r18",
                                 "--embedding-size", "8"])
    assert "does not load into IResNet-18" in err and "missing keys bn1.bias" in err and "in all)" in err
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "junk.pth"), "--bin", bin_path])
    assert "junk.pth: cannot be read by torch.load" in err
    torch.save({"epoch": 3}, tmp_path / "other.pt")
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "other.pt"), "--bin", bin_path])
    assert "expected a dcq_ops.train checkpoint or a state dict" in err


def test_load_model_reads_train_checkpoints_and_arcface_torch_wrappers(tmp_path, capsys):
    """A dcq_ops.train checkpoint (read as load_backbone reads it; it holds
    numpy RNG states, which the safe unpickler refuses), arcface_torch's
    checkpoint_gpu_0.pt (state_dict_backbone) and a DDP-prefixed state dict."""
    pytest.importorskip("PIL")
    import dataclasses
    from dcq_ops.training.backbones import build_backbone
    from dcq_ops.training.evaluate import evaluate, load_model
    from dcq_ops.training import TrainConfig, load_backbone
    from dcq_ops.training.checkpoint import CHECKPOINT_FORMAT
    torch.manual_seed(2)
    config = TrainConfig(backbone="small_cnn", width=4, embedding_size=8, image_size=16)
    small = build_backbone("small_cnn", embedding_size=8, image_size=16, width=4).eval()
    path = tmp_path / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "config": dataclasses.asdict(config), "step": 5, "world_size": 1,
                "backbone": small.state_dict(), "rng": {"numpy": np.random.get_state()}}, path)
    model, info = load_model(path)
    assert info == {"kind": "dcq_ops.train checkpoint", "network": "small_cnn", "embedding_size": 8,
                    "image_size": 16}
    x = torch.randn(3, 3, 16, 16)
    torch.testing.assert_close(model(x), load_backbone(str(path))(x), rtol=0, atol=0)
    bin_path = _toy_bin(tmp_path / "toy.bin", 16)
    results = evaluate(["--checkpoint", str(path), "--bin", str(bin_path), "--device", "cpu"])
    assert results == {"toy.bin": evaluate_bin(load_backbone(str(path)), load_bin(bin_path, (16, 16)))}
    err = _exit_message(capsys, ["--checkpoint", str(path), "--bin", str(bin_path), "--network", "r18"])
    assert "checkpoint of backbone 'small_cnn' (its config), but --network r18" in err

    r18 = _iresnet(image_size=16, embedding_size=8)
    x = torch.randn(2, 3, 16, 16)
    torch.save({"epoch": 1, "state_dict_backbone": r18.state_dict(), "state_dict_softmax_fc": {}},
               tmp_path / "checkpoint_gpu_0.pt")
    torch.save({f"module.{k}": v for k, v in r18.state_dict().items()}, tmp_path / "ddp.pth")
    for name in ("checkpoint_gpu_0.pt", "ddp.pth"):
        model, info = load_model(tmp_path / name)
        assert info == {"kind": "state dict", "network": "iresnet18", "embedding_size": 8, "image_size": 16}
        torch.testing.assert_close(model(x), r18(x), rtol=0, atol=0)


def test_eval_main_returns_none_so_sys_exit_gives_0(tmp_path):
    pytest.importorskip("PIL")
    import dcq_ops.eval
    torch.save(_iresnet(image_size=16, embedding_size=8).state_dict(), tmp_path / "r18.pth")
    bin_path = _toy_bin(tmp_path / "toy.bin", 16)
    assert dcq_ops.eval.main(["--checkpoint", str(tmp_path / "r18.pth"), "--bin", str(bin_path)]) is None


def test_a_bin_image_that_does_not_decode_names_the_file(tmp_path):
    pytest.importorskip("PIL")
    from dcq_ops.training.images import ImageDecodeError
    path = _toy_bin(tmp_path / "toy.bin", 8, n_pairs=2)
    with open(path, "rb") as f:
        images, issame = pickle.load(f)
    images[3] = b"\0" * 40
    with open(path, "wb") as f:
        pickle.dump((images, issame), f)
    with pytest.raises(ImageDecodeError, match=r"toy\.bin: image 3 \(pair 1\): cannot decode the image "
                                               r"\(40 bytes, starting 00 00"):
        load_bin(path, (8, 8))


def test_eval_command_refuses_bad_sets_checkpoints_and_devices_with_exit_2(tmp_path, capsys):
    """Each of these was a traceback (exit 1), some after other sets were evaluated:
    now a usage error naming the file or the flag, before any set is evaluated."""
    pytest.importorskip("PIL")
    import dataclasses
    from dcq_ops.training import TrainConfig
    from dcq_ops.training.backbones import build_backbone
    from dcq_ops.training.checkpoint import CHECKPOINT_FORMAT
    good = str(_toy_bin(tmp_path / "toy.bin", 16))
    r18 = tmp_path / "r18.pth"
    torch.save(_iresnet(image_size=16, embedding_size=8).state_dict(), r18)
    checkpoint = ["--checkpoint", str(r18), "--device", "cpu"]

    def bad_bin(name, content):
        with open(tmp_path / name, "wb") as f:
            pickle.dump(content, f)
        return str(tmp_path / name)

    few = str(_toy_bin(tmp_path / "few.bin", 16, n_pairs=3))
    cases = [
        (["--bin", few], ["--bin", "few.bin", "holds 3 pairs", "at least 10"]),
        (["--bin", bad_bin("none.bin", ([], []))], ["--bin", "none.bin", "holds 0 pairs"]),
        (["--bin", bad_bin("int.bin", 7)], ["--bin", "int.bin", "is not an insightface .bin"]),
        (["--bin", bad_bin("items.bin", ([1, 2] * 10, [True] * 10))], ["--bin", "items.bin", "not an insightface .bin",
                                                                     "encoded bytes"]),
        (["--bin", good, "--bin", str(tmp_path / "." / "toy.bin")], ["--bin", "is given twice"]),
        (["--bin", good, "--device", "meta"], ["--device meta", "must be auto, cpu, cuda or cuda:N"]),
    ]
    if not torch.cuda.is_available():
        cases.append((["--bin", good, "--device", "cuda"], ["--device cuda", "CUDA is not available"]))
    for args, words in cases:
        err = _exit_message(capsys, checkpoint + args)
        assert all(w in err for w in words) and "Traceback" not in err, (args, err)

    # Checkpoints: NaN weights, a dcq_ops.train checkpoint with missing keys or an unknown backbone.
    nan = _iresnet(image_size=16, embedding_size=8).state_dict()
    nan["fc.weight"][0, 0] = float("nan")
    torch.save(nan, tmp_path / "nan.pth")
    err = _exit_message(capsys, ["--checkpoint", str(tmp_path / "nan.pth"), "--bin", good])
    assert "nan.pth: the weights hold NaN or infinite values (fc.weight)" in err, err
    config = dataclasses.asdict(TrainConfig(backbone="small_cnn", width=4, embedding_size=8, image_size=16))
    small = build_backbone("small_cnn", embedding_size=8, image_size=16, width=4).state_dict()
    missing = dict(list(small.items())[:-2])
    for name, state, words in (
            ("missing.pt", {"config": config, "backbone": missing}, ["does not load into 'small_cnn'", "missing keys"]),
            ("unknown.pt", {"config": {**config, "backbone": "resnet9"}, "backbone": small},
             ["backbone 'resnet9' (its config), which is none of"]),
            ("nobackbone.pt", {"config": config, "backbone": None}, ["'backbone' is not a state dict"])):
        torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "world_size": 1, **state}, tmp_path / name)
        err = _exit_message(capsys, ["--checkpoint", str(tmp_path / name), "--bin", good])
        assert all(w in err for w in words) and "Traceback" not in err, (name, err)
