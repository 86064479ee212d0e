"""The bad-step guard: a step with NaN or inf in its loss, its gradients or the
head's inputs never reaches the weights. Whether a step is kept is decided on the
device, with no host sync. With a fused optimizer (SGD, Adam, AdamW with
``fused=True``) the optimizer itself skips the update where the device-side flag says
so (its ``found_inf``, the flag GradScaler hands it), and :class:`StepUndo` copies only
what the optimizer cannot protect: the BatchNorm statistics that the forward moved.
Any other optimizer gets the full copy (the trainable parameters and its state as
well). :class:`StepGuard` makes the flag, holds the flags until the loop reads them
where it syncs anyway, counts the bad steps, logs each one and stops the run
(:class:`TrainingError`) past ``--max-bad-steps``."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from dcq_ops.batch_guard import check_values_now
from dcq_ops.training.step_undo import StepUndo, by_device_and_dtype, step_tensors
from dcq_ops.training.skip_reasons import batch_problem, describe_step, step_flags


class TrainingError(RuntimeError):
    """The run stopped: too many bad steps, or no readable checkpoint to resume.

    Parameters
    ----------
    message : str
        Why, and what to do about it.
    """


def skips_in_optimizer(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` skips its whole update (parameters and state) on a
    device-side flag: the fused SGD, Adam and AdamW read ``optimizer.found_inf`` (the
    attribute GradScaler sets for them) and leave everything as it was where it is 1.
    Read at every step: a checkpoint's optimizer state written without ``fused`` turns
    it off on load.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer

    Returns
    -------
    bool
    """
    return bool(getattr(optimizer, "_step_supports_amp_scaling", False)) and all(
        group.get("fused") for group in optimizer.param_groups)


