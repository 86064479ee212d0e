"""Classification heads behind one interface, so a training loop can swap them:

- ``DCQHead``: the Dynamic Class Queue (this package's loss);
- ``FullSoftmaxHead``: a normalised FC layer over every class with the same
  margin (what arcface_torch does with sample_rate 1.0);
- ``PartialFCHead``: Partial FC, the positives of the batch plus a random sample
  of the other classes each step (arcface_torch's PartialFC_V2, one process).

Every head is called as ``head(embeddings, labels, class_weights)`` and returns
the mean loss; ``class_weights`` (the weight generator's embeddings) is used by
DCQ only (``needs_class_weights`` tells whether to compute it).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from dcq_ops.loss import DCQLoss
from dcq_ops.margin import MarginConfig, margin_from, margin_logit


def margin_softmax_loss(cosine: torch.Tensor, labels: torch.Tensor, margin: MarginConfig) -> torch.Tensor:
    """Cross-entropy of margin logits over materialised class cosines [N, C]
    (labels index columns): the margin on the target, inter-class filtering on
    the others, as arcface_torch's CombinedMarginLoss."""
    rows = torch.arange(cosine.shape[0], device=cosine.device)
    target_cos = cosine[rows, labels]
    target_logit = margin_logit(target_cos, margin.scale, margin.m1, margin.m2, margin.m3, margin.straight_through_margin)
    if margin.interclass_filtering_threshold > 0:
        dirty = cosine.detach() > margin.interclass_filtering_threshold
        dirty[rows, labels] = False
        cosine = cosine.masked_fill(dirty, 0.0)
    logits = margin.scale * cosine
    logits = logits.index_put((rows, labels), target_logit)
    return F.cross_entropy(logits.float(), labels)


class FullSoftmaxHead(nn.Module):
    """Normalised FC over all classes: weights [C, D] (and their optimizer state) in memory.

    Parameters
    ----------
    num_classes : int
        C, the number of classes.
    embedding_size : int
        D, the embedding's size.
    margin_loss : MarginConfig or arcface_torch margin, optional
        The margin, as ``dcq_ops.margin.margin_from`` reads it (None: the paper's CosFace).
    """

    needs_class_weights = False

    def __init__(self, num_classes: int, embedding_size: int, margin_loss=None):
        super().__init__()
        self.margin = margin_from(margin_loss)
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def forward(self, embeddings, labels, class_weights=None):
        cosine = F.linear(F.normalize(embeddings), F.normalize(self.weight.to(embeddings.dtype)))
        return margin_softmax_loss(cosine.float(), labels.view(-1).long(), self.margin)


