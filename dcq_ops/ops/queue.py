"""The queue enqueue op: the wrapper of dcq_ops::queue_enqueue_ and its fake kernel, and a
plain-PyTorch fallback with the same arguments. Which of the two runs for a queue is
decided by ``dcq_ops.backends.enqueue_function`` alone."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq_ops._extension import extension_loaded

if extension_loaded():

    @torch.library.register_fake("dcq_ops::queue_enqueue_")
    def _queue_enqueue_fake(weights, labels, ptr, class_weights, class_labels, bad_reasons=None):
        return None


def queue_enqueue_(weights, labels, ptr, class_weights, class_labels, bad_reasons=None) -> None:
    """``dcq_ops::queue_enqueue_``: the FIFO write of the normalised ``class_weights`` [B, D] and
    their ``class_labels`` [B] into the queue (``weights`` [K, D], ``labels`` [K]) at the device-side
    pointer ``ptr`` [1], which it advances modulo K; with ``bad_reasons`` (int64 [1] on the queue's
    device), nothing is written and ``ptr`` stays unless it is 0. Needs the compiled kernel for the
    queue's device (``dcq_ops.backends.enqueue_function`` chooses)."""
    torch.ops.dcq_ops.queue_enqueue_(weights, labels, ptr, class_weights, class_labels, bad_reasons)


def enqueue_fallback(weights, labels, ptr, class_weights, class_labels, bad_reasons=None) -> None:
    """The same FIFO write in plain PyTorch ops, with no host sync: the slots come from
    ptr on the device, and a nonzero bad_reasons writes back what the slots held."""
    slots = weights.shape[0]
    batch = class_weights.shape[0]
    index = (ptr + torch.arange(batch, device=weights.device)) % slots
    # Class weights rounded to fp32 as the compiled op reads them, normalised in fp64, where
    # the square of any float neither overflows (|class weight| >= 1e19) nor underflows.
    new_weights = F.normalize(class_weights.float().double(), dim=1).to(weights.dtype)
    new_labels = class_labels
    advance = torch.full_like(ptr, batch)
    if bad_reasons is not None:
        ok = bad_reasons.view(()) == 0
        new_weights = torch.where(ok, new_weights, weights.index_select(0, index))
        new_labels = torch.where(ok, new_labels, labels.index_select(0, index))
        advance = advance * ok
    weights.index_copy_(0, index, new_weights)
    labels.index_copy_(0, index, new_labels)
    ptr.add_(advance).remainder_(slots)
