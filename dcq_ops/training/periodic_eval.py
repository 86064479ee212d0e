"""Verification during a run: the embeddings of a network (the feature extractor or
the weight generator) on every verification set of the data (10-fold accuracy,
TAR@FAR; flip TTA) and on every ``--eval-bin``, and their log records and lines;
the ``.bin`` sets are read and checked before the run starts (:func:`load_eval_bins`),
so that a set that cannot be evaluated is a usage error, not the end of a trained run."""

from __future__ import annotations

import os
import time

import torch

from dcq_ops.training.verification import embed, evaluate_bin, load_bin, verification_report

# The 10-fold protocol of a .bin (insightface_accuracy) needs a pair in every fold.
MIN_BIN_PAIRS = 10


def bin_set_names(paths) -> list[str]:
    """The name of each ``.bin`` set in the results and the log: its file name, or the
    path as given where two sets share a file name (lfw.bin of two folders); ValueError
    for a set given twice.

    Parameters
    ----------
    paths : list of str
        The ``.bin`` files, in order.

    Returns
    -------
    list of str
    """
    seen = {}
    for path in paths:
        key = os.path.realpath(path)
        if key in seen:
            raise ValueError(f"{path!r} is given twice (as {seen[key]!r} before): every .bin is evaluated once")
        seen[key] = path
    names = [os.path.basename(p) for p in paths]
    return [p if names.count(n) > 1 else n for p, n in zip(paths, names)]


def load_eval_bin(path: str, image_size: int):
    """:func:`~dcq_ops.training.verification.load_bin` of ``path`` at ``image_size``,
    checked for what its evaluation needs: ValueError naming the file for anything
    that would fail there (not a pickle of (images, issame), items that are not
    encoded images, fewer than 10 pairs, an image that does not decode).

    Parameters
    ----------
    path : str
        The ``.bin`` file.
    image_size : int
        The side of the square images the network takes.

    Returns
    -------
    tuple
        ``load_bin``'s ([images, flipped images], issame).
    """
    try:
        data = load_bin(path, (image_size, image_size))
    except (TypeError, AttributeError, OverflowError, MemoryError) as exc:  # items of the wrong kind
        raise ValueError(f"{path!r} is not an insightface .bin (a pickle of a list of encoded images and a list of "
                         f"issame flags): {type(exc).__name__}: {exc}") from exc
    pairs = len(data[1])
    if pairs < MIN_BIN_PAIRS:
        raise ValueError(f"{path!r} holds {pairs} pairs: its 10-fold verification needs at least {MIN_BIN_PAIRS}")
    return data


def load_eval_bins(paths, image_size: int) -> dict:
    """{set name (:func:`bin_set_names`): loaded set (:func:`load_eval_bin`)}.

    Parameters
    ----------
    paths : list of str
        The ``.bin`` files.
    image_size : int
        The side of the square images the network takes.

    Returns
    -------
    dict
    """
    return {name: load_eval_bin(path, image_size) for name, path in zip(bin_set_names(paths), paths)}


class Verifier:
    """The verification sets of a run, evaluated on demand; ``.bin`` sets are those
    ``bins`` holds (loaded and checked before the run, :func:`load_eval_bins`), else
    read at their first use and kept."""

    def __init__(self, sets: dict, eval_bin: list, image_size: int, pairs: int, seed: int, device: torch.device,
                 bins: dict | None = None):
        self.sets, self.eval_bin, self.image_size = sets, eval_bin, image_size
        self.pairs, self.seed, self.device = pairs, seed, device
        self._loaded_bins = bins

    @torch.no_grad()
    def __call__(self, network) -> dict:
        """{set name: report} of ``network``."""
        results = {}
        for name, (images, labels) in self.sets.items():
            embeddings = embed(network, images, batch_size=512, flip=True, device=self.device)
            results[name] = verification_report(embeddings, labels, self.pairs, seed=self.seed)
        if self.eval_bin:
            if self._loaded_bins is None:
                self._loaded_bins = load_eval_bins(self.eval_bin, self.image_size)
            for name, data in self._loaded_bins.items():
                results[name] = evaluate_bin(network, data, batch_size=256, device=self.device)
        return results


def log_eval(results: dict, log, progress, *, step: int, epoch: float, start: float, model: str = "backbone") -> None:
    """One log record and one progress line per set of ``results`` (of ``model``);
    ``start`` is the run's ``time.perf_counter()`` at its first step."""
    for name, r in results.items():
        log.write({"kind": "eval", "step": step, "epoch": epoch, "model": model, "set": name,
                   "elapsed_s": time.perf_counter() - start, **r})
        # "*": fewer impostor pairs than 1/FAR, so the threshold is the highest impostor score.
        tars = " ".join(f"{k.replace('tar@far=', 'TAR@')} {v:.4f}{'*' if r.get(k + '_unresolved') else ''}"
                        for k, v in r.items() if k.startswith("tar@") and not k.endswith("_unresolved"))
        which = "" if model == "backbone" else f" [{model}]"
        progress.message(f"eval step {step} {name}{which}: accuracy {r['accuracy']:.4f} "
                         f"+- {r.get('accuracy_std', 0):.4f} {tars}")
