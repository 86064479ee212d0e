"""Margin settings: the combined margin (s, m1, m2, m3), inter-class filtering,
and how to read them from arcface_torch's margin objects by attribute."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MarginConfig:
    """z_pos = scale * (cos(m1*theta + m2) - m3); negatives scale * cos.

    CosFace: m1=1, m2=0, m3>0. ArcFace: m1=1, m2>0, m3=0. SphereFace: m1>1.
    ``straight_through`` gives the positive the gradient of scale * cos, as
    arcface_torch's CombinedMarginLoss does for ArcFace (margin under no_grad).
    """

    scale: float = 50.0
    m1: float = 1.0
    m2: float = 0.0
    m3: float = 0.3
    interclass_filtering_threshold: float = 0.0
    straight_through: bool = False

    def kwargs(self) -> dict:
        """Keyword arguments of dcq_cross_entropy."""
        return dict(
            scale=self.scale, m1=self.m1, m2=self.m2, m3=self.m3,
            interclass_filtering_threshold=self.interclass_filtering_threshold,
            straight_through_margin=self.straight_through,
        )


# The paper's setting: CosFace with s = 50, m = 0.3.
PAPER_MARGIN = MarginConfig()

ACCEPTED = (
    "None (the paper's CosFace, s=50, m=0.3); a dcq_ops.MarginConfig; an object with "
    "arcface_torch CombinedMarginLoss attributes (s, m1, m2, m3[, interclass_filtering_threshold]); "
    "an ArcFace-like object (s, margin); a CosFace-like object (s, m)"
)


def _number(obj, name):
    value = getattr(obj, name)
    if hasattr(value, "item"):
        value = value.item()
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"margin_loss.{name} must be a number, got {value!r}") from None


def margin_from(margin_loss) -> MarginConfig:
    """Read the margin from what arcface_torch passes to PartialFC_V2, by attribute only:
    the margin object is never called (the margin is applied inside the fused kernel)."""
    if margin_loss is None:
        return PAPER_MARGIN
    if isinstance(margin_loss, MarginConfig):
        return margin_loss
    if all(hasattr(margin_loss, a) for a in ("s", "m1", "m2", "m3")):
        s, m1, m2, m3 = (_number(margin_loss, a) for a in ("s", "m1", "m2", "m3"))
        threshold = _number(margin_loss, "interclass_filtering_threshold") if hasattr(
            margin_loss, "interclass_filtering_threshold") else 0.0
        # CombinedMarginLoss applies the ArcFace margin (m1 == 1, m2 > 0, m3 == 0)
        # under torch.no_grad(): its gradient is that of s * cos.
        straight_through = m1 == 1.0 and m2 > 0.0 and m3 == 0.0
        return MarginConfig(s, m1, m2, m3, threshold, straight_through)
    if hasattr(margin_loss, "s") and hasattr(margin_loss, "margin"):  # ArcFace(s, margin)
        return MarginConfig(_number(margin_loss, "s"), 1.0, _number(margin_loss, "margin"), 0.0, 0.0, False)
    if hasattr(margin_loss, "s") and hasattr(margin_loss, "m"):  # CosFace(s, m)
        return MarginConfig(_number(margin_loss, "s"), 1.0, 0.0, _number(margin_loss, "m"), 0.0, False)
    raise TypeError(f"margin_loss must be one of: {ACCEPTED}; got {type(margin_loss).__name__}")
