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

    ``fp16=True`` keeps the queue in float16 and, as ``PartialFC_V2(fp16=True)``,
    runs the loss's GEMMs in it (fp32 accumulation). Under autocast the loss is
    still accumulated in fp32, whatever the backend.
    ``validate=True`` checks labels and finiteness with one host sync per step
    (under torch.compile: asynchronous asserts, no graph break, RuntimeError);
    ``validate=False`` turns that off. ``save_queue=False`` leaves the queue out
    of ``state_dict`` (as the paper's code did).

    ``distributed`` ("auto", "none", "gathered", "sharded") and ``process_group``
    (default: the default group): how ranks of torch.distributed share the queue;
    "auto" is "gathered" (the paper's: every rank holds the same queue) under a
    process group of more than one rank. See docs/distributed.md.
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
        backend: str = "auto",
        validate: bool = True,
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
        self.fp16 = fp16
        self.backend = backend
        self.validate = validate
        self.reduction = reduction
        # Several ranks: see dcq_ops/parallel/ and docs/distributed.md.
        self.distributed = check_mode(distributed)
        self.process_group = process_group
        queue_dtype = torch.float16 if fp16 else torch.float32
        if self.distributed == "sharded":
            self.queue = make_sharded_queue(process_group, queue_size, embedding_size, dtype=queue_dtype,
                                            device=device, persistent=save_queue)
        else:
            self.queue = ClassQueue(queue_size, embedding_size, dtype=queue_dtype, device=device,
                                    persistent=save_queue)
        select_backend(self.queue.weights.device, backend)  # fail early on an unusable backend
        self.row_loss = RowLoss(self.margin, backend, half_gemm=fp16)

    def extra_repr(self) -> str:
        m = self.margin
        return (f"embedding_size={self.embedding_size}, num_classes={self.num_classes}, queue_size={self.queue.size}, "
                f"s={m.scale}, m1={m.m1}, m2={m.m2}, m3={m.m3}, "
                f"filter={m.interclass_filtering_threshold}, straight_through={m.straight_through}, backend={self.backend}")

    @property
    def resolved_backend(self) -> str:
        """The backend that runs for this module's device ("auto" resolved)."""
        return select_backend(self.queue.weights.device, self.backend)

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

    def _check_values(self, embeddings, labels, class_weights) -> None:
        """Label range and finiteness, read with a single host sync."""
        stats = torch.stack([
            labels.min(), labels.max(),
            (~torch.isfinite(embeddings)).sum(), (~torch.isfinite(class_weights)).sum(),
        ]).tolist()
        low, high, bad_embeddings, bad_weights = stats
        if low < 0:
            raise ValueError(f"labels must be >= 0, got a label of {low}")
        if self.num_classes is not None and high >= self.num_classes:
            raise ValueError(f"labels must be < num_classes = {self.num_classes}, got a label of {high}")
        if bad_embeddings:
            raise ValueError(f"embeddings must be finite, got {bad_embeddings} NaN or infinite values")
        if bad_weights:
            raise ValueError(f"class_weights must be finite, got {bad_weights} NaN or infinite values")

    def _assert_values(self, embeddings, labels, class_weights) -> None:
        """The checks of _check_values inside a torch.compile graph: asynchronous asserts
        (no host sync, no graph break) that raise RuntimeError with these messages
        (on CUDA, a device-side assert)."""
        torch._assert_async((labels >= 0).all(), "labels must be >= 0, got a negative label")
        if self.num_classes is not None:
            torch._assert_async((labels < self.num_classes).all(),
                                f"labels must be < num_classes = {self.num_classes}, got a larger label")
        torch._assert_async(torch.isfinite(embeddings).all(), "embeddings must be finite, got NaN or infinite values")
        torch._assert_async(torch.isfinite(class_weights).all(),
                            "class_weights must be finite, got NaN or infinite values")

    def strategy(self):
        """The queue strategy of this call (dcq_ops.parallel): the process group may be
        created after the module, so the mode is resolved at every call."""
        return STRATEGIES[resolve_mode(self.distributed, self.process_group)](self.queue, self.process_group)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, class_weights: torch.Tensor) -> torch.Tensor:
        strategy = self.strategy()
        batch = strategy.exchange(embeddings, lambda: self._prepare(embeddings, labels, class_weights),
                                  training=self.training)
        loss = strategy.reduce(strategy.loss_rows(batch, self.row_loss), batch, self.reduction)
        if self.training:
            strategy.enqueue(batch)
        return loss

    def _prepare(self, embeddings, labels, class_weights):
        """Every check of forward, before anything runs (a bad batch leaves the queue as it
        was); returns the labels as int64 [N] and the detached class weights."""
        labels = self._flatten_labels(labels)
        check_arguments(embeddings, class_weights, labels, self.queue.weights, self.queue.labels)
        if embeddings.shape[1] != self.embedding_size:
            raise ValueError(f"embeddings must be [N, {self.embedding_size}] (embedding_size), got {tuple(embeddings.shape)}")
        if self.training:
            self.queue.check_enqueue(class_weights, labels)  # before anything runs: a bad batch leaves the queue as it was
        class_weights = class_weights.detach()
        if self.validate:
            if torch.compiler.is_compiling():
                self._assert_values(embeddings, labels, class_weights)
            else:
                self._check_values(embeddings, labels, class_weights)
        return labels, class_weights
