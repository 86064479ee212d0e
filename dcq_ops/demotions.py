"""The demotions of the first-contact check (dcq_ops.first_contact): a fused backend that
failed its first call for a shape class (wrong numbers, or an exception while compiling or
launching) runs a fallback for that class. dcq_ops.first_contact records them here;
``dcq_ops.backends()`` reports them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Demotion:
    """A fused backend that failed its first-contact check for one shape class
    (dcq_ops.first_contact): calls of that class run ``fallback`` instead.

    Attributes
    ----------
    backend, fallback : str
        The demoted backend and the one that runs instead.
    device : str
        The device, e.g. "cuda:0" or "cpu".
    shape_class : str
        The shape class in words (dtypes, row and queue buckets, D, gradient, filtering).
    reason : str
        What disagreed, with the numbers (e.g. "loss error 5.0e-02 > bound 1.1e-03").
    message : str
        The warning's text.
    """

    backend: str
    fallback: str
    device: str
    shape_class: str
    reason: str
    message: str


_DEMOTIONS: dict = {}  # shape-class key (dcq_ops.first_contact) -> Demotion


def record_demotion(key, demotion: Demotion) -> None:
    """Record that ``demotion.backend`` runs ``demotion.fallback`` for the shape class ``key``
    (dcq_ops.first_contact calls this; ``backends()`` reports it)."""
    _DEMOTIONS[key] = demotion


def demotion_of(key) -> Demotion | None:
    """The demotion recorded for the shape class ``key``, or None."""
    return _DEMOTIONS.get(key) if _DEMOTIONS else None


def any_demotions() -> bool:
    """Whether any shape class is demoted (one test of an empty dict: cheap, and traceable)."""
    return bool(_DEMOTIONS)


def demotion_keys() -> tuple:
    """The shape-class keys that are demoted."""
    return tuple(_DEMOTIONS)


def demotions(device: torch.device | str | None = None) -> list[Demotion]:
    """The demotions recorded so far, of every device, or of ``device``'s type only.

    Parameters
    ----------
    device : torch.device or str, optional

    Returns
    -------
    list of Demotion
    """
    found = list(_DEMOTIONS.values())
    if device is not None:
        kind = torch.device(device).type
        found = [d for d in found if torch.device(d.device).type == kind]
    return found


def clear_demotions() -> None:
    """Forget every demotion (dcq_ops.first_contact.reset calls this)."""
    _DEMOTIONS.clear()
