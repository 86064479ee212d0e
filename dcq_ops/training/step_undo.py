"""What a step changes, copied before it and put back where a device-side flag says
the step was bad (:class:`StepUndo`), with no host sync: the bad-step guard's copy
(:mod:`.step_guard`), of the BatchNorm statistics when the optimizer skips a bad
update itself, of everything a step changes when it cannot."""

from __future__ import annotations

import torch


class _Flat:
    """Tensors of one device and dtype, read and written as one flat vector: a step's
    copy and its undo are a few kernels for the whole model, not a few per tensor."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors
        self.numels = [t.numel() for t in tensors]
        # Flat views of the contiguous ones (written through); the others take a reshaped copy.
        self.views = [t.detach().view(-1) if t.is_contiguous() else None for t in tensors]
        self.contiguous = all(v is not None for v in self.views)

    def gather(self) -> torch.Tensor:
        return torch.cat([v if v is not None else t.reshape(-1) for v, t in zip(self.views, self.tensors)])

    def scatter(self, values: torch.Tensor) -> None:
        chunks = values.split(self.numels)
        if self.contiguous:
            torch._foreach_copy_(self.views, list(chunks))
        else:
            torch._foreach_copy_([t.detach() for t in self.tensors], [c.view(t.shape) for c, t in zip(chunks, self.tensors)])

    def select_(self, keep: torch.Tensor, saved: torch.Tensor | None) -> None:
        """Each tensor <- itself where ``keep``, else its ``saved`` value (None: zero).
        torch.where selects and computes nothing: exact, and a NaN in the discarded
        values stays out (a blend keep * new + (1 - keep) * old would let it through)."""
        now = self.gather()
        self.scatter(torch.where(keep, now, saved if saved is not None else now.new_zeros(())))


def by_device_and_dtype(tensors) -> dict:
    """{(device, dtype): the flat view of those tensors}: one copy and one select per group."""
    groups: dict = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return {key: _Flat(ts) for key, ts in groups.items()}


class StepUndo:
    """What a step changes (the trainable parameters, the optimizer state, BatchNorm
    statistics), copied before the step and put back after it where a device-side flag
    says the step was bad: the update becomes conditional with no host sync.

    ``tensors()`` returns {key: tensor}. A key present after the step but not before
    (an optimizer creates its state at its first step) goes back to zeros, the state a
    fresh SGD (momentum) or Adam (moments) starts from. Tensors on another device than
    the flag (Adam's step counter, a host scalar unless capturable) stay as the step
    left them: putting them back would need the flag on the host."""

    def __init__(self, tensors):
        self.tensors = tensors
        self._ids: tuple = ()
        self._keys: list = []
        self._groups: dict = {}
        self._saved: dict = {}

    @torch.no_grad()
    def save(self) -> None:
        current = self.tensors()
        ids = tuple(id(t) for t in current.values())
        if ids != self._ids:  # the same objects step after step: the flat views are built once
            self._ids, self._keys = ids, list(current)
            self._groups = by_device_and_dtype(current.values())
        self._saved = {key: group.gather() for key, group in self._groups.items()}

    @torch.no_grad()
    def restore(self, keep: torch.Tensor) -> None:
        """Keep the step where ``keep`` (a bool on the device) is true, else undo it."""
        current = self.tensors()
        if tuple(id(t) for t in current.values()) == self._ids:
            for key, group in self._groups.items():
                if key[0] == keep.device:
                    group.select_(keep, self._saved[key])
        else:  # the step created (or replaced) tensors: match them by key
            saved_keys = set(self._keys)
            for key, group in by_device_and_dtype(current[k] for k in self._keys).items():
                if key[0] == keep.device:
                    group.select_(keep, self._saved[key])
            new = [t for k, t in current.items() if k not in saved_keys and t.device == keep.device]
            for group in by_device_and_dtype(new).values():
                group.select_(keep, None)
        self._saved = {}


def step_tensors(params: list, optimizer: torch.optim.Optimizer, buffers: dict) -> dict:
    """What a bad step must not change: the trainable parameters, the optimizer's
    state, and ``buffers`` (the BatchNorm statistics of the backbone and the weight
    generator: a forward in train mode moves them, and one non-finite batch makes them
    NaN). Not the DCQ queue: DCQLoss keeps a bad batch out of it itself, on the device."""
    tensors = {("param", i): p for i, p in enumerate(params)}
    for i, p in enumerate(params):
        for name, value in optimizer.state.get(p, {}).items():
            if isinstance(value, torch.Tensor):
                tensors[("state", i, name)] = value
    tensors.update(buffers)
    return tensors
