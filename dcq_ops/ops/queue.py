"""The queue enqueue op: fake kernel for dcq_ops::queue_enqueue_ and a pure-PyTorch fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq_ops._extension import extension_loaded, has_cuda_kernels

if extension_loaded():

    @torch.library.register_fake("dcq_ops::queue_enqueue_")
    def _queue_enqueue_fake(weights, labels, ptr, keys, key_labels, guard=None):
        return None


def enqueue_fallback(weights, labels, ptr, keys, key_labels, guard=None) -> None:
    """The same FIFO write in plain PyTorch ops, with no host sync: the slots come from
    ptr on the device, and a nonzero guard writes back what the slots held."""
    slots = weights.shape[0]
    batch = keys.shape[0]
    index = (ptr + torch.arange(batch, device=weights.device)) % slots
    new_weights = F.normalize(keys.float(), dim=1).to(weights.dtype)
    new_labels = key_labels
    advance = torch.full_like(ptr, batch)
    if guard is not None:
        ok = guard.view(()) == 0
        new_weights = torch.where(ok, new_weights, weights.index_select(0, index))
        new_labels = torch.where(ok, new_labels, labels.index_select(0, index))
        advance = advance * ok
    weights.index_copy_(0, index, new_weights)
    labels.index_copy_(0, index, new_labels)
    ptr.add_(advance).remainder_(slots)


def queue_enqueue_(weights, labels, ptr, keys, key_labels, guard=None) -> None:
    """Enqueue with the compiled kernel for the device when there is one, else the fallback."""
    if extension_loaded() and (weights.device.type == "cpu" or (weights.is_cuda and has_cuda_kernels())):
        torch.ops.dcq_ops.queue_enqueue_(weights, labels, ptr, keys, key_labels, guard)
    else:
        enqueue_fallback(weights, labels, ptr, keys, key_labels, guard)
