"""The thin training loop behind ``python -m dcq_ops.train`` (or ``dcq-train``).

Backbone (small CNN by default, IResNet-18/34/50/100/200), head by flag (``dcq``,
``softmax``, ``partial_fc``), SGD or AdamW, linear warm-up then cosine or step
decay (per step), AMP (fp16 with a GradScaler, or bf16), gradient clipping,
progress lines (or a tqdm bar when tqdm is installed and the output is a
terminal) with loss and samples/s, periodic verification (of the feature
extractor, of DCQ's weight generator, or both: ``--eval-model``), a CSV or
JSON-lines log and checkpoints that resume exactly.

The :class:`Trainer` builds a run from its :class:`~.config.TrainConfig` and runs
it: each step's forward, backward and update under the bad-step guard
(:mod:`.step_guard`), the weight generator's EMA, the log lines, periodic
verification (:mod:`.periodic_eval`) and checkpoints that resume exactly
(:mod:`.checkpoint`: the data order and augmentation are pure functions of
(seed, epoch, index), so a run resumed at step s replays what an uninterrupted
run does after step s). Under ``torchrun`` (WORLD_SIZE > 1) the backbone (and a
head with parameters) runs in DistributedDataParallel, every epoch is sharded
across ranks, DCQLoss shares one queue across ranks and the weight generator
runs with MoCo's shuffle-BN. The other parts: :mod:`.loop` (the loop of
:meth:`Trainer.fit`), :mod:`.preflight`, :mod:`.schedules`, :mod:`.run_log`,
:mod:`.runtime`, :mod:`.levers`, :mod:`.build`. See docs/training.md.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch
from torch import nn

from dcq_ops.momentum import MomentumEncoder
from dcq_ops.parallel import shuffled_forward
from dcq_ops.training.build import build_data, build_models, build_optimizer, build_scheduler
from dcq_ops.training.checkpoint import load_trainer_state, trainer_state, write_checkpoint
from dcq_ops.training.config import ConfigError, TrainConfig
from dcq_ops.training.data import TwoViewBatchSampler
from dcq_ops.training.loop import fit
from dcq_ops.training.resume import resume_trainer
from dcq_ops.training.periodic_eval import Verifier
from dcq_ops.training.levers import set_generator_bn, update_generator, warm_queue
from dcq_ops.training.run_log import Progress, RunLog
from dcq_ops.training.preflight import preflight
from dcq_ops.training.runtime import resolve_device, start_process, wrap_distributed
from dcq_ops.training.step_guard import StepGuard, step_tensors


class Trainer:
    """Everything of one run; :meth:`fit` trains, :meth:`evaluate` verifies,
    :meth:`state_dict` / :meth:`load_state_dict` checkpoint.

    Building it resolves the device, checks the settings against this machine
    (:mod:`.preflight`: the output directory, the ``--eval-bin`` sets, the backend),
    joins the process group under torchrun, reads the data and builds the backbone,
    the head, the weight generator (DCQ), the optimizer and the schedule; ConfigError
    for settings found wrong then (the data, the device, a queue smaller than a global
    batch).

    Parameters
    ----------
    config : TrainConfig
        The run's settings.
    """

    def __init__(self, config: TrainConfig):
        self.config = config
        # Every setting that can be checked against this machine is, before any work.
        device = resolve_device(config.device)
        bins = preflight(config, device)
        self.device, self.rank, self.world_size = start_process(config, device)
        try:
            self.dataset, self.num_classes, channels, self.verification_sets = build_data(config)
        except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
            raise ConfigError(f"--data {config.data}: {exc}") from exc
        if len(self.dataset) < config.batch_size * self.world_size:
            raise ConfigError(f"--batch-size {config.batch_size} x {self.world_size} processes is more than the "
                              f"{len(self.dataset)} training samples of --data {config.data}: lower --batch-size")
        self.sampler = TwoViewBatchSampler(len(self.dataset), config.batch_size, seed=config.seed,
                                           rank=self.rank, world_size=self.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.total_steps_for(self.world_size)
        self.warmup_steps = min(self.total_steps, round(config.warmup_epochs * self.steps_per_epoch))

        self.backbone, self.head = build_models(config, self.num_classes, channels, self.world_size, self.device)
        self.generator = None
        if self.head.needs_class_weights:
            self.generator = MomentumEncoder(self.backbone, config.momentum).to(self.device)
            set_generator_bn(self.generator, config.generator_bn)

        params = [p for p in list(self.backbone.parameters()) + list(self.head.parameters()) if p.requires_grad]
        self.optimizer = build_optimizer(params, config)
        self.scheduler = build_scheduler(self.optimizer, config, self.total_steps, self.warmup_steps)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")

        self.model, self.head_module = wrap_distributed(self.backbone, self.head, self.device, self.world_size)
        # Different ranks draw different random numbers (dropout, Partial FC sampling).
        torch.manual_seed(config.seed + self.rank)
        self.step = 0
        self.log = RunLog(config.output, config.log_format, enabled=self.rank == 0)
        self._verifier = Verifier(self.verification_sets, config.eval_bin, config.image_size, config.eval_pairs,
                                  config.seed, self.device, bins=bins)
        self._first_step = 0              # the step this process started at (DCQLoss counts from there)
        self._resumed_from = None         # (step, total steps) of the checkpoint resumed, in its own steps
        self._params = params
        # Buffers are updated in place (BatchNorm, the generator's copy, load_state_dict): listed once.
        self._buffers = {(owner, name): b for owner, module in (("backbone", self.backbone), ("generator", self.generator))
                         if module is not None for name, b in module.named_buffers()}
        # Bad steps (see train_step): decided on the device; the guard keeps the flags
        # until the loop reads them where it syncs anyway (_read_bad_steps).
        self.guard = StepGuard(self._undoable, validate=config.validate, max_bad_steps=config.max_bad_steps,
                               grads_checked=not self.scaler.is_enabled(), device=self.device,
                               world_size=self.world_size, optimizer=self.optimizer, buffers=self._buffers)
        # DCQLoss checks a batch's values on the host itself under eager validation and
        # under several ranks (its exchange syncs anyway) and raises: the loop runs that
        # check first, so that a bad batch is a skipped step rather than the end of the run.
        self._host_checks = config.validate != "off" and config.head == "dcq" and (
            config.validate == "eager" or self.world_size > 1)

    def total_steps_for(self, world_size: int) -> int:
        """The number of steps of this run on ``world_size`` processes (``steps``, or
        ``epochs`` of the steps per epoch of that world size).

        Parameters
        ----------
        world_size : int
            A number of processes.

        Returns
        -------
        int
        """
        if self.config.steps:
            return self.config.steps
        per_epoch = len(TwoViewBatchSampler(len(self.dataset), self.config.batch_size, seed=self.config.seed,
                                            rank=0, world_size=world_size))
        return max(1, math.ceil(self.config.epochs * per_epoch))

    @property
    def queue_mode(self) -> str:
        """How the ranks share the DCQ queue in this run: "none" (one process), "gathered"
        or "sharded" (``--queue-mode``; "auto" is "gathered")."""
        if self.world_size == 1:
            return "none"
        return "gathered" if self.config.queue_mode == "auto" else self.config.queue_mode

    def _undoable(self) -> dict:  # read at every step: the optimizer creates its state at its first
        return step_tensors(self._params, self.optimizer, self._buffers)

    def _class_weights(self, images: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1 and self.config.generator_bn == "train":
            # The permutation is a function of (seed, step): a resumed run shuffles as the
            # uninterrupted one did, with no random state to restore.
            return shuffled_forward(self.generator, images, seed=self.config.seed, step=self.step)
        return self.generator(images)

    # ----------------------------------------------------------------- checkpoints

    @property
    def bad_steps(self) -> int:
        """The bad (skipped) steps of the whole run, those before a resume included."""
        return self.guard.bad_steps

    @property
    def skipped_steps(self) -> list[int]:
        """The steps this process skipped."""
        return self.guard.skipped_steps

    def state_dict(self) -> dict:
        """Everything a run resumes from: the models (the DCQ queue as the global FIFO, in
        every queue mode), the optimizer, the schedule, the grad scaler, the step, every
        rank's RNG states and weight-generator buffers and the bad-step count (a
        collective under several ranks: every rank calls it; the queue is gathered to
        rank 0, the other ranks' states have ``head`` None and are not for saving).

        Returns
        -------
        dict
        """
        return trainer_state(self)

    def load_state_dict(self, state: dict) -> list[str]:
        """Resume from ``state`` (:meth:`state_dict`'s); ConfigError when it was written by
        a run with other settings (those that change what it computes). It may come from
        another number of processes or the other queue mode
        (:func:`~dcq_ops.training.checkpoint.load_trainer_state` says what differs then).

        Parameters
        ----------
        state : dict
            A checkpoint's contents.

        Returns
        -------
        list of str
            What changed with the world size or the queue mode (empty when nothing did).
        """
        messages = load_trainer_state(self, state)
        self._resumed_from = (int(state["step"]), int(state.get("total_steps") or self.total_steps))
        return messages

    def save(self, final: bool = False) -> str | None:
        """Write OUTPUT/checkpoint_<step>.pt and OUTPUT/checkpoint.pt (the latest), atomically
        (:func:`~dcq_ops.training.checkpoint.write_checkpoint`); rank 0 only.

        Parameters
        ----------
        final : bool
            Whether this is the run's last checkpoint (written as any other).

        Returns
        -------
        str or None
            The step checkpoint's path (None on other ranks and without ``output``).
        """
        state = self.state_dict()  # a collective under several ranks: every rank calls it
        if self.rank != 0 or not self.config.output:
            return None
        return write_checkpoint(state, self.config.output, self.step, self.config.keep_checkpoints)

    def resume(self, path: str) -> list[str]:
        """Load a checkpoint (``path``, or "auto": the newest readable one in OUTPUT,
        see :func:`~dcq_ops.training.resume.resume_trainer`: all or nothing, past
        any file that fails to read, verify or load).

        Parameters
        ----------
        path : str
            A checkpoint, or "auto".

        Returns
        -------
        list of str
            Messages for the progress output and the log (which checkpoint, and why).
        """
        return resume_trainer(self, path)

    # ----------------------------------------------------------------- training

    def _autocast(self):
        if self.config.amp == "none":
            return contextlib.nullcontext()
        dtype = torch.float16 if self.config.amp == "fp16" else torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype)

    def train_step(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One optimisation step; returns (loss, backbone grad norm or None), on the device.

        Unless validate="off", the update is kept only if the loss, every gradient and
        the head's inputs (embeddings, class weights) are finite, decided on the device
        with no host sync: the fused optimizer skips the update where that flag is false
        (its found_inf), and the BatchNorm statistics the forward moved are put back
        (StepGuard.step; an optimizer without found_inf gets a full copy). Under fp16
        the gradients are left out of the flag: the GradScaler skips a step whose scaled
        gradients overflowed itself, as it always has (that tunes its scale, it is no bad
        step).
        The flag waits in the guard until the loop reads it (_read_bad_steps).

        Parameters
        ----------
        batch : tuple of torch.Tensor
            (images of view a, images of view b, labels), as the data loader gives them.

        Returns
        -------
        tuple
            (loss, backbone grad norm or None), tensors on the device (not read: no sync).
        """
        images_a, images_b, labels = (t.to(self.device, non_blocking=True) for t in batch)
        self.model.train()
        self.head.train()
        guard = self.guard
        if guard.enabled:
            guard.save()  # before the forward, which moves the BatchNorm statistics
            if not self._host_checks and self.config.head == "dcq":
                guard.collect_report(self.head, self._first_step)
        with self._autocast():
            embeddings = self.model(images_a)
            class_weights = self._class_weights(images_b) if self.generator is not None else None
        # The head in fp32: the margin softmax is where precision matters (and
        # the DCQ kernels accumulate in fp32 anyway).
        embeddings = embeddings.float()
        class_weights = None if class_weights is None else class_weights.float()
        if self._host_checks:
            problem = guard.check_batch_now(embeddings, labels, class_weights, self.num_classes)
            if problem is not None:  # skipped before the loss: nothing to compute
                guard.undo.restore(torch.zeros((), dtype=torch.bool, device=self.device))
                self._advance()
                guard.record(self.step, None, problem)
                return torch.full((), float("nan"), device=self.device), None
        loss = self.head_module(embeddings, labels, class_weights)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # Decided before clipping and the optimizer step, which would hide a NaN gradient.
        kept = guard.kept(loss, embeddings, class_weights, self._params) if guard.enabled else None
        grad_norm = None
        if self.config.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.backbone.parameters(), self.config.clip_grad)
        if guard.enabled:  # the update where kept, skipped (by a fused optimizer) or undone elsewhere
            guard.step(self.optimizer, self.scaler, kept)
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self._advance()
        if guard.enabled:
            guard.record(self.step, kept)
        return loss.detach(), grad_norm

    def _advance(self) -> None:
        """What follows every step, kept or skipped: the schedule counts steps, and the
        generator follows the backbone (finite: a bad step was undone)."""
        self.scheduler.step()
        if self.generator is not None:
            update_generator(self.generator, self.backbone, self.step, self.total_steps, self.config)
        self.step += 1

    def _read_bad_steps(self, progress: Progress) -> int:
        """The guard's read of the flags since the last read (logged, TrainingError past
        max_bad_steps); the number of skipped steps found."""
        return self.guard.read(progress, self.log, self.step, self.steps_per_epoch)

    def warm_queue(self) -> None:
        """Fill the DCQ queue before the first step as ``queue_warmup`` says ("empty",
        "random", "prefill"; :func:`~dcq_ops.training.levers.warm_queue`); nothing for
        the other heads."""
        if self.config.head != "dcq":
            return
        warm_queue(self.head.loss, self.config.queue_warmup, dataset=self.dataset, generator=self.generator,
                   batch_size=self.config.batch_size, seed=self.config.seed, device=self.device,
                   autocast=self._autocast)

    def eval_models(self) -> tuple[str, ...]:
        """The models ``eval_model`` names.

        Returns
        -------
        tuple of str
            "backbone" (the feature extractor) and/or "generator" (the weight generator,
            which the official DCQ code evaluates).
        """
        return ("backbone", "generator") if self.config.eval_model == "both" else (self.config.eval_model,)

    def evaluate(self, model: str = "backbone") -> dict:
        """Verification of the feature extractor or of the weight generator (with
        generator_bn=train it normalises with its own running statistics), on rank 0:
        every synthetic set (10-fold accuracy, TAR@FAR; flip TTA) and every --eval-bin.

        Parameters
        ----------
        model : str
            "backbone" or "generator".

        Returns
        -------
        dict
            {set name: report}; {} on other ranks.
        """
        if model not in ("backbone", "generator"):
            raise ValueError(f"model must be 'backbone' or 'generator', got {model!r}")
        if model == "generator" and self.generator is None:
            raise ValueError(f"head {self.config.head!r} has no weight generator to evaluate")
        if self.rank != 0:
            return {}
        return self._verifier(self.backbone if model == "backbone" else self.generator.module)

    def fit(self) -> dict:
        """Train to the end (or ``stop_after``), resuming first when ``resume`` says so
        (the loop: :func:`~dcq_ops.training.loop.fit`). Under several ranks every rank
        meets after the final checkpoint, before rank 0's final verification.

        Returns
        -------
        dict
            {"steps", "total_steps", "final_eval" (the backbone's, {} unless eval_model
            evaluates it), "final_eval_generator" (the weight generator's, when eval_model
            evaluates it), "history", "bad_steps" (of the whole run), "skipped_steps"
            (those of this process), "last" (the last train record), "elapsed_s"}.
            Raises TrainingError past max_bad_steps.
        """
        return fit(self)


def train(config: TrainConfig | None = None, **overrides) -> dict:
    """Build a :class:`Trainer` and fit it.

    Parameters
    ----------
    config : TrainConfig, optional
        The run's settings (default: TrainConfig()).
    **overrides
        Fields of TrainConfig that replace those of ``config``.

    Returns
    -------
    dict
        :meth:`Trainer.fit`'s result, with the trainer under "trainer".
    """
    if config is None:
        config = TrainConfig(**overrides)
    elif overrides:
        config = dataclasses.replace(config, **overrides)
    trainer = Trainer(config)
    result = trainer.fit()
    result["trainer"] = trainer
    return result
