"""--resume auto under several ranks: a checkpoint that loads on one rank and not on another
(here rank 1's own RNG state is damaged) is skipped by every rank, which undo their
loads and go on to the same older file together; none is left alone in a collective.
Two gloo ranks under torchrun (tests/ranks.py), one short scenario."""

from __future__ import annotations

import datetime
import traceback
from pathlib import Path

import pytest
import torch

from dcq_ops.training import TrainConfig, Trainer, train
from ranks import run_ranks

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")

TINY = dict(synthetic_identities=120, synthetic_eval_identities=40, image_size=16, width=4, embedding_size=32,
            batch_size=16, queue_size=64, log_every=1, eval_pairs=100, progress="none", threads=1, steps=8,
            save_every=2, keep_checkpoints=1)


def worker_main(out_dir: str) -> None:
    torch.set_num_threads(1)
    out = Path(out_dir)
    torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank = torch.distributed.get_rank()
    results = {}
    try:
        config = TrainConfig(**TINY, output=str(out / "run"))
        train(TrainConfig(**{**TINY, "stop_after": 4}, output=str(out / "run")))
        if rank == 0:  # a newer checkpoint whose rank-1 RNG state is damaged (rank 0's loads)
            state = torch.load(out / "run" / "checkpoint_0000004.pt")
            state["step"] = 6
            state["rng"][1]["python"]["state"] = torch.tensor([1, 2, 3])
            torch.save(state, out / "run" / "checkpoint_0000006.pt")
        torch.distributed.barrier()
        trainer = Trainer(config)
        messages = trainer.resume("auto")
        results = {"step": trainer.step, "messages": messages}
        torch.distributed.barrier()
    except Exception:  # noqa: BLE001 - reported by the parent
        results["__error__"] = traceback.format_exc()
    torch.save(results, out / f"rank{rank}.pt")
    torch.distributed.destroy_process_group()


def test_a_file_that_one_rank_cannot_load_is_skipped_by_every_rank(tmp_path):
    results = run_ranks("test_resume_ranks", 2, tmp_path, 240)
    for r, result in enumerate(results):
        assert "__error__" not in result, f"rank {r}: {result.get('__error__')}"
    assert [r["step"] for r in results] == [4, 4], "both ranks fell back to step 4 together"
    message = results[0]["messages"][0]
    assert "skipped checkpoint_0000006.pt (rank 1: failed to load: " in message, message
    assert "resuming from checkpoint.pt (step 4)" in message or "resuming from checkpoint_0000004.pt" in message
