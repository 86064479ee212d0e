"""Verification during a run: the embeddings of a network (the feature extractor or
the weight generator) on every verification set of the data (10-fold accuracy,
TAR@FAR; flip TTA) and on every ``--eval-bin``, and their log records and lines."""

from __future__ import annotations

import os
import time

import torch

from dcq_ops.training.verification import embed, evaluate_bin, load_bin, verification_report


class Verifier:
    """The verification sets of a run, evaluated on demand; ``.bin`` sets are read at
    their first use and kept."""

    def __init__(self, sets: dict, eval_bin: list, image_size: int, pairs: int, seed: int, device: torch.device):
        self.sets, self.eval_bin, self.image_size = sets, eval_bin, image_size
        self.pairs, self.seed, self.device = pairs, seed, device
        self._loaded_bins = None

    @torch.no_grad()
    def __call__(self, network) -> dict:
        """{set name: report} of ``network``."""
        results = {}
        for name, (images, labels) in self.sets.items():
            embeddings = embed(network, images, batch_size=512, flip=True, device=self.device)
            results[name] = verification_report(embeddings, labels, self.pairs, seed=self.seed)
        if self.eval_bin:
            if self._loaded_bins is None:
                size = (self.image_size, self.image_size)
                self._loaded_bins = {os.path.basename(p): load_bin(p, size) for p in self.eval_bin}
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
