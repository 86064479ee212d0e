"""The queue enqueue op: fake kernel for dcq_ops::queue_enqueue_ and a pure-PyTorch fallback."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq_ops._extension import extension_loaded, has_cuda_kernels

if extension_loaded():

    @torch.library.register_fake("dcq_ops::queue_enqueue_")
    def _queue_enqueue_fake(weights, labels, ptr, keys, key_labels):
        return None


def enqueue_fallback(weights, labels, ptr, keys, key_labels) -> None:
    """Same FIFO write in plain PyTorch ops (no host sync: the slots come from ptr on the device)."""
    slots = weights.shape[0]
    batch = keys.shape[0]
    index = (ptr + torch.arange(batch, device=weights.device)) % slots
    weights.index_copy_(0, index, F.normalize(keys.float(), dim=1).to(weights.dtype))
    labels.index_copy_(0, index, key_labels)
    ptr.add_(batch).remainder_(slots)


def queue_enqueue_(weights, labels, ptr, keys, key_labels) -> None:
    """Enqueue with the compiled kernel for the device when there is one, else the fallback."""
    if extension_loaded() and (weights.device.type == "cpu" or (weights.is_cuda and has_cuda_kernels())):
        torch.ops.dcq_ops.queue_enqueue_(weights, labels, ptr, keys, key_labels)
    else:
        enqueue_fallback(weights, labels, ptr, keys, key_labels)
