"""Two-view data: same-identity pairs, singletons, determinism, image folders; the synthetic set."""

import os

import numpy as np
import pytest
import torch

from dcq_ops.training.data import FlipShift, TwoViewBatchSampler, TwoViewDataset, batch_loader, counter_uniform
from dcq_ops.training.sources import ImageFolder, TensorImages
from dcq_ops.training.synthetic import SyntheticConfig, image_counts, make_synthetic

# Identity sizes 3, 1, 2, 1, 5, 2: two singletons (identities 1 and 3).
LABELS = torch.tensor([0, 4, 0, 1, 2, 4, 4, 0, 3, 2, 4, 4, 5, 5])


def index_images(n, size=6):
    """Image i is the constant i (constant images survive flips and reflect-padded shifts)."""
    return torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, size, size).clone()


def test_pairs_are_same_identity_and_cover_singletons():
    dataset = TwoViewDataset(index_images(len(LABELS)), LABELS, seed=3)
    sampler = TwoViewBatchSampler(len(LABELS), 4, seed=3, drop_last=False)
    counts = torch.bincount(LABELS)
    partners = {}
    for epoch in range(6):
        seen = []
        for keys in sampler.iter_epoch(epoch):
            a, b, labels = dataset[keys]
            index_a = a[:, 0, 0, 0].long()
            index_b = b[:, 0, 0, 0].long()
            # Every pixel of a view is its source image's index.
            assert (a == a[:, :1, :1, :1]).all() and (b == b[:, :1, :1, :1]).all()
            assert torch.equal(LABELS[index_a], labels) and torch.equal(LABELS[index_b], labels)
            for i, j in zip(index_a.tolist(), index_b.tolist()):
                if counts[LABELS[i]] > 1:
                    assert i != j, "an identity with several images must pair two different images"
                else:
                    assert i == j, "a singleton pairs with (an augmentation of) itself"
                partners.setdefault(i, set()).add(j)
            seen += index_a.tolist()
        assert sorted(seen) == list(range(len(LABELS))), "an epoch visits every image once, singletons included"
    # Over several epochs the partner varies among the other images of the identity.
    for i in range(len(LABELS)):
        others = {j for j in range(len(LABELS)) if LABELS[j] == LABELS[i] and j != i}
        assert partners[i] <= (others or {i})
    assert len(partners[1]) >= 3  # identity 4 has 5 images: its partners vary across 6 epochs


def test_partner_is_uniform_among_the_others():
    labels = torch.tensor([0] * 4 + [1])
    dataset = TwoViewDataset(index_images(5), labels, seed=0)
    draws = np.stack([dataset.partner(np.arange(4), epoch) for epoch in range(3000)])
    for i in range(4):
        freq = np.bincount(draws[:, i], minlength=5) / 3000
        assert freq[i] == 0 and freq[4] == 0
        np.testing.assert_allclose(freq[[j for j in range(4) if j != i]], 1 / 3, atol=0.04)


def test_singleton_views_are_independent_augmentations():
    images = torch.randn(1, 3, 8, 8)
    dataset = TwoViewDataset(images, torch.tensor([0]), seed=0, augment=FlipShift(0.5, 2))
    differ = sum(not torch.equal(*dataset[(e, 0)][:2]) for e in range(20))
    assert differ >= 15  # 50 flip x shift combinations: two views rarely coincide
    plain = TwoViewDataset(images, torch.tensor([0]), augment=None)
    a, b, _ = plain[0]
    assert torch.equal(a, images[0]) and torch.equal(b, images[0])


