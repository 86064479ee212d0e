"""Face verification: 10-fold accuracy (the LFW protocol), TAR at FAR, and
insightface's ``.bin`` evaluation sets (LFW, CFP-FP, AgeDB-30, ...) evaluated
as arcface_torch's ``eval/verification.py`` does.

Conventions: ``scores`` are similarities (higher = more likely the same
identity) unless ``greater_is_same=False`` (distances). ``issame`` is a boolean
array, one per pair.

Command line: ``python -m dcq_ops.eval --checkpoint run/checkpoint.pt --bin lfw.bin [--bin cfp_fp.bin ...]``
(a dcq_ops.train checkpoint, or an arcface_torch ``backbone.pth``; see
:mod:`dcq_ops.training.evaluate`).
"""

from __future__ import annotations

import io
import os
import pickle
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dcq_ops.atomic_write import atomic_write
from dcq_ops.validation import check_int, check_positive_int

DEFAULT_FARS = (1e-3, 1e-4)


def _as_numpy_pairs(scores, issame) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores.detach().cpu() if isinstance(scores, torch.Tensor) else scores, dtype=np.float64).reshape(-1)
    issame = np.asarray(issame.detach().cpu() if isinstance(issame, torch.Tensor) else issame).reshape(-1)
    if issame.dtype != bool:
        if not np.isin(issame, (0, 1)).all():
            raise ValueError("issame must be booleans (or 0/1), got other values")
        issame = issame.astype(bool)
    if scores.shape != issame.shape:
        raise ValueError(f"scores and issame must have one entry per pair, got {scores.size} and {issame.size}")
    if scores.size == 0:
        raise ValueError("scores must hold at least one pair, got none")
    if not np.isfinite(scores).all():
        raise ValueError("scores must be finite, got NaN or infinite values")
    return scores, issame


