"""DCQLoss: the drop-in replacement of arcface_torch's PartialFC_V2."""

from __future__ import annotations

import math

import torch
from torch import nn

from dcq_ops.backends import select_backend
from dcq_ops.batch_guard import BatchGuard, check_values_now
from dcq_ops.loss_kernels import LossKernels
from dcq_ops.margin import margin_from
from dcq_ops.parallel import STRATEGIES, check_mode, make_sharded_queue, resolve_mode, world_size_and_rank
from dcq_ops.parallel.queue_state import gather_queue_state
from dcq_ops.queue import ClassQueue
from dcq_ops.validation import (check_float_tensor, check_int, check_label_tensor, check_loss_arguments,
                                check_number, check_positive_int, check_reduction)

QUEUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VALIDATE_MODES = ("async", "eager", "off")


def auto_queue_dtype(device) -> torch.dtype:
    """queue_dtype="auto": bf16 on CUDA (the GEMMs on the tensor cores), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class DCQLoss(nn.Module):
    """Margin softmax loss against a Dynamic Class Queue instead of a class-weight matrix:
    the drop-in replacement of arcface_torch's ``PartialFC_V2``.

    ``forward(embeddings, labels, class_weights)`` is the loss of the batch against the
    queue as it was before the call; then, in training mode only, the (normalised)
    ``class_weights`` and ``labels`` are enqueued. ``class_weights`` are the weight
    generator's embeddings of a second view of each sample and receive no gradient.
    The queue's memory and the loss's cost do not depend on the number of classes.

    Parameters
    ----------
    margin_loss : object or None
        None (the paper's CosFace, s=50, m=0.3), a MarginConfig, or arcface_torch's
        ``CombinedMarginLoss`` / ``ArcFace`` / ``CosFace`` (read by attribute: see
        ``margin_from``).
    embedding_size : int
        D, the embeddings' width.
    num_classes : int, optional
        The number of identities: labels must be below it (checked on the device).
    sample_rate : float
        In (0, 1]: the queue holds ``ceil(sample_rate * num_classes)`` slots unless
        ``queue_size`` is given (arcface_torch's name for the share of classes).
    fp16 : bool
        ``queue_dtype=torch.float16`` (as ``PartialFC_V2(fp16=True)`` runs its GEMMs in fp16).
    queue_size : int, optional
        The number of slots (of the global queue, when sharded).
    queue_dtype : "auto" or torch.dtype
        The dtype of the queue and of both GEMMs' operands; accumulation, the loss and
        the gradient are fp32 (docs/loss.md, "Numerics"). "auto": bf16 on CUDA (tensor
        cores), fp32 on the CPU, following the module through ``.cuda()``/``.cpu()``. An
        fp32 queue on CUDA uses TF32 unless ``torch.get_float32_matmul_precision() ==
        "highest"``. Under autocast the loss is still accumulated in fp32.
    backend : str
        "auto", "triton", "chunked" or "reference" (``dcq_ops.backends()``).
    validate : str or bool
        "async" (default, ``True``): every training batch is checked on the device with
        no host sync; a batch with a bad label or a non-finite or zero value is never
        enqueued, and ``ValueError`` naming the step and the reason is raised at a later
        call: in one process the first call after the verdict has reached the host (it
        never waits for it), under several ranks the next call on every rank (or by
        ``check()``). "eager": raised at once (one host sync per step).
        "off" (``False``): nothing is checked. docs/validation.md says what each protects.
    reduction : str
        "mean", "sum" or "none".
    save_queue : bool
        Keep the queue in ``state_dict`` (False: as the paper's code did).
    device : torch.device or str, optional
        Where the queue is created.
    distributed : str
        "auto", "none", "gathered" or "sharded": how ranks of torch.distributed share
        the queue (docs/distributed.md); "auto" is "gathered" (every rank holds the same
        queue, the paper's) under a process group of more than one rank.
    process_group : ProcessGroup, optional
        Default: the default group.
    """

    def __init__(
        self,
        margin_loss=None,
        embedding_size: int = 512,
        num_classes: int | None = None,
        sample_rate: float = 0.1,
        fp16: bool = False,
        *,
        queue_size: int | None = None,
        queue_dtype="auto",
        backend: str = "auto",
        validate="async",
        reduction: str = "mean",
        save_queue: bool = True,
        device=None,
        distributed: str = "auto",
        process_group=None,
    ):
        super().__init__()
        self.margin = margin_from(margin_loss)
        check_positive_int("embedding_size", embedding_size)
        check_positive_int("num_classes", num_classes, allow_none=True)
        if queue_size is None:
            if num_classes is None:
                raise ValueError("give queue_size, or num_classes and sample_rate (queue = ceil(sample_rate * num_classes))")
            sample_rate = check_number("sample_rate", sample_rate, low=0.0, high=1.0, low_open=True)
            queue_size = math.ceil(sample_rate * num_classes)
        check_positive_int("queue_size", queue_size)
        check_reduction(reduction)
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.fp16 = bool(fp16)
        self.queue_dtype = self._check_queue_dtype(queue_dtype, self.fp16)
        self.backend = backend
        self.validate = self._check_validate(validate)
        self.reduction = reduction
        # Several ranks: see dcq_ops/parallel/ and docs/distributed.md.
        self.distributed = check_mode(distributed)
        self.process_group = process_group
        dtype = self._queue_dtype_for(torch.device(device) if device is not None else torch.device("cpu"))
        if self.distributed == "sharded":
            self.queue = make_sharded_queue(process_group, queue_size, embedding_size, dtype=dtype,
                                            device=device, persistent=save_queue)
        else:
            self.queue = ClassQueue(queue_size, embedding_size, dtype=dtype, device=device, persistent=save_queue)
        self.guard = BatchGuard(num_classes, device=device)
        select_backend(self.queue.weights.device, backend)  # fail early on an unusable backend
        self.kernels = LossKernels(self.margin, backend)

    # ----------------------------------------------------------------- settings

    @staticmethod
    def _check_queue_dtype(queue_dtype, fp16: bool):
        if fp16:
            if queue_dtype not in ("auto", torch.float16):
                raise ValueError(f"fp16=True means queue_dtype=torch.float16, got queue_dtype={queue_dtype!r}")
            return torch.float16
        if queue_dtype != "auto" and queue_dtype not in QUEUE_DTYPES:
            raise TypeError(f"queue_dtype must be 'auto' or one of {QUEUE_DTYPES}, got {queue_dtype!r}")
        return queue_dtype

    @staticmethod
    def _check_validate(validate) -> str:
        if validate is True:
            return "async"
        if validate is False:
            return "off"
        if validate not in VALIDATE_MODES:
            raise ValueError(f"validate must be one of {VALIDATE_MODES} (or True = 'async', False = 'off'), "
                             f"got {validate!r}")
        return validate

    def _queue_dtype_for(self, device: torch.device) -> torch.dtype:
        return auto_queue_dtype(device) if self.queue_dtype == "auto" else self.queue_dtype

    def _apply(self, fn, recurse=True):
        """Moving the module (``.cuda()``, ``.cpu()``, ``.to(device)``) moves the queue; with
        queue_dtype="auto" its dtype follows the device (bf16 on CUDA, fp32 elsewhere)."""
        before = self.queue.weights.device.type
        result = super()._apply(fn, recurse)
        weights = self.queue.weights
        if self.queue_dtype == "auto" and weights.device.type != before:
            self.queue.weights = weights.to(self._queue_dtype_for(weights.device))
        return result

    def extra_repr(self) -> str:
        m = self.margin
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, queue_size={self.queue_size}, "
                f"queue_dtype={self.queue.weights.dtype}, s={m.scale}, m1={m.m1}, m2={m.m2}, m3={m.m3}, "
                f"filter={m.interclass_filtering_threshold}, straight_through_margin={m.straight_through_margin}, "
                f"backend={self.backend}, validate={self.validate}")

    @property
    def resolved_backend(self) -> str:
        """The backend that runs for this module's device ("auto" resolved)."""
        return select_backend(self.queue.weights.device, self.backend, warn=False)

    @property
    def queue_size(self) -> int:
        """The number of slots of the queue (of the global queue, when it is sharded)."""
        return self.queue.queue_size

    @property
    def no_class_label(self) -> int:
        """The label of queue slots that belong to no class (``num_classes``): a negative
        for every row, never excluded. ``prefill`` gives it to random warm-up vectors.
        Without ``num_classes`` there is none (every label >= 0 may be a class)."""
        if self.num_classes is None:
            raise ValueError("DCQLoss without num_classes has no label of no class: give num_classes, or labels")
        return self.num_classes

    @torch.no_grad()
    def prefill(self, class_weights: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        """Enqueue class weights without computing a loss: a warm-up of the queue before the
        first step (e.g. the weight generator's embeddings of training images, or random
        vectors), so that every slot is a negative from the start.

        Parameters
        ----------
        class_weights : torch.Tensor
            [B, D] with B <= ``queue_size``; normalised on the way in, as in a step.
        labels : torch.Tensor, optional
            [B] integer labels in [0, num_classes); default: ``no_class_label`` for every
            row (random warm-up vectors belong to no class).

        Notes
        -----
        The values are checked at once (one host sync: this is not a training step). In
        the gathered mode every rank must prefill the same batch, so that the queues stay
        equal; in the sharded mode too (each rank writes the slots of its block).
        """
        # check_values_now's embeddings are an empty slice: a prefill has none to check.
        if labels is None:
            check_float_tensor("class_weights", class_weights, dim=2)
            labels = torch.full((class_weights.shape[0],), self.no_class_label, dtype=torch.long,
                                device=class_weights.device)
            check_values_now(class_weights[:0], labels, class_weights, None)  # the label is above every class
        else:
            labels = check_label_tensor("labels", labels)
            check_values_now(class_weights[:0], labels, class_weights, self.num_classes)
        self.queue.enqueue(class_weights.detach(), labels)

    def global_state_dict(self, *, device="cpu", dst: int | None = None):
        """``state_dict()`` with the queue in its topology-free *global form*: the keys of an
        unsharded queue (``queue.weights`` [K, D], ``queue.labels`` [K], ``queue.ptr``),
        in global slot order, naming no mode, rank or world size. ``load_state_dict``
        takes it in "none", "gathered" and "sharded" at any world size (a sharded rank
        keeps its block), so a checkpoint of it resumes on any number of GPUs
        (docs/distributed.md, "Checkpoints").

        In "sharded" mode this is a collective: every rank must call it (the blocks are
        gathered one rank at a time onto ``device``, see
        ``dcq_ops.parallel.queue_state.gather_queue_state``). In "gathered" mode every
        rank already holds the whole queue and nothing is communicated; in "none" it is
        ``state_dict()`` with the queue copied to ``device``.

        Parameters
        ----------
        device : torch.device or str
            Where the queue's tensors are put (default: the CPU, ready for ``torch.save``).
        dst : int, optional
            Under several ranks ("gathered", "sharded"), the rank that gets the state (the
            others take part and get None), e.g. 0 when rank 0 writes the checkpoint;
            default: every rank.

        Returns
        -------
        dict or None
        """
        state = self.state_dict()
        sharded = self.distributed == "sharded"
        # "none": every process on its own; otherwise the ranks of the group (1 without one).
        world, rank = world_size_and_rank(self.process_group) if self.distributed != "none" else (1, 0)
        if dst is not None:
            check_int("dst", dst, minimum=0)
            if dst >= world:
                raise ValueError(f"dst must be a rank of the group, in [0, {world}), got {dst}")
        names = {"queue." + n for n in ("weights", "labels", "ptr", "shard")}
        if "queue.weights" not in state:  # save_queue=False: nothing of the queue to gather
            return state if dst is None or rank == dst else None
        gathered = gather_queue_state(self.queue, self.process_group, device=device, dst=dst if sharded else None)
        if dst is not None and rank != dst:
            return None
        out = type(state)((k, v) for k, v in state.items() if k not in names)
        out.update({"queue.weights": gathered[0], "queue.labels": gathered[1], "queue.ptr": gathered[2]})
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            out._metadata = metadata
        return out

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "weight" in state_dict and prefix + "queue.weights" not in state_dict:
            raise ValueError(
                f"DCQLoss cannot load a PartialFC / FC checkpoint (it holds '{prefix}weight', a class-weight "
                f"matrix of shape {tuple(state_dict[prefix + 'weight'].shape)}): DCQ has no class weights to load - "
                "they are generated from images by the weight generator, and the queue fills itself within a few "
                "hundred steps. Load the backbone from that checkpoint (and, for the weight generator, copy it: "
                "MomentumEncoder(backbone)), and start DCQLoss empty.")
        labels = state_dict.get(prefix + "queue.labels")
        if self.num_classes is not None and isinstance(labels, torch.Tensor) and labels.numel():
            high = int(labels.max())  # the queue itself checks everything that does not need num_classes
            if high > self.no_class_label:
                raise ValueError(f"loading DCQLoss: the queue's labels must be < num_classes = {self.num_classes} "
                                 f"(or num_classes itself, the label of warm-up slots of no class), got {high} "
                                 "(a checkpoint of a run with more classes?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def prepare(self, batch_shapes, *, dtype: torch.dtype = torch.float32, evaluation: bool = False) -> list:
        """Compile, autotune and check (first contact: dcq_ops.first_contact) the loss's
        kernels now for these batch shapes, on synthetic inputs against a synthetic queue of
        this module's size, dtype and device, so that no training step compiles, autotunes,
        checks or waits for the GPU because of the loss: call it before capturing CUDA
        graphs, or before ``torch.cuda.set_sync_debug_mode("error")``. Nothing is enqueued.

        Parameters
        ----------
        batch_shapes : iterable of int or tuple
            The rows N the loss will see, as ints or shapes ``(N, embedding_size)`` (e.g. the
            batch, and a smaller last batch). In the sharded mode give the gathered rows
            (world size x the local batch): this compiles and autotunes the queue pass the
            partials run; the sharded partials and finalize are checked on each rank at their
            first training call (dcq_ops.first_contact_sharded).
        dtype : torch.dtype
            The embeddings' dtype (e.g. torch.bfloat16 under autocast).
        evaluation : bool
            Also prepare the calls without a gradient (``eval()`` / ``no_grad``).

        Returns
        -------
        list of dcq_ops.first_contact.Outcome
            What the check found for each shape class ("passed", "demoted", "skipped").
        """
        from dcq_ops.warmup import warmup

        rows = []
        for i, shape in enumerate(batch_shapes):
            if isinstance(shape, (tuple, list, torch.Size)):
                if len(shape) != 2 or shape[1] != self.embedding_size:
                    raise ValueError(f"batch_shapes[{i}] must be N or (N, {self.embedding_size}) (DCQLoss's "
                                     f"embedding_size), got {tuple(shape)!r}")
                shape = shape[0]
            rows.append(check_positive_int(f"batch_shapes[{i}]", shape))
        weights = self.queue.weights
        return warmup(rows, self.embedding_size, weights.shape[0], margin=self.margin, dtype=dtype,
                      queue_dtype=weights.dtype, device=weights.device, backend=self.backend, training=True,
                      evaluation=evaluation)

    # ----------------------------------------------------------------- the step

    def strategy(self):
        """The queue strategy of this call (dcq_ops.parallel): the process group may be
        created after the module, so the mode is resolved at every call."""
        return STRATEGIES[resolve_mode(self.distributed, self.process_group)](self.queue, self.process_group)

    def check(self) -> None:
        """Raise now for a bad batch that validate="async" has recorded and not yet
        reported (e.g. at the end of training, or after compiled steps): it reads the
        device's status at once (one host sync)."""
        self.guard.check(now=True)

    def pending_report(self) -> str | None:
        """The report of a bad batch that validate="async" kept out of the queue and has not
        reported yet (the text of the ValueError the next call would raise), or None; once
        returned it is not raised. For a training loop that logs bad batches instead of
        stopping. On a GPU it waits for the last recorded step's status copy (an event
        recorded at the end of that step's loss, never the whole stream), so that it
        sees every step recorded so far; a plain forward call waits for nothing and
        reports a bad step once its copy has arrived.

        Returns
        -------
        str or None
        """
        try:
            self.guard.check(wait=True)
        except ValueError as exc:
            return str(exc)
        return None

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        """The loss of the batch against the queue as it was; then, in training mode, the
        batch's class weights and labels are enqueued.

        Parameters
        ----------
        embeddings : torch.Tensor
            [N, embedding_size], the feature extractor's output (the only input that
            receives a gradient).
        labels : torch.Tensor
            [N] or [N, 1] integer labels.
        class_weights : torch.Tensor
            [N, embedding_size], the weight generator's embeddings of a second view of
            each sample.

        Returns
        -------
        torch.Tensor
            The loss, reduced as ``reduction`` says (fp32).
        """
        strategy = self.strategy()
        multi_rank = strategy.mode != "none"
        eager = self.validate == "eager"
        # The device guard: value checks (validate="async") and, under several ranks, the
        # ranks' agreement, which is checked on the device whatever validate says.
        guarded = strategy.validates_on_device and not eager and (self.validate == "async" or multi_rank)
        if guarded:
            # A bad batch of an earlier step surfaces here. Several ranks must raise at the
            # same call (none may be left in a collective): they read the previous step's
            # status, waiting for it if the device has not reached it (BatchGuard.check).
            self.guard.check(wait=multi_rank)
        value_checks = guarded and self.validate == "async" and self.training
        batch = strategy.exchange(embeddings, lambda: self._prepare(embeddings, labels, class_weights, eager=eager),
                                  training=self.training, reasons=self.guard.reasons if value_checks else None,
                                  eager=eager)
        training = batch.training  # what the ranks agreed: a rank whose input was refused follows it
        if guarded and training:
            degenerate = BatchGuard.degenerate(batch.labels, self.queue.labels)
        rows = strategy.loss_rows(batch, self.kernels)
        loss = None if batch.placeholder else strategy.reduce(rows, batch, self.reduction)
        if training:
            strategy.enqueue(batch)
            if guarded:
                note = f"{type(batch.error).__name__}: {batch.error}" if batch.placeholder else None
                self.guard.record(batch.rank_reasons, degenerate, note=note)
        if batch.placeholder:
            # This rank's input was refused, and it took part in every collective of the step
            # with placeholder rows, so no rank is left waiting. In a guarded training step
            # every rank raises at the next call (together, as DDP needs); until then it
            # returns a zero loss with a zero gradient. Otherwise it raises now.
            if not (guarded and training) or not (isinstance(embeddings, torch.Tensor)
                                                  and embeddings.is_floating_point()):
                raise batch.error
            zero = embeddings.nan_to_num().float().sum(dim=-1) * 0.0  # finite * 0: a zero gradient
            return zero if self.reduction == "none" else zero.sum()
        return loss

    def _prepare(self, embeddings, labels, class_weights, *, eager: bool):
        """Every check of forward that reads no tensor value, and, with ``eager``, the
        value checks too (one host sync), before anything runs: a bad batch leaves the
        queue as it was. Returns the labels as int64 [N] and the detached class weights."""
        labels = self._flatten_labels(labels)
        # The embedding size first: with the wrong D the queue (of embedding_size columns)
        # would otherwise be blamed for the embeddings' shape.
        if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2 and embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [N, {self.embedding_size}] (DCQLoss's embedding_size), "
                             f"got shape {tuple(embeddings.shape)}")
        check_loss_arguments(embeddings, class_weights, labels, self.queue.weights, self.queue.labels)
        if self.training:
            self.queue.check_enqueue(class_weights, labels)
        class_weights = class_weights.detach()
        if eager and self.validate != "off":
            check_values_now(embeddings, labels, class_weights, self.num_classes)
        return labels, class_weights

    @staticmethod
    def _flatten_labels(labels: torch.Tensor) -> torch.Tensor:
        return check_label_tensor("labels", labels, allow_column=True)  # arcface_torch passes [N, 1]
