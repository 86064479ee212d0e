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
    target_logit = margin_logit(target_cos, margin.scale, margin.m1, margin.m2, margin.m3, margin.straight_through)
    if margin.interclass_filtering_threshold > 0:
        dirty = cosine.detach() > margin.interclass_filtering_threshold
        dirty[rows, labels] = False
        cosine = cosine.masked_fill(dirty, 0.0)
    logits = margin.scale * cosine
    logits = logits.index_put((rows, labels), target_logit)
    return F.cross_entropy(logits.float(), labels)


class FullSoftmaxHead(nn.Module):
    """Normalised FC over all classes: weights [C, D] (and their optimizer state) in memory."""

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
    sample of the others, ceil(sample_rate * C) classes in all."""

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
    """The Dynamic Class Queue head: no per-class parameter at all."""

    needs_class_weights = True

    def __init__(self, num_classes: int, embedding_size: int, margin_loss=None, sample_rate: float = 0.1,
                 queue_size: int | None = None, backend: str = "auto", fp16: bool = False, validate: bool = False):
        super().__init__()
        self.loss = DCQLoss(margin_loss, embedding_size, num_classes, sample_rate, fp16,
                            queue_size=queue_size, backend=backend, validate=validate)

    def forward(self, embeddings, labels, class_weights):
        if class_weights is None:
            raise ValueError("DCQHead needs class_weights (the weight generator's embeddings), got None")
        return self.loss(embeddings, labels, class_weights)


HEADS = {"dcq": DCQHead, "softmax": FullSoftmaxHead, "partial_fc": PartialFCHead}


def build_head(name: str, num_classes: int, embedding_size: int, margin_loss=None, sample_rate: float = 0.1,
               **kwargs) -> nn.Module:
    """A head by name: "dcq", "softmax" (full) or "partial_fc"."""
    if name not in HEADS:
        raise ValueError(f"head must be one of {sorted(HEADS)}, got {name!r}")
    if name == "softmax":
        return FullSoftmaxHead(num_classes, embedding_size, margin_loss)
    if name == "partial_fc":
        return PartialFCHead(num_classes, embedding_size, margin_loss, sample_rate)
    return DCQHead(num_classes, embedding_size, margin_loss, sample_rate, **kwargs)