class StepGuard:
    """The bad steps of a run: the flags of the steps since the last read, the count of
    the whole run (``bad_steps``; a resumed run starts from its checkpoint's) and the
    steps this process skipped (``skipped_steps``).

    ``tensors`` returns everything a step changes ({key: tensor}, see :class:`StepUndo`:
    the parameters, the optimizer state, ``buffers``), copied when ``optimizer`` cannot
    skip an update itself; ``buffers`` ({key: tensor}, the BatchNorm statistics) is what
    the forward changes, the only copy when it can (:func:`skips_in_optimizer`).
    ``validate`` "off" checks nothing (a bad step reaches the weights); ``grads_checked``
    False leaves the gradients to the fp16 GradScaler, which skips a step whose scaled
    gradients overflowed itself (that tunes its scale, it is no bad step)."""

    def __init__(self, tensors, *, validate: str, max_bad_steps: int, grads_checked: bool, device: torch.device,
                 world_size: int, optimizer: torch.optim.Optimizer | None = None, buffers: dict | None = None):
        enabled = validate != "off"
        self._full_undo = StepUndo(tensors) if enabled else None
        self._buffer_undo = StepUndo(lambda: buffers) if enabled and optimizer is not None and buffers is not None \
            else None
        self.optimizer = optimizer
        self.undo = self._full_undo  # the copy of this step (save() picks it)
        self._state_before: set = set()
        self.max_bad_steps = max_bad_steps
        self.grads_checked = grads_checked
        self.device = device
        self.world_size = world_size
        self.bad_steps = 0                  # bad (skipped) steps of the whole run, resumed ones included
        self.skipped_steps: list[int] = []  # the steps this process skipped
        self._pending: list = []            # (step, device bool "kept" or None, host reason or None, masks)
        self._flags = None                  # every rank's mask of the last kept() (skip_reasons.step_flags)
        self._reports: list[str] = []       # DCQLoss's reports of batches it kept out of the queue

    @property
    def enabled(self) -> bool:
        """Whether steps are checked (validate is not "off")."""
        return self._full_undo is not None

    @property
    def in_optimizer(self) -> bool:
        """Whether this step's update is skipped by the optimizer (fused, see
        :func:`skips_in_optimizer`), with only the BatchNorm statistics copied."""
        return self.undo is self._buffer_undo and self._buffer_undo is not None

    def save(self) -> None:
        """Before the step's forward (which moves the BatchNorm statistics): copy what
        the step may change and the optimizer cannot protect."""
        if self._buffer_undo is not None and skips_in_optimizer(self.optimizer):
            self.undo = self._buffer_undo
            # Parameters with optimizer state now: a state created by this step is reset after a bad one.
            self._state_before = {id(p) for p in self.optimizer.state}
        else:
            self.undo = self._full_undo
        self.undo.save()

    @torch.no_grad()
    def step(self, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, kept: torch.Tensor) -> None:
        """The optimizer step (and the scaler's update), kept where ``kept`` (a device
        bool from :meth:`kept`), undone everywhere else, with no host sync.

        A fused optimizer gets ``found_inf = not kept`` and skips the whole update (its
        state and Adam's step counter included) in its own kernel; under fp16 the
        GradScaler hands it the flag (``kept`` put one NaN into the gradients where
        the step is bad: see :meth:`kept`). What the step changes besides (the
        BatchNorm statistics; an optimizer state created by this very step, which
        fused SGD allocates uninitialised) goes back as :class:`StepUndo` says.
        Any other optimizer steps as usual and the full copy is put back.

        Parameters
        ----------
        optimizer : torch.optim.Optimizer
        scaler : torch.amp.GradScaler
        kept : torch.Tensor
            Whether the step is kept, a bool on the device.
        """
        if self.in_optimizer and not scaler.is_enabled():
            optimizer.found_inf = (~kept).to(torch.float32).reshape(())
            try:
                optimizer.step()
            finally:
                del optimizer.found_inf
        else:
            scaler.step(optimizer)
        scaler.update()
        self.undo.restore(kept)
        if self.in_optimizer:
            new = [value for p, state in optimizer.state.items() if id(p) not in self._state_before
                   for value in state.values() if isinstance(value, torch.Tensor) and value.device == kept.device]
            for group in by_device_and_dtype(new).values():
                group.select_(kept, None)  # a fresh optimizer's state: zeros (SGD's momentum, Adam's moments)

    def collect_report(self, head, first_step: int) -> None:
        """Ask the DCQ head for the report of a batch it kept out of its queue (DCQLoss
        would raise it at its next call; asked here, it is a log line at the next read,
        not the end of the run)."""
        report = head.pending_report()
        if report:
            if first_step:  # DCQLoss counts the calls of this process, from 1
                report += (f" (DCQLoss counts the steps of this process: its step k is step "
                           f"{first_step} + k of the run, resumed at step {first_step})")
            self._reports.append(report)

    def kept(self, loss: torch.Tensor, embeddings: torch.Tensor, class_weights: torch.Tensor | None,
             params) -> torch.Tensor:
        """Whether the step is kept, as a device bool: a finite loss, finite head inputs
        (a loss can stay finite with a non-finite class weight: only its gradient is NaN)
        and, unless the GradScaler checks them, finite gradients. Under several ranks
        every rank keeps or undoes the same steps, so that the weights stay equal."""
        # Every rank's mask of what is wrong (skip_reasons): the one all-reduce of the step
        # carries which rank and why, read with the flags.
        self._flags = step_flags(loss, embeddings, class_weights,
                                 self._grads_finite(params) if self.grads_checked else None, self.world_size)
        kept = (self._flags == 0).all()
        self.tell_scaler(kept, params)
        return kept

    def tell_scaler(self, kept: torch.Tensor, params) -> None:
        """fp16 with a fused optimizer: the GradScaler sets the optimizer's found_inf from
        the gradients (and lowers its scale); one NaN in one gradient where the step is
        bad makes it skip this step too. Called before clipping unscales them."""
        if self.in_optimizer and not self.grads_checked:
            grad = next((p.grad for p in params if p.grad is not None), None)
            if grad is not None:
                while grad.dim():  # its first element, as a view (written through)
                    grad = grad[0]
                grad.add_(torch.where(kept, 0.0, math.nan).to(grad.dtype))

    def _grads_finite(self, params) -> torch.Tensor:
        """Whether every gradient is finite, as a device bool: GradScaler's own check
        (one multi-tensor pass; the "unscale" by 1 leaves every value as it is)."""
        grads = [p.grad for p in params if p.grad is not None]
        found = torch.zeros(1, device=self.device)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, found, torch.ones(1, device=self.device))
        return found[0] == 0

    def check_batch_now(self, embeddings, labels, class_weights, num_classes: int) -> str | None:
        """DCQLoss's host-side value checks (eager validation, several ranks), run first:
        why the batch is bad, or None. Under several ranks every rank skips when any
        rank's batch is bad: the collectives of the step must match."""
        if self.world_size > 1:  # which rank's batch is bad, and why, in the one exchange
            return batch_problem(embeddings, labels, class_weights, num_classes, self.world_size)
        try:
            check_values_now(embeddings, labels.view(-1), class_weights, num_classes)
        except ValueError as exc:
            return f"DCQLoss would reject the batch ({exc})"
        return None

    def record(self, step: int, kept: torch.Tensor | None, reason: str | None = None) -> None:
        """Keep step ``step``'s flag (None: skipped on the host, for ``reason``) for the next read,
        with every rank's mask of :meth:`kept`."""
        self._pending.append((step, kept, reason, None if kept is None else self._flags))

    def read(self, progress, log, step: int, steps_per_epoch: int) -> int:
        """Read the flags of the steps since the last read (one transfer; called where
        the loop syncs anyway: log lines, checkpoints, every step under eager
        validation), log each skipped step, and stop past max_bad_steps. Returns the
        number of skipped steps found."""
        for text in self._reports:
            progress.message(text)
            log.write({"kind": "warning", "step": step, "epoch": step / steps_per_epoch, "message": text})
        self._reports = []
        if not self._pending:
            return 0
        flags = [masks for _, kept, _, masks in self._pending if kept is not None]
        values = iter(torch.stack(flags).tolist() if flags else [])  # every rank's mask of each step
        bad = []
        for at, kept, reason, _ in self._pending:
            masks = next(values) if kept is not None else None
            if kept is None or any(masks):
                bad.append((at, reason or describe_step(masks, self.grads_checked)))
        self._pending = []
        limit = self.max_bad_steps
        for at, reason in bad:
            self.bad_steps += 1
            self.skipped_steps.append(at)
            log.write({"kind": "skip", "step": at, "epoch": at / steps_per_epoch, "skipped": 1, "message": reason})
            progress.message(f"step {at}: {reason}: update skipped (bad step {self.bad_steps}; "
                             f"--max-bad-steps {limit})")
        if self.bad_steps > limit:
            last_step, last_reason = bad[-1]
            raise TrainingError(
                f"stopped at step {step}: {self.bad_steps} bad steps, more than --max-bad-steps {limit} (the "
                f"last at step {last_step}: {last_reason}). Their updates were skipped, so the weights are those of "
                f"the last good step; the newest checkpoint in --output resumes before them. Look for NaN/inf in "
                f"the data, or lower --lr / raise --clip-grad")
        return len(bad)


