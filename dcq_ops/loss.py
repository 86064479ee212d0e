"""DCQLoss: the drop-in replacement of arcface_torch's PartialFC_V2."""

from __future__ import annotations

import math

import torch
from torch import nn

from dcq_ops.algebra import RowLoss
from dcq_ops.backends import select_backend
from dcq_ops.functional import check_arguments
from dcq_ops.margin import margin_from
from dcq_ops.parallel import STRATEGIES, check_mode, make_sharded_queue, resolve_mode
from dcq_ops.queue import ClassQueue
from dcq_ops.validation import BatchGuard, check_values_now

QUEUE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
VALIDATE_MODES = ("async", "eager", "off")


def auto_queue_dtype(device) -> torch.dtype:
    """queue_dtype="auto": bf16 on CUDA (the GEMMs on the tensor cores), fp32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


class DCQLoss(nn.Module):
    """Margin softmax loss against a Dynamic Class Queue instead of a class-weight matrix.

    The first five parameters mirror ``PartialFC_V2(margin_loss, embedding_size,
    num_classes, sample_rate, fp16)``. The queue holds ``queue_size`` slots, or
    else ``ceil(sample_rate * num_classes)``; its memory and the loss's cost do
    not depend on the number of classes otherwise.

    ``forward(embeddings, labels, class_weights)``: the loss of the batch against
    the queue as it was before the call; then, in training mode only, the
    (normalised) ``class_weights`` and ``labels`` are enqueued. ``class_weights``
    are the weight generator's embeddings of a second view of each sample and
    receive no gradient.

    Dtypes: both GEMMs of the loss take their operands in the queue's dtype;
    accumulation, the loss and the gradient are fp32 (docs/loss.md, "Numerics").
    ``queue_dtype="auto"`` is bf16 on CUDA (tensor cores) and fp32 on the CPU,
    and follows the module when it moves (``.cuda()``, ``.cpu()``); or give
    torch.float32, torch.bfloat16 or torch.float16. ``fp16=True`` means
    ``queue_dtype=torch.float16``, as ``PartialFC_V2(fp16=True)`` runs its GEMMs
    in fp16. An fp32 queue on CUDA uses TF32 unless
    ``torch.get_float32_matmul_precision() == "highest"``. Under autocast the
    loss is still accumulated in fp32.

    ``validate``: "async" (default, also ``True``) checks every training batch
    on the device with no host sync: a batch with a bad label (< 0 or >=
    num_classes) or a non-finite value is never enqueued, and ``ValueError``
    naming the step and the reason is raised at the next call (or by
    ``check()``); "eager" raises at once, at the cost of one host sync per step;
    "off" (also ``False``) checks nothing. See dcq_ops/validation.py.
    ``save_queue=False`` leaves the queue out of ``state_dict`` (as the paper's
    code did).

    ``distributed`` ("auto", "none", "gathered", "sharded") and ``process_group``
    (default: the default group): how ranks of torch.distributed share the queue
    (dcq_ops/parallel/); "auto" is "gathered" (the paper's: every rank holds the
    same queue) under a process group of more than one rank. See docs/distributed.md.
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
        if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size <= 0:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                        or num_classes <= 0):
            raise ValueError(f"num_classes must be a positive int or None, got {num_classes!r}")
        if queue_size is None:
            if num_classes is None:
                raise ValueError("give queue_size, or num_classes and sample_rate (queue = ceil(sample_rate * num_classes))")
            if not 0 < sample_rate <= 1:
                raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
            queue_size = math.ceil(sample_rate * num_classes)
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
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
        self.row_loss = RowLoss(self.margin, backend)

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
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, queue_size={self.queue.size}, "
                f"queue_dtype={self.queue.weights.dtype}, s={m.scale}, m1={m.m1}, m2={m.m2}, m3={m.m3}, "
                f"filter={m.interclass_filtering_threshold}, straight_through={m.straight_through}, "
                f"backend={self.backend}, validate={self.validate}")

    @property
    def resolved_backend(self) -> str:
        """The backend that runs for this module's device ("auto" resolved)."""
        return select_backend(self.queue.weights.device, self.backend)

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
            if high >= self.num_classes:
                raise ValueError(f"loading DCQLoss: the queue's labels must be < num_classes = {self.num_classes}, "
                                 f"got {high} (a checkpoint of a run with more classes?)")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        strategy = self.strategy()
        on_device = self.validate == "async" and strategy.mode == "none"
        if on_device:
            self.guard.check()  # a bad batch of an earlier step surfaces here
        batch = strategy.exchange(embeddings, lambda: self._prepare(embeddings, labels, class_weights,
                                                                     eager=self.validate == "eager" or not on_device),
                                  training=self.training)
        if on_device and self.training:
            batch.guard = self.guard.reasons(batch.embeddings, batch.labels, batch.class_weights)
            degenerate = BatchGuard.degenerate(batch.labels, self.queue.labels)
        loss = strategy.reduce(strategy.loss_rows(batch, self.row_loss), batch, self.reduction)
        if self.training:
            strategy.enqueue(batch)
            if on_device:
                self.guard.record(batch.guard, degenerate)
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
        check_arguments(embeddings, class_weights, labels, self.queue.weights, self.queue.labels)
        if self.training:
            self.queue.check_enqueue(class_weights, labels)
        class_weights = class_weights.detach()
        if eager and self.validate != "off":
            check_values_now(embeddings, labels, class_weights, self.num_classes)
        return labels, class_weights

    def _flatten_labels(self, labels: torch.Tensor) -> torch.Tensor:
        if not isinstance(labels, torch.Tensor):
            raise TypeError(f"labels must be a tensor, got {type(labels).__name__}")
        if labels.dim() == 2 and labels.shape[1] == 1:
            labels = labels.view(-1)
        if labels.dim() != 1:
            raise ValueError(f"labels must have shape [N] or [N, 1], got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        return labels.long()
