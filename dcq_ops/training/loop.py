"""The loop of a run (:meth:`Trainer.fit <dcq_ops.training.trainer.Trainer.fit>`): the
resume and what it says, the steps with their log lines, the periodic verification
and checkpoints, the final checkpoint, the meeting of every rank after it, and the
final verification on rank 0."""

from __future__ import annotations

import sys
import time

from dcq_ops.training.data import batch_loader
from dcq_ops.training.periodic_eval import log_eval
from dcq_ops.training.run_log import Progress, TrainWindow
from dcq_ops.training.runtime import synchronize


def announce(trainer, progress: Progress, messages: list[str]) -> None:
    """What the resume says (which checkpoint, and what changed with the world size or
    the queue mode): a line of the progress output, a ``message`` record of the log,
    and, when the progress output is off (``--progress none``, or a rank other than
    0), a line on stderr on rank 0: a resume on another world size renumbers the steps,
    which nobody should have to find in the log."""
    for text in messages:
        progress.message(text)
        trainer.log.write({"kind": "message", "step": trainer.step, "epoch": trainer.step / trainer.steps_per_epoch,
                           "message": text})
        # resume.py puts the note of a skipped checkpoint on stderr itself, whatever --progress says.
        if trainer.rank == 0 and not progress.enabled and not text.startswith("resume: skipped"):
            print(f"dcq-train: {text}", file=sys.stderr, flush=True)


def evaluate_and_log(trainer, progress: Progress, start: float) -> dict:
    """{model: {set: report}} for every model of ``eval_model``, logged."""
    results = {model: trainer.evaluate(model) for model in trainer.eval_models()}
    for model, sets in results.items():
        log_eval(sets, trainer.log, progress, step=trainer.step, epoch=trainer.step / trainer.steps_per_epoch,
                 start=start, model=model)
    return results


def fit(trainer) -> dict:
    """Train ``trainer`` to the end (or ``stop_after``), resuming first when its
    ``resume`` says so; see :meth:`Trainer.fit <dcq_ops.training.trainer.Trainer.fit>`.

    Parameters
    ----------
    trainer : Trainer
        The run.

    Returns
    -------
    dict
        The result :meth:`Trainer.fit` documents.
    """
    config = trainer.config
    messages = []
    if config.resume:
        trainer._resumed_from = None
        messages = trainer.resume(config.resume)
        # The steps after the checkpoint run again: their old records go. Another world
        # size renumbers the steps (step s of T resumes as s' of T'): the records after
        # min(s, s') go, so that the step column neither repeats nor goes back.
        saved_step, saved_total = trainer._resumed_from or (trainer.step, trainer.total_steps)
        trainer.log.truncate(*min((saved_step, saved_total), (trainer.step, trainer.total_steps)))
    trainer._first_step = trainer.step
    stop = trainer.total_steps if config.stop_after is None else min(trainer.total_steps, config.stop_after)
    progress = Progress(config.progress, trainer.total_steps, trainer.step, enabled=trainer.rank == 0)
    announce(trainer, progress, messages)
    start = time.perf_counter()
    window = TrainWindow(config.validate != "off", config.batch_size * trainer.world_size, start)
    if trainer.step == 0:
        trainer.warm_queue()  # a fresh run (a resumed one restored its queue); timed with the first steps
    last = {}
    try:
        while trainer.step < stop:
            epoch, first_batch = divmod(trainer.step, trainer.steps_per_epoch)
            for batch in batch_loader(trainer.dataset, trainer.sampler, epoch, first_batch, config.num_workers):
                loss, grad_norm = trainer.train_step(batch)
                window.add(loss)
                if config.validate == "eager":
                    window.skipped += trainer._read_bad_steps(progress)
                if trainer.step % config.log_every == 0 or trainer.step == stop:
                    window.skipped += trainer._read_bad_steps(progress)
                    last = window.record(trainer.step, trainer.step / trainer.steps_per_epoch,
                                         trainer.optimizer.param_groups[0]["lr"], grad_norm, start)
                    trainer.log.write(last)
                    progress.update(last, window.steps, trainer.total_steps)
                    window.reset()
                if config.eval_every and trainer.step % config.eval_every == 0 and trainer.step < trainer.total_steps:
                    evaluate_and_log(trainer, progress, start)
                    window.start = time.perf_counter()  # keep evaluation out of samples/s
                if config.save_every and trainer.step % config.save_every == 0 and trainer.step < stop:
                    # The checkpoint holds the bad-step count and the log every skipped step before it.
                    window.skipped += trainer._read_bad_steps(progress)
                    trainer.save()
                if trainer.step >= stop:
                    break
        trainer._read_bad_steps(progress)
        trainer.save(final=True)
        # The last collectives of the run are the final checkpoint's (a sharded queue's
        # blocks travel to rank 0): every rank meets here before rank 0 evaluates alone
        # and the others go on to exit (runtime.end_process says why that matters).
        synchronize()
        finals = evaluate_and_log(trainer, progress, start) if trainer.step >= trainer.total_steps else {}
    finally:
        progress.close()
    result = {"steps": trainer.step, "total_steps": trainer.total_steps, "final_eval": finals.get("backbone", {}),
              "history": [r for r in trainer.log.records if r["kind"] == "train"],
              "bad_steps": trainer.bad_steps, "skipped_steps": list(trainer.skipped_steps),
              "last": last, "elapsed_s": time.perf_counter() - start}
    if "generator" in trainer.eval_models():
        result["final_eval_generator"] = finals.get("generator", {})
    return result
