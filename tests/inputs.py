"""Random DCQ inputs for tests: odd sizes, duplicate labels, empty slots."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def make_inputs(rows=37, dim=45, slots=203, num_classes=60, empty=17, dtype=torch.float32, queue_dtype=None,
                device="cpu", seed=0, positive_alignment=0.5):
    """(embeddings, class_weights, labels, queue_weights, queue_labels).

    Few classes relative to the batch and queue, so labels repeat within the
    batch and within the queue and many entries are excluded; `empty` queue
    slots hold label -1. Class weights are correlated with the embeddings
    (`positive_alignment`) so positive cosines are not all near 0.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, (rows,), generator=g)
    queue_labels = torch.randint(0, num_classes, (slots,), generator=g)
    if empty:
        queue_labels[torch.randperm(slots, generator=g)[:empty]] = -1
    embeddings = torch.randn(rows, dim, generator=g, dtype=torch.float64)
    class_weights = positive_alignment * embeddings + torch.randn(rows, dim, generator=g, dtype=torch.float64)
    queue_weights = F.normalize(torch.randn(slots, dim, generator=g, dtype=torch.float64), dim=1)
    queue_dtype = queue_dtype or dtype
    return (embeddings.to(dtype).to(device), class_weights.to(dtype).to(device), labels.to(device),
            queue_weights.to(queue_dtype).to(device), queue_labels.to(device))


# Margin settings every backend is tested on: (scale, m1, m2, m3, threshold, straight_through_margin).
MARGINS = {
    "cosface": dict(scale=50.0, m1=1.0, m2=0.0, m3=0.3),
    "arcface": dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0),
    "arcface_straight_through": dict(scale=64.0, m1=1.0, m2=0.5, m3=0.0, straight_through_margin=True),
    "sphereface": dict(scale=30.0, m1=2.0, m2=0.0, m3=0.0),
    "combined": dict(scale=32.0, m1=1.2, m2=0.2, m3=0.1),
    "cosface_filtered": dict(scale=50.0, m1=1.0, m2=0.0, m3=0.3, interclass_filtering_threshold=0.1),
}