def test_items_are_a_pure_function_of_seed_epoch_index():
    images = torch.randn(len(LABELS), 3, 8, 8)
    d1 = TwoViewDataset(images, LABELS, seed=7)
    d2 = TwoViewDataset(images, LABELS, seed=7)
    batch = d1.get_batch([3, 5, 9], epoch=2)
    single = [d2[(2, i)] for i in (3, 5, 9)]  # one by one, another object
    for k in range(3):
        assert torch.equal(batch[0][k], single[k][0]) and torch.equal(batch[1][k], single[k][1])
    other = TwoViewDataset(images, LABELS, seed=8).get_batch([3, 5, 9], epoch=2)
    assert not torch.equal(batch[0], other[0]) or not torch.equal(batch[1], other[1])


def test_flip_shift_matches_a_hand_computation():
    x = torch.randn(2, 3, 8, 8)
    # Image 0: no flip, crop offset (2, 2) = no shift. Image 1: flip, dx = 0 (2 px right), dy = 4 (2 px up).
    u = np.array([[0.9, 0.1], [0.5, 0.0], [0.5, 0.99]])
    y = FlipShift(0.5, 2)(x, u)
    assert torch.equal(y[0], x[0])
    assert torch.equal(y[1][:, :6, 2:], x[1].flip(-1)[:, 2:, :6])
    # Reflect padding: the two new columns mirror the flipped image's columns 2 and 1.
    assert torch.equal(y[1][:, :6, 0], x[1].flip(-1)[:, 2:, 2]) and torch.equal(y[1][:, :6, 1], x[1].flip(-1)[:, 2:, 1])


def test_counter_uniform_is_uniform_and_stream_separated():
    u = counter_uniform(0, 0, np.arange(200_000), 0)
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.005 and abs(u.var() - 1 / 12) < 0.002
    v = counter_uniform(0, 0, np.arange(200_000), 1)
    assert abs(np.corrcoef(u, v)[0, 1]) < 0.01
    assert np.array_equal(u[5:10], counter_uniform(0, 0, np.arange(5, 10), 0))