class LoopGuard:
    """The bad-step guard for a training loop of your own (the arcface_torch migration
    patch uses it in ``train_v2.py``): the same device-side decision as ``dcq-train``'s,
    with no host sync of its own.

    Per step: :meth:`begin` before the forward (it copies the BatchNorm statistics that
    the forward moves), :meth:`kept` after ``backward()`` and before clipping (whether
    the loss, the head's inputs and the gradients are finite, as a device bool, the same
    on every rank), :meth:`step` instead of ``optimizer.step()`` (or ``scaler.step`` and
    ``scaler.update``): the update is kept where the flag is true and skipped (a fused
    optimizer's ``found_inf``) or undone everywhere else. Read the flag where the loop
    syncs anyway (a ``loss.item()``).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Fused SGD, Adam or AdamW skip a bad update themselves; any other optimizer gets
        its parameters and state copied before each step.
    modules : iterable of torch.nn.Module
        Those whose buffers (BatchNorm statistics) a forward changes: the backbone, the
        weight generator.
    scaler : torch.amp.GradScaler, optional
        The fp16 GradScaler, when there is one: it skips a step whose scaled gradients
        overflowed itself (routine, not a bad step), and a bad step through it.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, modules, scaler: torch.amp.GradScaler | None = None):
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        if not params:
            raise ValueError("optimizer must hold at least one parameter that requires a gradient, got none")
        device = params[0].device
        buffers = {(i, name): b for i, module in enumerate(modules) for name, b in module.named_buffers()}
        self.optimizer = optimizer
        self.params = params
        self.scaler = scaler if scaler is not None else torch.amp.GradScaler(device.type, enabled=False)
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        self.guard = StepGuard(lambda: step_tensors(params, optimizer, buffers), validate="async", max_bad_steps=0,
                               grads_checked=not self.scaler.is_enabled(), device=device, world_size=world_size,
                               optimizer=optimizer, buffers=buffers)

    def begin(self) -> None:
        """Before the step's forward."""
        self.guard.save()

    def check_batch(self, embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor,
                    num_classes: int) -> str | None:
        """DCQLoss's own checks of a batch (finite embeddings and class weights, labels in
        ``[0, num_classes)``), on the host, before the loss: why the batch is bad, or None.
        Under several ranks DCQLoss checks on the host itself and raises; asked first, a
        bad batch on any rank is a skipped step on every rank instead (a host sync: use
        it where the loop syncs anyway, as train_v2.py's ``loss.item()`` does).

        Parameters
        ----------
        embeddings, labels, class_weights : torch.Tensor
            The DCQ head's inputs.
        num_classes : int
            The number of classes.

        Returns
        -------
        str or None
        """
        return self.guard.check_batch_now(embeddings, labels, class_weights, num_classes)

    def kept(self, loss: torch.Tensor, embeddings: torch.Tensor, class_weights: torch.Tensor | None = None,
             problem: str | None = None) -> torch.Tensor:
        """Whether the step is kept, a device bool (after ``backward()``, before clipping).

        Parameters
        ----------
        loss, embeddings : torch.Tensor
            The step's loss and the backbone's embeddings.
        class_weights : torch.Tensor, optional
            The weight generator's output.
        problem : str, optional
            :meth:`check_batch`'s answer: not None skips the step (on every rank, as
            :meth:`check_batch` agreed).

        Returns
        -------
        torch.Tensor
            A bool on the device, equal on every rank.
        """
        if problem is not None:
            kept = torch.zeros((), dtype=torch.bool, device=self.guard.device)
            self.guard.tell_scaler(kept, self.params)
            return kept
        return self.guard.kept(loss, embeddings, class_weights, self.params)

    def step(self, kept: torch.Tensor) -> None:
        """The optimizer step (and the scaler's update) where ``kept``, none elsewhere.

        Parameters
        ----------
        kept : torch.Tensor
            :meth:`kept`'s flag.
        """
        self.guard.step(self.optimizer, self.scaler, kept)
