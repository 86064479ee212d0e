"""The margin of the positive logit: its value and stable derivative (shared by
the reference, the Triton prologue and the training heads), the settings
(s, m1, m2, m3, inter-class filtering), and how to read them from
arcface_torch's margin objects by attribute. csrc/common/margin.h holds the
same function for the C++/CUDA kernels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dcq_ops.validation import check_number

# Below this sin(theta) the margin's derivative is evaluated at theta = EPS
# (or pi - EPS): the derivative of cos(m1*theta + m2) with respect to cos(theta)
# is m1*sin(m1*theta + m2)/sin(theta), which is 0/0 at c = +-1. Clamping theta
# keeps it finite and gives the exact limit (1 for CosFace, m1^2 for
# SphereFace with m2 = 0). Every backend uses the same constant.
MARGIN_THETA_EPS = 1e-4


def margin_value(cosine: torch.Tensor, m1: float, m2: float, m3: float) -> torch.Tensor:
    """cos(m1*acos(c) + m2) - m3 for c clamped to [-1, 1] (without the scale)."""
    theta = torch.acos(cosine.clamp(-1.0, 1.0))
    return torch.cos(m1 * theta + m2) - m3


def margin_derivative(cosine: torch.Tensor, m1: float, m2: float) -> torch.Tensor:
    """d/dc of cos(m1*acos(c) + m2), stable at c = +-1 (see MARGIN_THETA_EPS)."""
    theta = torch.acos(cosine.clamp(-1.0, 1.0)).clamp(MARGIN_THETA_EPS, math.pi - MARGIN_THETA_EPS)
    return m1 * torch.sin(m1 * theta + m2) / torch.sin(theta)


class _MarginLogit(torch.autograd.Function):
    """z = s*(cos(m1*acos(c) + m2) - m3) with the stable derivative above.

    With ``straight_through_margin`` the gradient is that of z = s*c, as arcface_torch
    does when it applies the ArcFace margin under ``no_grad``.
    """

    @staticmethod
    def forward(ctx, cosine, scale, m1, m2, m3, straight_through_margin):
        ctx.save_for_backward(cosine)
        ctx.params = (scale, m1, m2, straight_through_margin)
        return scale * margin_value(cosine, m1, m2, m3)

    @staticmethod
    def backward(ctx, grad_out):
        (cosine,) = ctx.saved_tensors
        scale, m1, m2, straight_through_margin = ctx.params
        if straight_through_margin:
            dz_dc = torch.full_like(cosine, scale)
        else:
            dz_dc = scale * margin_derivative(cosine, m1, m2)
        return grad_out * dz_dc, None, None, None, None, None


def margin_logit(cosine: torch.Tensor, scale: float, m1: float, m2: float, m3: float,
                 straight_through_margin: bool = False) -> torch.Tensor:
    """The positive logit z = s*(cos(m1*acos(c) + m2) - m3), with the stable derivative."""
    return _MarginLogit.apply(cosine, scale, m1, m2, m3, straight_through_margin)



@dataclass(frozen=True)
class MarginConfig:
    """z_pos = scale * (cos(m1*theta + m2) - m3); negatives scale * cos.

    CosFace: m1=1, m2=0, m3>0. ArcFace: m1=1, m2>0, m3=0. SphereFace: m1>1.
    ``straight_through_margin`` gives the positive the gradient of scale * cos, as
    arcface_torch's CombinedMarginLoss does for ArcFace (margin under no_grad).
    ``interclass_filtering_threshold`` (0 = off): inter-class cosines above it
    count as 0, with no gradient.

    Attributes
    ----------
    scale : float
        s > 0.
    m1 : float
        Multiplicative angular margin, >= 1.
    m2 : float
        Additive angular margin.
    m3 : float
        Additive cosine margin.
    interclass_filtering_threshold : float
        In [0, 1); 0 = off.
    straight_through_margin : bool
        The positive's gradient as if z = s * c.
    """

    scale: float = 50.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.3
    interclass_filtering_threshold: float = 0.0
    straight_through_margin: bool = False

    def __post_init__(self):
        # Plain floats (numpy scalars, ints, one-element tensors accepted), each checked once here:
        # the functional form builds a MarginConfig too, so both paths refuse the same values.
        ranges = {"scale": ("", dict(low=0.0, low_open=True)),
                  "m1": (" (multiplicative angular margin)", dict(low=1.0)),
                  "m2": (" (additive angular margin)", {}), "m3": (" (additive cosine margin)", {}),
                  "interclass_filtering_threshold": (" (0 = off)", dict(low=0.0, high=1.0, high_open=True))}
        for name, (meaning, bounds) in ranges.items():
            value = check_number(f"MarginConfig.{name}{meaning}", getattr(self, name), **bounds)
            object.__setattr__(self, name, value)
        if not isinstance(self.straight_through_margin, bool):
            raise TypeError(f"MarginConfig.straight_through_margin must be a bool, got {self.straight_through_margin!r}")

    def kwargs(self) -> dict:
        """The margin as keyword arguments of ``dcq_cross_entropy``."""
        return dict(
            scale=self.scale, m1=self.m1, m2=self.m2, m3=self.m3,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
            straight_through_margin=self.straight_through_margin,
        )


# The paper's setting: CosFace with s = 50, m = 0.3.
PAPER_MARGIN = MarginConfig()

ACCEPTED = (
    "None (the paper's CosFace, s=50, m=0.3); a dcq_ops.MarginConfig; an object with arcface_torch "
    "CombinedMarginLoss attributes (s, m1, m2, m3[, interclass_filtering_threshold]); an arcface_torch "
    "ArcFace-like object (margin, and s or scale); a CosFace-like object (s, m)"
)


def _number(obj, name):
    value = getattr(obj, name)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, bool):
        raise TypeError(f"margin_loss.{name} must be a number, got {value!r}")
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"margin_loss.{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"margin_loss.{name} must be finite, got {value!r}")
    return value


def _combined(margin_loss) -> MarginConfig:
    """arcface_torch's CombinedMarginLoss, branch for branch:

    - ``m1 == 1 and m3 == 0``: ArcFace, cos(theta + m2), applied under no_grad,
      so the gradient is that of s * cos (straight-through);
    - ``m3 > 0``: CosFace, cos - m3, exact gradient; arcface_torch then ignores
      m1 and m2, so a nonzero m2 or m1 != 1 here is ambiguous and refused;
    - otherwise arcface_torch raises; DCQ computes the combined margin of
      docs/loss.md (e.g. SphereFace, m1 > 1) with its exact gradient.

    Filtering is on for a threshold > 0, as in arcface_torch; a threshold >= 1
    filters nothing there (cosines are clamped to [-1, 1]), so it means off.
    """
    s, m1, m2, m3 = (_number(margin_loss, a) for a in ("s", "m1", "m2", "m3"))
    threshold = 0.0
    if hasattr(margin_loss, "interclass_filtering_threshold"):
        threshold = _number(margin_loss, "interclass_filtering_threshold")
        if not 0.0 < threshold < 1.0:
            threshold = 0.0
    if m1 == 1.0 and m3 == 0.0:
        return MarginConfig(s, 1.0, m2, 0.0, threshold, straight_through_margin=True)
    if m3 > 0.0 and (m1 != 1.0 or m2 != 0.0):
        raise ValueError(
            f"margin_loss has m1={m1}, m2={m2}, m3={m3}: arcface_torch's CombinedMarginLoss applies only the "
            "CosFace margin m3 when m3 > 0 and silently ignores m1 and m2. DCQLoss does not guess: set m1=1, m2=0 "
            "to keep arcface_torch's behaviour, or pass dcq_ops.MarginConfig(scale, m1, m2, m3) for the combined "
            "margin cos(m1*theta + m2) - m3")
    return MarginConfig(s, m1, m2, m3, threshold, straight_through_margin=False)


def margin_from(margin_loss) -> MarginConfig:
    """Read the margin from what arcface_torch passes to PartialFC_V2, by attribute only:
    the margin object is never called (the margin is applied inside the fused kernel).

    - ``CombinedMarginLoss(s, m1, m2, m3, interclass_filtering_threshold)``: see
      ``_combined`` (ArcFace branch straight-through, CosFace branch exact, filtering).
    - ``ArcFace(s, margin)`` (stores ``scale`` or ``s``, and ``margin``): ArcFace,
      applied under no_grad in arcface_torch, so straight-through.
    - ``CosFace(s, m)``: CosFace. An old arcface_torch ``ArcFace(s, m)`` also stored
      ``(s, m)``; it is recognised by its class name and backpropagated through the
      margin, so it gets the exact gradient.

    Parameters
    ----------
    margin_loss : object or None
        None (the paper's CosFace, s=50, m=0.3), a MarginConfig, or an arcface_torch
        margin object (see above).

    Returns
    -------
    MarginConfig
    """
    if margin_loss is None:
        return PAPER_MARGIN
    if isinstance(margin_loss, MarginConfig):
        return margin_loss
    has = lambda name: hasattr(margin_loss, name)  # noqa: E731
    if all(has(a) for a in ("s", "m1", "m2", "m3")):
        return _combined(margin_loss)
    if has("margin") and (has("s") or has("scale")):  # ArcFace(s, margin)
        scale = _number(margin_loss, "s" if has("s") else "scale")
        return MarginConfig(scale, 1.0, _number(margin_loss, "margin"), 0.0, 0.0, straight_through_margin=True)
    if has("s") and has("m"):
        if "arcface" in type(margin_loss).__name__.lower():  # arcface_torch's first ArcFace(s, m)
            return MarginConfig(_number(margin_loss, "s"), 1.0, _number(margin_loss, "m"), 0.0, 0.0, False)
        return MarginConfig(_number(margin_loss, "s"), 1.0, 0.0, _number(margin_loss, "m"), 0.0, False)
    attributes = sorted(a for a in getattr(margin_loss, "__dict__", {}) if not a.startswith("_"))
    raise TypeError(f"margin_loss must be one of: {ACCEPTED}; got {type(margin_loss).__name__} "
                    f"with attributes {attributes}")