def test_sampler_shards_ranks_disjointly_and_resumes_mid_epoch():
    n, batch, world = 103, 5, 3
    shards = [TwoViewBatchSampler(n, batch, seed=1, rank=r, world_size=world) for r in range(world)]
    assert all(len(s) == n // world // batch for s in shards)
    epoch_indices = [[i for keys in s.iter_epoch(4) for _, i in keys] for s in shards]
    flat = sum(epoch_indices, [])
    assert len(flat) == len(set(flat)) == world * len(shards[0]) * batch
    full = list(shards[0].iter_epoch(4))
    assert list(shards[0].iter_epoch(4, start_batch=2)) == full[2:]
    assert [i for _, i in full[0]] != [i for _, i in next(shards[0].iter_epoch(5))]


def test_batch_loader_with_workers_matches_in_process():
    images = torch.randn(len(LABELS), 3, 8, 8)
    dataset = TwoViewDataset(images, LABELS, seed=2)
    sampler = TwoViewBatchSampler(len(LABELS), 4, seed=2)
    local = list(batch_loader(dataset, sampler, epoch=1, start_batch=1))
    workers = list(batch_loader(dataset, sampler, epoch=1, start_batch=1, num_workers=2))
    assert len(local) == len(workers) == len(sampler) - 1
    for x, y in zip(local, workers):
        assert all(torch.equal(p, q) for p, q in zip(x, y))


def test_image_folder_reads_identities(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    arrays = {}
    for name, count in (("alice", 2), ("bob", 1), ("carol", 3)):
        (tmp_path / name).mkdir()
        for k in range(count):
            array = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
            Image.fromarray(array).save(tmp_path / name / f"{k}.png")
            arrays[(name, k)] = array
    (tmp_path / "notes.txt").write_text("not an identity folder")
    folder = ImageFolder(tmp_path)
    assert folder.classes == ["alice", "bob", "carol"]
    assert folder.labels.tolist() == [0, 0, 1, 2, 2, 2]
    dataset = TwoViewDataset(folder, augment=None)
    a, b, labels = dataset.get_batch([0, 2, 3])
    expected = torch.from_numpy(arrays[("alice", 0)]).permute(2, 0, 1).float()
    torch.testing.assert_close(a[0], (expected / 255 - 0.5) / 0.5, rtol=0, atol=0)
    torch.testing.assert_close(b[0], dataset.get_batch([1])[0][0], rtol=0, atol=0)  # alice/0's partner: alice/1
    torch.testing.assert_close(b[1], a[1])  # bob is a singleton: his own image
    assert labels.tolist() == [0, 1, 2]
    assert ImageFolder(tmp_path, image_size=(8, 8)).load(np.array([4])).shape == (1, 3, 8, 8)


def test_bad_inputs_raise_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="images must be"):
        TensorImages(torch.zeros(3, 8, 8), torch.zeros(3, dtype=torch.long))
    with pytest.raises(TypeError, match="labels must be an integer"):
        TensorImages(torch.zeros(3, 1, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="one entry per image"):
        TensorImages(torch.zeros(3, 1, 8, 8), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels must be >= 0"):
        TensorImages(torch.zeros(2, 1, 8, 8), torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="not a directory"):
        ImageFolder(tmp_path / "missing")
    with pytest.raises(ValueError, match="holds no images"):
        ImageFolder(tmp_path)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        TwoViewBatchSampler(10, 0)
    with pytest.raises(ValueError, match="rank must be in"):
        TwoViewBatchSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(IndexError, match="indices must be in"):
        TwoViewDataset(torch.zeros(2, 1, 4, 4), torch.tensor([0, 1])).get_batch([2])


# --------------------------------------------------------------------------- synthetic set


SMALL = dict(num_identities=300, num_eval_identities=40, probe_identities=30, image_size=16, seed=5)


def test_synthetic_is_deterministic_and_seeded():
    a, b = make_synthetic(**SMALL), make_synthetic(**SMALL)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.eval_images, b.eval_images)
    assert torch.equal(a.probes["tail"][0], b.probes["tail"][0])
    c = make_synthetic(**{**SMALL, "seed": 6})
    assert not torch.equal(a.counts, c.counts)
    # Changing one split's size leaves the training set as it was.
    d = make_synthetic(**{**SMALL, "num_eval_identities": 10})
    assert torch.equal(a.train_images, d.train_images)


def test_synthetic_is_long_tailed_with_marked_tail():
    data = make_synthetic(**SMALL)
    counts = data.counts
    assert torch.equal(torch.bincount(data.train_labels, minlength=300), counts)
    assert (counts < 10).float().mean() > 0.7, "most identities have fewer than 10 images (MegaFace2-like)"
    assert counts.max() >= 5 * counts.float().median(), "a long head"
    assert torch.equal(data.is_tail, counts <= data.config.tail_max_images)
    tail_images, tail_labels = data.probes["tail"]
    assert data.is_tail[tail_labels].all() and not data.is_tail[data.probes["head"][1]].any()
    assert tail_images.shape[1:] == (3, 16, 16) and data.train_images.abs().max() <= 1
    assert data.summary()["tail_identities"] == int(data.is_tail.sum())


def test_synthetic_identity_is_recognisable_from_pixels():
    """Same-identity images are closer than different-identity ones on average
    (the data carries identity), but not trivially (nuisance matters)."""
    data = make_synthetic(**SMALL)
    x = data.eval_images.flatten(1)
    x = (x - x.mean(0)) / x.std(0)
    x = torch.nn.functional.normalize(x, dim=1)
    sim = x @ x.t()
    same = data.eval_labels.view(-1, 1) == data.eval_labels.view(1, -1)
    off = ~torch.eye(len(x), dtype=torch.bool)
    genuine, impostor = sim[same & off].mean(), sim[~same].mean()
    assert genuine > impostor + 0.1
    assert sim[same & off].min() < sim[~same].max(), "raw pixels must not separate identities perfectly"


def test_image_counts_follow_the_config():
    config = SyntheticConfig(num_identities=5000, median_images=6, min_images=2, max_images=40)
    counts = image_counts(config)
    assert counts.min() >= 2 and counts.max() <= 40
    assert abs(counts.float().median().item() - 6) <= 1


def test_synthetic_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_identities must be a positive int"):
        SyntheticConfig(num_identities=0)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        SyntheticConfig(channels=2)
    with pytest.raises(ValueError, match="min_images"):
        SyntheticConfig(min_images=5, max_images=3)


# --------------------------------------------------------------------------- issue 18: data paths and broken files


def test_check_data_path_names_the_path_and_what_is_expected(tmp_path):
    from dcq_ops.training.sources import check_data_path
    Image = pytest.importorskip("PIL.Image")
    from dcq_ops.training.recordio import pack_folder
    faces = tmp_path / "faces"
    (faces / "ann").mkdir(parents=True)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(faces / "ann" / "0.png")
    assert check_data_path(faces) is None and check_data_path(str(faces)) is None
    pack_folder(faces, tmp_path / "data" / "train")
    assert check_data_path(tmp_path / "data") is None
    assert check_data_path(tmp_path / "data" / "train.rec") is None

    with pytest.raises(ValueError, match=r"data path '.*nowhere' does not exist: expected an image folder"):
        check_data_path(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"is a file but not a \.rec \(an \.idx is read through its \.rec: pass "
                                         r".*train\.rec\)"):
        check_data_path(tmp_path / "data" / "train.idx")
    os.remove(tmp_path / "data" / "train.idx")
    for path in (tmp_path / "data", tmp_path / "data" / "train.rec"):
        with pytest.raises(ValueError, match=r"found .*train\.rec but not .*train\.idx beside it.*"
                                             r"python -m dcq_ops\.training\.recordio index"):
            check_data_path(path)
    (tmp_path / "empty" / "ann").mkdir(parents=True)
    with pytest.raises(ValueError, match=r"'.*empty' is a folder with 1 sub-folders, none holding an image"):
        check_data_path(tmp_path / "empty")
    (tmp_path / "flat").mkdir()
    with pytest.raises(ValueError, match=r"'.*flat' is a folder with no sub-folders"):
        check_data_path(tmp_path / "flat")
    os.rename(tmp_path / "data" / "train.rec", tmp_path / "flat" / "faces.rec")
    with pytest.raises(ValueError, match=r"holds faces\.rec but no train\.rec: pass the \.rec file itself"):
        check_data_path(tmp_path / "flat")


def test_image_folder_names_an_unreadable_file(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    from dcq_ops.training.images import ImageDecodeError
    (tmp_path / "ann").mkdir()
    Image.fromarray(np.full((8, 8, 3), 7, np.uint8)).save(tmp_path / "ann" / "0.png")
    good = (tmp_path / "ann" / "0.png").read_bytes()
    (tmp_path / "ann" / "1.png").write_bytes(good[: len(good) // 2])  # truncated: Pillow opens it, then fails
    (tmp_path / "ann" / "2.jpg").write_bytes(b"\0" * 64)  # not an image at all
    folder = ImageFolder(tmp_path)
    assert folder.load(np.array([0])).shape == (1, 3, 8, 8)
    for index, name in ((1, "1.png"), (2, "2.jpg")):
        with pytest.raises(ImageDecodeError, match=rf"ann/{name} \(image {index} of .*\): cannot decode the image"):
            folder.load(np.array([0, index]))
    with pytest.raises(ValueError, match="not a directory: it does not exist"):
        ImageFolder(tmp_path / "missing")


def test_importing_the_package_does_not_import_recordio():
    """`python -m dcq_ops.training.recordio` warns when the package imported the module first."""
    import subprocess
    import sys
    code = ("import sys, dcq_ops.training, dcq_ops.training.data, dcq_ops.training.trainer, dcq_ops.training.cli; "
            "print('dcq_ops.training.recordio' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
