"""MomentumEncoder: DCQ's weight generator, an exponential moving average of the feature extractor."""

from __future__ import annotations

import copy

import torch
from torch import nn

from dcq_ops.validation import check_number


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(module, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            module = module.module
        elif hasattr(module, "_orig_mod"):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


class MomentumEncoder(nn.Module):
    """A no-grad copy g of ``module`` f, moved toward it by ``update()``:
    g <- momentum * g + (1 - momentum) * f for parameters (one multi-tensor
    ``torch._foreach_lerp_``, not a Python loop per parameter); buffers (batch-norm
    statistics) are copied, unless ``update(copy_buffers=False)``: a generator whose
    BatchNorm runs in train mode then keeps the running statistics of its own
    forward passes, as the official DCQ code's ``encoder_k`` does. ``momentum`` is a
    plain attribute: a schedule may change it between updates. Calling it runs the
    copy under ``torch.no_grad()``.

    The source module is remembered but not registered as a submodule, so
    ``state_dict`` holds the generator's own weights only.

    Parameters
    ----------
    module : torch.nn.Module
        The feature extractor f (DDP, DataParallel and torch.compile wrappers are
        looked through); the generator starts as a deep copy of it.
    momentum : float
        In [0, 1]: the share of g kept at each update (the paper: 0.999).
    """

    def __init__(self, module: nn.Module, momentum: float = 0.999):
        super().__init__()
        if not isinstance(module, nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0)
        self.module = copy.deepcopy(unwrap(module))
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._source = [module]  # a list: keeps it out of this module's children

    @torch.no_grad()
    def update(self, module: nn.Module | None = None, *, copy_buffers: bool = True) -> None:
        """One EMA step of the generator's parameters toward ``module`` (default: the module
        it was made from); with ``copy_buffers`` its buffers are copied as well."""
        source = unwrap(module if module is not None else self._source[0])
        mine = list(self.module.parameters())
        theirs = list(source.parameters())
        if len(mine) != len(theirs):
            raise ValueError(f"module has {len(theirs)} parameters, the weight generator {len(mine)}: not the same architecture")
        theirs = [t.detach().to(m.dtype) for m, t in zip(mine, theirs)]
        torch._foreach_lerp_(mine, theirs, 1.0 - self.momentum)
        if not copy_buffers:
            return
        my_buffers = list(self.module.buffers())
        their_buffers = list(source.buffers())
        if my_buffers:
            torch._foreach_copy_(my_buffers, their_buffers)

    def forward(self, *args, **kwargs):
        """The generator's output for these inputs, under ``torch.no_grad()``."""
        with torch.no_grad():
            return self.module(*args, **kwargs)