class PartialFCHead(nn.Module):
    """Partial FC: each step the batch's classes (always kept) plus a random
    sample of the others, ceil(sample_rate * C) classes in all.

    Parameters
    ----------
    num_classes, embedding_size, margin_loss
        As :class:`FullSoftmaxHead`'s.
    sample_rate : float
        The share of the classes in each step's softmax, in (0, 1].
    """

    needs_class_weights = False

    def __init__(self, num_classes: int, embedding_size: int, margin_loss=None, sample_rate: float = 0.1):
        super().__init__()
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        self.margin = margin_from(margin_loss)
        self.num_classes = num_classes
        self.num_sample = max(1, math.ceil(sample_rate * num_classes))
        self.weight = nn.Parameter(torch.normal(0, 0.01, (num_classes, embedding_size)))

    def sample(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted class indices kept this step, labels remapped into them)."""
        positives = torch.unique(labels)
        if self.num_sample <= positives.numel():
            kept = positives
        else:
            score = torch.rand(self.num_classes, device=labels.device)
            score[positives] = 2.0  # positives first
            kept = torch.topk(score, self.num_sample).indices.sort().values
        return kept, torch.searchsorted(kept, labels)

    def forward(self, embeddings, labels, class_weights=None):
        labels = labels.view(-1).long()
        kept, local_labels = self.sample(labels)
        weight = F.normalize(self.weight[kept].to(embeddings.dtype))
        cosine = F.linear(F.normalize(embeddings), weight)
        return margin_softmax_loss(cosine.float(), local_labels, self.margin)


class DCQHead(nn.Module):
    """The Dynamic Class Queue head: no per-class parameter at all.

    ``validate`` is DCQLoss's ("async", "eager", "off"; True / False as there): with
    "async" a batch with a bad label or a non-finite value never enters the queue,
    and DCQLoss raises ValueError naming it at its next call; a training loop that
    would rather log it than stop asks :meth:`pending_report` before each call.

    Parameters
    ----------
    num_classes : int
        The number of classes (labels are in [0, num_classes)).
    embedding_size : int
        The embedding's size.
    margin_loss : MarginConfig or arcface_torch margin, optional
        The margin, as ``dcq_ops.margin.margin_from`` reads it (None: the paper's CosFace).
    sample_rate : float
        The queue holds ceil(sample_rate * num_classes) class weights...
    queue_size : int, optional
        ...unless this gives its size.
    backend : str
        DCQLoss's backend ("auto", "triton", "chunked", "reference").
    fp16 : bool
        Keep the queue in fp16.
    validate : str or bool
        DCQLoss's validation mode.
    distributed : str
        DCQLoss's ``distributed``: how ranks share the queue ("auto", "none", "gathered",
        "sharded").
    """

    needs_class_weights = True

    def __init__(self, num_classes: int, embedding_size: int, margin_loss=None, sample_rate: float = 0.1,
                 queue_size: int | None = None, backend: str = "auto", fp16: bool = False, validate="async",
                 distributed: str = "auto"):
        super().__init__()
        self.loss = DCQLoss(margin_loss, embedding_size, num_classes, sample_rate, fp16,
                            queue_size=queue_size, backend=backend, validate=validate, distributed=distributed)

    def pending_report(self) -> str | None:
        """DCQLoss's report of a batch it kept out of the queue under validate="async"
        and has not reported yet (the text of the ValueError it would raise at its next
        call), or None; asked, it is not raised again. On a GPU it waits only for the
        last step's status copy, as the loss's own check at its next call would.

        Returns
        -------
        str or None
        """
        return self.loss.pending_report()

    def forward(self, embeddings, labels, class_weights):
        if class_weights is None:
            raise ValueError("DCQHead needs class_weights (the weight generator's embeddings), got None")
        return self.loss(embeddings, labels, class_weights)


HEADS = {"dcq": DCQHead, "softmax": FullSoftmaxHead, "partial_fc": PartialFCHead}


def build_head(name: str, num_classes: int, embedding_size: int, margin_loss=None, sample_rate: float = 0.1,
               **kwargs) -> nn.Module:
    """A head by name.

    Parameters
    ----------
    name : str
        "dcq", "softmax" (full) or "partial_fc".
    num_classes : int
        The number of classes.
    embedding_size : int
        The embedding's size.
    margin_loss : MarginConfig or arcface_torch margin, optional
        The margin, as ``dcq_ops.margin.margin_from`` reads it (None: the paper's CosFace).
    sample_rate : float
        DCQ's queue share of the classes, or Partial FC's sample rate (unused by "softmax").
    **kwargs
        DCQHead's other arguments (queue_size, backend, fp16, validate, distributed).

    Returns
    -------
    torch.nn.Module
        Called as ``head(embeddings, labels, class_weights)``, returning the mean loss.
    """
    if name not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {name!r}")
    if name == "softmax":
        return FullSoftmaxHead(num_classes, embedding_size, margin_loss)
    if name == "partial_fc":
        return PartialFCHead(num_classes, embedding_size, margin_loss, sample_rate)
    return DCQHead(num_classes, embedding_size, margin_loss, sample_rate, **kwargs)