def kfold_splits(n: int, n_folds: int) -> list[np.ndarray]:
    """Contiguous, unshuffled folds, the first ``n % n_folds`` one longer
    (sklearn's KFold(shuffle=False), which insightface uses): test indices per fold."""
    check_int("n_folds", n_folds, minimum=2)
    if n < n_folds:
        raise ValueError(f"need at least n_folds = {n_folds} pairs, got {n}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    return [np.arange(bounds[k], bounds[k + 1]) for k in range(n_folds)]


def accuracy_at_thresholds(scores: np.ndarray, issame: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """Accuracy of "same iff score > t" for every t (O((n + T) log n), not O(n T))."""
    positives, negatives = np.sort(scores[issame]), np.sort(scores[~issame])
    true_accepts = positives.size - np.searchsorted(positives, thresholds, side="right")  # #pos > t
    true_rejects = np.searchsorted(negatives, thresholds, side="right")                  # #neg <= t
    return (true_accepts + true_rejects) / scores.size


def kfold_accuracy(scores, issame, n_folds: int = 10, thresholds=None, greater_is_same: bool = True) -> dict:
    """The LFW protocol: for each of ``n_folds`` contiguous folds, the threshold
    that maximises accuracy on the other folds (first maximum in ``thresholds``
    order) is applied to the fold. Returns the mean and standard deviation of
    the fold accuracies, the per-fold accuracies and thresholds.

    ``thresholds`` default to every midpoint between consecutive distinct scores
    of the training folds (plus one below and one above them): the exact best
    threshold on the training folds.
    With ``greater_is_same=False`` scores are distances and a pair is "same"
    iff distance < threshold (insightface's rule).

    Parameters
    ----------
    scores : array-like
        [N] finite pair scores (or distances).
    issame : array-like
        [N] bool: whether pair i is of one identity.
    n_folds : int
        The number of folds (>= 2).
    thresholds : array-like, optional
        The candidate thresholds (default: see above).
    greater_is_same : bool
        Whether a higher score means "same" (False: scores are distances).

    Returns
    -------
    dict
        {"accuracy", "std", "fold_accuracies", "thresholds"}.
    """
    scores, issame = _as_numpy_pairs(scores, issame)
    sign = 1.0 if greater_is_same else -1.0
    if thresholds is not None:
        thresholds = np.asarray(thresholds, dtype=np.float64).reshape(-1)
        if thresholds.size == 0 or not np.isfinite(thresholds).all():
            raise ValueError("thresholds must be a non-empty array of finite numbers")
    fold_accuracies, fold_thresholds = [], []
    for test in kfold_splits(scores.size, n_folds):
        train = np.setdiff1d(np.arange(scores.size), test, assume_unique=True)
        candidates = thresholds
        if candidates is None:
            # From the training folds only: the chosen threshold must not depend on the test fold.
            distinct = np.unique(scores[train])
            candidates = np.concatenate([[distinct[0] - 1.0], (distinct[:-1] + distinct[1:]) / 2,
                                         [distinct[-1] + 1.0]])
        accuracy = accuracy_at_thresholds(sign * scores[train], issame[train], sign * candidates)
        best = int(np.argmax(accuracy))  # the first maximum, as insightface
        fold_thresholds.append(float(candidates[best]))
        fold_accuracies.append(float(accuracy_at_thresholds(sign * scores[test], issame[test],
                                                            sign * candidates[best:best + 1])[0]))
    return {"accuracy": float(np.mean(fold_accuracies)), "std": float(np.std(fold_accuracies)),
            "fold_accuracies": fold_accuracies, "thresholds": fold_thresholds}


def tar_at_far(scores, issame, fars: Sequence[float] = DEFAULT_FARS) -> dict:
    """True accept rate at each false accept rate. The threshold for FAR f is
    the (k+1)-th highest impostor score, k = floor(f * #impostors), so at most
    k impostors score above it; TAR is the fraction of genuine scores above it.

    Returns {f: {"tar", "threshold", "far" (achieved), "resolved"}}, where
    ``resolved`` is False when there are fewer than 1/f impostor pairs (the
    threshold is then the highest impostor score, FAR 0: a stricter test).

    Parameters
    ----------
    scores : array-like
        [N] finite pair scores (higher: more alike).
    issame : array-like
        [N] bool: whether pair i is of one identity.
    fars : sequence of float
        The false accept rates, each in (0, 1).

    Returns
    -------
    dict
        {far: {"tar", "threshold", "far", "resolved"}}.
    """
    scores, issame = _as_numpy_pairs(scores, issame)
    genuine, impostor = scores[issame], np.sort(scores[~issame])[::-1]
    if genuine.size == 0 or impostor.size == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs, got {genuine.size} and {impostor.size}")
    result = {}
    for far in fars:
        if not 0 < far < 1:
            raise ValueError(f"fars must be in (0, 1), got {far!r}")
        k = int(np.floor(far * impostor.size))
        threshold = impostor[min(k, impostor.size - 1)]
        result[far] = {"tar": float(np.mean(genuine > threshold)), "threshold": float(threshold),
                       "far": float(np.mean(impostor > threshold)), "resolved": k >= 1}
    return result


# --------------------------------------------------------------------------- embeddings


@torch.no_grad()
def embed(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 256, flip: bool = False,
          device=None, uint8_normalize: bool = True) -> torch.Tensor:
    """Embeddings [N, D] (float32, not normalised) of ``images`` [N, C, H, W] with
    ``model`` in eval mode (restored afterwards). uint8 images are mapped to
    [-1, 1] first as arcface_torch does. ``flip=True`` adds the embedding of the
    horizontally flipped image (flip test-time augmentation)."""
    check_positive_int("batch_size", batch_size)
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    model.eval()
    try:
        out = []
        for lo in range(0, images.shape[0], batch_size):
            batch = images[lo:lo + batch_size].to(device)
            if batch.dtype == torch.uint8 and uint8_normalize:
                batch = (batch.float() / 255 - 0.5) / 0.5
            e = model(batch).float()
            if flip:
                e = e + model(batch.flip(-1)).float()
            out.append(e.cpu())
        return torch.cat(out) if out else torch.empty(0, 0)
    finally:
        model.train(was_training)


def pairs_from_labels(labels, num_pairs: int = 6000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A balanced, LFW-like pair list (half genuine, half impostor, interleaved
    in blocks so every fold holds both), deterministic from ``seed``:
    (index_a, index_b, issame)."""
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
    rng = np.random.default_rng(seed)
    order = np.argsort(labels, kind="stable")
    uniq, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    multi = np.nonzero(counts >= 2)[0]
    if multi.size == 0 or uniq.size < 2:
        raise ValueError("labels must have an identity with >= 2 images and >= 2 identities to form pairs")
    half = num_pairs // 2
    # Genuine: a random identity with >= 2 images, two distinct images of it.
    ident = rng.choice(multi, half)
    first = rng.integers(0, counts[ident])
    second = (first + 1 + rng.integers(0, counts[ident] - 1)) % counts[ident]
    ga, gb = order[starts[ident] + first], order[starts[ident] + second]
    # Impostor: two random images of different identities.
    ia = rng.integers(0, labels.size, num_pairs - half)
    ib = rng.integers(0, labels.size, num_pairs - half)
    clash = labels[ia] == labels[ib]
    while clash.any():
        ib[clash] = rng.integers(0, labels.size, int(clash.sum()))
        clash = labels[ia] == labels[ib]
    a, b = np.concatenate([ga, ia]), np.concatenate([gb, ib])
    issame = np.concatenate([np.ones(half, bool), np.zeros(num_pairs - half, bool)])
    perm = rng.permutation(num_pairs)
    return a[perm], b[perm], issame[perm]


def verification_report(embeddings: torch.Tensor, labels, num_pairs: int = 6000, seed: int = 0,
                        fars: Sequence[float] = DEFAULT_FARS, n_folds: int = 10) -> dict:
    """10-fold accuracy on a balanced pair list, and TAR@FAR over *all* pairs of
    the set (every genuine and every impostor pair, so small FARs are resolved)."""
    e = F.normalize(embeddings.float(), dim=1)
    labels_t = torch.as_tensor(np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels))
    a, b, issame = pairs_from_labels(labels_t.numpy(), num_pairs, seed)
    pair_scores = (e[torch.from_numpy(a)] * e[torch.from_numpy(b)]).sum(1).numpy()
    acc = kfold_accuracy(pair_scores, issame, n_folds)
    sim = e @ e.t()
    upper = torch.triu(torch.ones_like(sim, dtype=torch.bool), diagonal=1)
    same = (labels_t.view(-1, 1) == labels_t.view(1, -1))[upper]
    tar = tar_at_far(sim[upper].numpy(), same.numpy(), fars)
    report = {"accuracy": acc["accuracy"], "accuracy_std": acc["std"],
              "pairs": int(num_pairs), "genuine_pairs_all": int(same.sum()), "impostor_pairs_all": int((~same).sum())}
    for far, r in tar.items():
        report[f"tar@far={far:g}"] = r["tar"]
        if not r["resolved"]:
            report[f"tar@far={far:g}_unresolved"] = True
    return report


# --------------------------------------------------------------------------- insightface .bin


def _image_bytes(item) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray):
        return item.tobytes()
    raise TypeError(f"a .bin image must be encoded bytes, got {type(item).__name__}")


def load_bin(path: str | os.PathLike, image_size: tuple[int, int] = (112, 112)) -> tuple[list[torch.Tensor], list[bool]]:
    """An insightface evaluation set: a pickle of (list of 2N encoded images,
    list of N issame flags); pair i is images 2i and 2i+1.

    Returns ([images, flipped images], issame) with images uint8 [2N, 3, H, W]
    (RGB), as arcface_torch's ``load_bin`` builds them: decoded, resized so the
    short side is ``image_size[0]`` when the width differs, and flipped along
    the width. (arcface_torch keeps them as float 0..255; uint8 holds the same
    values in a quarter of the memory, and :func:`embed` normalises them.)

    Parameters
    ----------
    path : str or os.PathLike
        The ``.bin`` file.
    image_size : (int, int)
        (H, W) of the images returned.

    Returns
    -------
    tuple
        ([images, flipped images], issame list).
    """
    from dcq_ops.training.images import DECODE_ERRORS, decode_failure, require_pil
    Image = require_pil()
    with open(path, "rb") as f:
        try:
            bins, issame = pickle.load(f, encoding="bytes")
        except Exception as exc:
            raise ValueError(f"{os.fspath(path)!r} is not an insightface .bin (pickle of (images, issame)): {exc}") from exc
    issame = [bool(x) for x in issame]
    if len(bins) != 2 * len(issame):
        raise ValueError(f"a .bin must hold 2 images per pair: {len(issame)} pairs need {2 * len(issame)} images, "
                         f"got {len(bins)}")
    H, W = image_size
    data = torch.empty(len(bins), 3, H, W, dtype=torch.uint8)
    for i, item in enumerate(bins):
        encoded = _image_bytes(item)
        try:
            with Image.open(io.BytesIO(encoded)) as image:
                image = image.convert("RGB")
        except DECODE_ERRORS as exc:  # Pillow names only the BytesIO: name the .bin and the image
            raise decode_failure(f"{os.fspath(path)}: image {i} (pair {i // 2})", exc, encoded) from exc
        if image.size[0] != H:  # mxnet's resize_short(img, image_size[0]), compared on the width
            w, h = image.size
            scale = H / min(w, h)
            image = image.resize((round(w * scale), round(h * scale)), Image.BICUBIC)  # mxnet's interp=2
        array = np.asarray(image, dtype=np.uint8)
        if array.shape[:2] != (H, W):
            raise ValueError(f"image {i} of {os.fspath(path)!r} is {array.shape[1]}x{array.shape[0]} after resizing, "
                             f"expected {W}x{H} (image_size)")
        data[i] = torch.from_numpy(array.copy()).permute(2, 0, 1)
    return [data, data.flip(-1)], issame


def insightface_accuracy(embeddings: np.ndarray, issame, n_folds: int = 10) -> dict:
    """arcface_torch's ``evaluate``: pairs (0::2, 1::2) of L2-normalised
    embeddings, squared Euclidean distance, thresholds 0, 0.01, ..., 3.99."""
    e = np.asarray(embeddings, dtype=np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    distance = np.sum(np.square(e[0::2] - e[1::2]), axis=1)
    return kfold_accuracy(distance, np.asarray(issame, bool), n_folds, np.arange(0, 4, 0.01), greater_is_same=False)


@torch.no_grad()
def evaluate_bin(model: torch.nn.Module, data, batch_size: int = 256, n_folds: int = 10, device=None) -> dict:
    """Verification on an insightface ``.bin`` (a path, or what :func:`load_bin`
    returns) with flip TTA, as arcface_torch reports it: "accuracy" (the
    embeddings of the image and its flip summed), "accuracy_noflip", "xnorm"
    (the mean norm of the un-normalised embeddings of both copies).

    Parameters
    ----------
    model : torch.nn.Module
        Images -> embeddings (run in eval mode, restored afterwards).
    data : str, os.PathLike or tuple
        A ``.bin`` path or :func:`load_bin`'s result.
    batch_size : int
        Images per forward pass.
    n_folds : int
        Folds of the accuracy protocol.
    device : torch.device or str, optional
        Where the model runs (default: its parameters' device).

    Returns
    -------
    dict
        {"accuracy", "accuracy_std", "accuracy_noflip", "xnorm", "pairs"}.
    """
    if isinstance(data, (str, os.PathLike)):
        data = load_bin(data)
    (images, flipped), issame = data
    plain = embed(model, images, batch_size, device=device).numpy().astype(np.float64)
    mirrored = embed(model, flipped, batch_size, device=device).numpy().astype(np.float64)
    xnorm = float(np.mean(np.linalg.norm(np.concatenate([plain, mirrored]), axis=1)))
    flip_tta = insightface_accuracy(plain + mirrored, issame, n_folds)
    no_flip = insightface_accuracy(plain, issame, n_folds)
    return {"accuracy": flip_tta["accuracy"], "accuracy_std": flip_tta["std"],
            "accuracy_noflip": no_flip["accuracy"], "xnorm": xnorm, "pairs": len(issame)}


def write_bin(path: str | os.PathLike, images: Sequence, issame: Sequence[bool], format: str = "PNG") -> None:
    """Write an insightface-style ``.bin``: ``images`` (2 per pair) are PIL images,
    uint8 HxWx3 arrays or uint8 [3, H, W] tensors, encoded with Pillow."""
    from dcq_ops.training.images import require_pil
    Image = require_pil()
    if len(images) != 2 * len(issame):
        raise ValueError(f"images must hold 2 per pair: {len(issame)} pairs need {2 * len(issame)}, got {len(images)}")
    encoded = []
    for image in images:
        if isinstance(image, torch.Tensor):
            image = image.permute(1, 2, 0).numpy() if image.dim() == 3 and image.shape[0] in (1, 3) else image.numpy()
        if isinstance(image, np.ndarray):
            image = Image.fromarray(image.astype(np.uint8))
        buffer = io.BytesIO()
        image.save(buffer, format=format)
        encoded.append(buffer.getvalue())
    with atomic_write(path, "wb") as f:  # replaced whole: a failure leaves the old file
        pickle.dump((encoded, [bool(x) for x in issame]), f, protocol=pickle.HIGHEST_PROTOCOL)
