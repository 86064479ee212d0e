"""The argument checks of the package, one helper per kind of check, used everywhere
(library and training application): each raises ``TypeError`` for a value of the
wrong kind and ``ValueError`` for one out of range, naming the argument, what is
expected and what was given. None of them reads a tensor's values, so none
synchronises with a device. (The checks of a training batch's *values* run on the
device: dcq_ops.batch_guard.)
"""

from __future__ import annotations

import math
import numbers

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")


def check_int(name: str, value, *, minimum: int | None = None, allow_none: bool = False,
              expected: str | None = None) -> int | None:
    """``value`` as an int (a bool is not one), at least ``minimum``; None passes with ``allow_none``.

    A value that is not an int gets the same ``ValueError`` as one out of range (what
    the package has always raised for counts and sizes).

    Parameters
    ----------
    name, value
        The argument's name (for the message) and what was given.
    minimum : int, optional
        The smallest accepted value.
    allow_none : bool
        Whether None is accepted (and returned).
    expected : str, optional
        The words for what is accepted (default "an int >= minimum").

    Returns
    -------
    int or None
    """
    if value is None and allow_none:
        return None
    is_int = not isinstance(value, bool) and isinstance(value, numbers.Integral)
    if not is_int or (minimum is not None and value < minimum):
        words = expected or ("an int" if minimum is None else f"an int >= {minimum}")
        raise ValueError(f"{name} must be {words}{' or None' if allow_none else ''}, got {value!r}")
    return int(value)


def check_positive_int(name: str, value, *, allow_none: bool = False) -> int | None:
    """``value`` as an int > 0 (see ``check_int``).

    Parameters
    ----------
    name, value
        The argument's name (for the message) and what was given.
    allow_none : bool
        Whether None is accepted (and returned).

    Returns
    -------
    int or None
    """
    return check_int(name, value, minimum=1, allow_none=allow_none, expected="a positive int")


def positive_int_argument(text: str) -> int:
    """An argparse ``type`` for a command-line flag that takes a positive int
    (``check_positive_int``'s rule); argparse then reports "argument --flag: expected a
    positive int, got '0'" and exits 2.

    Parameters
    ----------
    text : str
        What was typed.

    Returns
    -------
    int
    """
    import argparse

    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive int, got {text!r}")
    return value


def check_number(name: str, value, *, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """``value`` as a finite float (NaN and inf refused; a bool is not a number; a
    one-element tensor or numpy scalar is) within ``[low, high]``, an end open with
    ``low_open`` / ``high_open``.

    Parameters
    ----------
    name, value
        The argument's name (for the message) and what was given.
    low, high : float, optional
        The accepted range's ends (None: unbounded).
    low_open, high_open : bool
        Whether that end is excluded.

    Returns
    -------
    float
    """
    if hasattr(value, "item") and not isinstance(value, bool):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            span = f"{'>' if low_open else '>='} {low:g}"
        elif low is None:
            span = f"{'<' if high_open else '<='} {high:g}"
        else:
            span = f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be {span}, got {value:g}")
    return value


def check_choice(name: str, value, choices):
    """``value`` if it is one of ``choices``.

    Parameters
    ----------
    name, value
        The argument's name (for the message) and what was given.
    choices : tuple
        The accepted values.

    Returns
    -------
    object
        ``value``.
    """
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_reduction(reduction) -> str:
    """``reduction`` if it is "mean", "sum" or "none".

    Parameters
    ----------
    reduction : str

    Returns
    -------
    str
    """
    return check_choice("reduction", reduction, REDUCTIONS)


def check_tensor(name: str, value, *, dim: int | None = None) -> torch.Tensor:
    """``value`` if it is a tensor with ``dim`` dimensions.

    Parameters
    ----------
    name, value
        The argument's name (for the message) and what was given.
    dim : int, optional
        The number of dimensions it must have.

    Returns
    -------
    torch.Tensor
    """
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(value).__name__}")
    if dim is not None and value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    return value


def check_float_tensor(name: str, value, *, dim: int | None = None) -> torch.Tensor:
    """``value`` if it is a float32, float16, bfloat16 or float64 tensor; the arguments
    are those of ``check_tensor``."""
    check_tensor(name, value, dim=dim)
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    return value


def check_label_tensor(name: str, value, *, allow_column: bool = False) -> torch.Tensor:
    """Integer labels [N] (or [N, 1] with ``allow_column``) as an int64 [N] tensor.

    Parameters
    ----------
    name, value
        The argument's name (for the message) and what was given.
    allow_column : bool
        Whether a column [N, 1] (what arcface_torch passes) is accepted and flattened.

    Returns
    -------
    torch.Tensor
        int64 [N].
    """
    check_tensor(name, value)
    if allow_column and value.dim() == 2 and value.shape[1] == 1:
        value = value.view(-1)
    if value.dim() != 1:
        shapes = "[N] or [N, 1]" if allow_column else "[N]"
        raise ValueError(f"{name} must have shape {shapes}, got {tuple(value.shape)}")
    if value.is_floating_point() or value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    return value.long()


def check_same_device(reference_name: str, reference: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every tensor of ``tensors`` is on the device of ``reference``.

    Parameters
    ----------
    reference_name : str
        The name of the tensor whose device the others must share.
    reference : torch.Tensor
    **tensors : torch.Tensor
        Named tensors to check.
    """
    for name, t in tensors.items():
        if t.device != reference.device:
            raise ValueError(f"{name} must be on the device of {reference_name} ({reference.device}), got {t.device}")


def check_loss_arguments(embeddings, class_weights, labels, queue_weights, queue_labels) -> None:
    """The shapes, dtypes and devices of the loss's five tensors (docs/loss.md).

    Parameters
    ----------
    embeddings, class_weights : torch.Tensor
        [N, D] floating point.
    labels : torch.Tensor
        [N] integer.
    queue_weights : torch.Tensor
        [K, D] floating point.
    queue_labels : torch.Tensor
        [K] integer.
    """
    check_float_tensor("embeddings", embeddings, dim=2)
    check_float_tensor("class_weights", class_weights, dim=2)
    check_tensor("labels", labels, dim=1)
    check_label_tensor("labels", labels)
    check_float_tensor("queue_weights", queue_weights, dim=2)
    check_tensor("queue_labels", queue_labels, dim=1)
    check_label_tensor("queue_labels", queue_labels)
    rows, dim = embeddings.shape
    if rows == 0:
        raise ValueError("embeddings must hold at least one row, got an empty batch (shape [0, D])")
    if class_weights.shape != embeddings.shape:
        raise ValueError(
            f"class_weights must have the shape of embeddings {tuple(embeddings.shape)}, got {tuple(class_weights.shape)}"
        )
    if labels.shape[0] != rows:
        raise ValueError(f"labels must have {rows} entries (one per embedding), got {labels.shape[0]}")
    if queue_weights.shape[1] != dim:
        raise ValueError(f"queue_weights must be [K, {dim}] (embedding size {dim}), got {tuple(queue_weights.shape)}")
    if queue_labels.shape[0] != queue_weights.shape[0]:
        raise ValueError(
            f"queue_labels must have {queue_weights.shape[0]} entries (one per queue slot), got {queue_labels.shape[0]}"
        )
    check_same_device("embeddings", embeddings, class_weights=class_weights, labels=labels,
                      queue_weights=queue_weights, queue_labels=queue_labels)
