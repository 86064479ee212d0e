"""How far two backends' loss and gradient rows may be apart: a first-order bound from
where each backend rounds its GEMM operands and its fp32 (or float64) arithmetic.

The first-contact check (dcq_ops.first_contact) and ``python -m dcq_ops.check`` compare a
fused backend with an independent one within this bound; docs/numerics.md ("The
first-contact check") states it. Nothing in it is fitted to a machine: it follows the
rounding model of the test suite's error bounds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from dcq_ops import reference
from dcq_ops.margin import MarginConfig, margin_derivative, margin_value

# The bounds below are first order in the rounding errors; this factor covers the
# neglected second-order terms (as tests/bounds.py does).
SECOND_ORDER_MARGIN = 1.05

# Bytes of a block of the queue (in the arithmetic's dtype) when the bound measures the
# cosines' rounding or the entries near the filtering threshold: never a copy of the whole
# queue (2048 entries at D = 512 in float64, 4096 in fp32).
_BOUND_BLOCK_BYTES = 8 << 20

UNIT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 2.0**-53, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# What the float32 matmul precision rounds fp32 GEMM operands to (TF32: 10 mantissa bits; bf16).
FP32_MATMUL_UNIT = {"highest": 0.0, "high": 2.0**-11, "medium": 2.0**-8}



@dataclass(frozen=True)
class GemmRounding:
    """Where one backend rounds its GEMM operands.

    Attributes
    ----------
    round_to : torch.dtype or None
        The dtype the normalised embeddings are rounded to before the first GEMM (the
        queue's 16-bit dtype), or None.
    unit : float
        Unit roundoff of the operands (16-bit: 2^-11 or 2^-8; fp32 under TF32: 2^-11; 0 exact).
    both_operands : bool
        The queue rows are rounded too (an fp32 queue under TF32 / bf16 matmul precision).
    """

    round_to: torch.dtype | None
    unit: float
    both_operands: bool


def gemm_rounding(backend: str, embeddings_dtype: torch.dtype, queue_dtype: torch.dtype,
                  class_weights_dtype: torch.dtype | None = None) -> GemmRounding:
    """How ``backend`` rounds the GEMM operands for these dtypes (docs/loss.md, "Numerics"):
    the fused backends take both GEMMs' operands in the queue's dtype; the reference
    multiplies in fp32 (float64 when an input is). An fp32 GEMM follows
    ``torch.get_float32_matmul_precision()`` (TF32 unless "highest").

    Parameters
    ----------
    backend : str
        "triton", "chunked" or "reference".
    embeddings_dtype, queue_dtype : torch.dtype
    class_weights_dtype : torch.dtype, optional

    Returns
    -------
    GemmRounding
    """
    dtypes = (embeddings_dtype, queue_dtype, class_weights_dtype)
    if torch.float64 in dtypes:
        return GemmRounding(None, 0.0, False)
    if backend != "reference" and queue_dtype in (torch.float16, torch.bfloat16):
        return GemmRounding(queue_dtype, UNIT_ROUNDOFF[queue_dtype], False)
    unit = FP32_MATMUL_UNIT.get(torch.get_float32_matmul_precision(), 2.0**-8)
    return GemmRounding(None, unit, unit > 0)


def arithmetic_dtype(*tensors) -> torch.dtype:
    """float64 when any input is, else float32: the dtype the reference computes in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


@torch.no_grad()
def difference_bound(embeddings, class_weights, labels, queue_weights, queue_labels, margin: MarginConfig,
                     roundings: tuple[GemmRounding, GemmRounding], loss, grad=None):
    """Per row, how far two backends' loss and gradient may be apart, to first order.

    Each backend computes the cosines q_i . W_j with an error of at most
    ``e_i = delta_i + 2 u [TF32] + (3D/2 + 4) u_a`` (delta_i: the largest change of row i's
    cosines when q_i is rounded to the GEMM dtype, measured here as tests/bounds.py does,
    plus what rounding to the neighbouring value can add where the backend's own q_i,
    within ``(D + 6) u_a`` of this one, lies across a rounding boundary;
    ``2 u``: both operands rounded under TF32; ``(3D/2 + 4) u_a``: normalising x_i and the
    dot product in the arithmetic's unit roundoff u_a), and the positive's cosine with an
    error of at most ``(2D + 6) u_a``. Log-sum-exp and softplus are 1-Lipschitz, so the
    loss rows differ by at most ``a_i = s (e_i^A + e_i^B) + |dz_i/dc| 2 (2D + 6) u_a`` (the
    second term: the positive's logit), plus ``2 (K + 8) u_a + 8 u_a |loss_i|`` for summing
    K exponentials (relative error K u_a, an absolute one after the logarithm) and
    evaluating the logarithms. The gradient rows (L2 norm) differ by at
    most ``[s expm1(2 a_i) + |slope_i| a_i / 4 + s (p^A + p^B) + 2 s (K + D + 8) u_a] /
    ||x_i|| + 2 (D + 8) u_a ||g_i||``: the probabilities change by a factor
    ``exp(+-2 a_i)``, the positive's sigmoid by a quarter of its argument's change, the
    probabilities are rounded to the GEMM dtype (``p = u``, ``2 u`` under TF32) and the
    second GEMM sums K rows. Both bounds are multiplied by ``SECOND_ORDER_MARGIN``.

    With inter-class filtering, a kept cosine within the two backends' rounding of the
    threshold t may be filtered on one and not on the other: its exponential jumps by at
    most ``e^{s (t + w)} - 1`` (w: that rounding), so with n such entries and ``S_i`` the
    sum of the row's other exponentials and its positive's, ``r_i = n (e^{s (t + w)} - 1)
    / S_i`` adds ``log(1 + r_i)`` to the loss bound and ``[s min(2 r_i, 2) + |slope_i|
    min(r_i, 1)] / ||x_i||`` to the gradient's (such rows are reported as near the
    threshold).

    Parameters
    ----------
    embeddings, class_weights, labels : torch.Tensor
        The rows compared: [n, D], [n, D], [n].
    queue_weights, queue_labels : torch.Tensor
        The whole queue: [K, D], [K].
    margin : MarginConfig
    roundings : tuple of GemmRounding
        The two backends' (``gemm_rounding``).
    loss : torch.Tensor
        [n], one backend's loss rows (the relative terms).
    grad : torch.Tensor, optional
        [n, D], its gradient rows.

    Returns
    -------
    (torch.Tensor, torch.Tensor or None, torch.Tensor)
        The loss bound [n] and the gradient bound [n] (None without ``grad``), float64;
        the rows with a kept cosine near the filtering threshold [n] (bool).
    """
    arith = arithmetic_dtype(embeddings, class_weights, queue_weights)
    u_a = UNIT_ROUNDOFF[arith]
    rows, dim = embeddings.shape
    slots = queue_weights.shape[0]
    s = float(margin.scale)
    q = reference.normalize_rows(embeddings.to(arith))
    w = reference.normalize_rows(class_weights.to(arith))
    rounded = {i: q.to(r.round_to).to(arith) - q for i, r in enumerate(roundings) if r.round_to is not None}
    # A backend normalises x_i in its own order: its q differs from this one by at most eta
    # (relative, per element), and may round to the neighbouring 16-bit value where q lies that
    # close to a rounding boundary; `spread` holds that possible difference, element by element.
    eta = (dim + 6) * u_a
    spread = {i: ((q * (1 + eta)).to(roundings[i].round_to).to(arith)
                  - (q * (1 - eta)).to(roundings[i].round_to).to(arith)).abs() for i in rounded}
    delta = {i: torch.zeros(rows, dtype=arith, device=q.device) for i in rounded}
    threshold = float(margin.interclass_filtering_threshold)
    gamma = (1.5 * dim + 4) * u_a  # a cosine: the normalisation ((D/2 + 2) u_a) and the dot product ((D + 2) u_a)
    gamma_positive = (2 * dim + 6) * u_a  # the positive's cosine: two normalised rows
    width = gamma * 2 + sum(r.unit * (2 if r.both_operands else 1) for r in roundings)  # norm bound of |e^A + e^B|
    near_count = torch.zeros(rows, dtype=torch.float64, device=q.device)  # kept cosines near the threshold
    rest = torch.full((rows,), -math.inf, dtype=torch.float64, device=q.device)  # log-sum-exp of the others
    block = max(64, _BOUND_BLOCK_BYTES // (dim * torch.finfo(arith).bits // 8))
    for start in range(0, slots if rounded or threshold > 0 else 0, block):  # nothing to measure otherwise
        chunk = queue_weights[start:start + block].to(arith)
        finite = torch.isfinite(chunk).all(dim=1, keepdim=True)
        chunk = torch.where(finite, chunk, torch.zeros_like(chunk))  # as the reference: NaN only where kept
        for i, dq in rounded.items():
            delta[i] = torch.maximum(delta[i], (dq @ chunk.t()).abs().amax(dim=1)
                                     + (spread[i] @ chunk.abs().t()).amax(dim=1))
        if threshold > 0:
            chunk_labels = queue_labels[start:start + block]
            kept = (chunk_labels.view(1, -1) != labels.view(-1, 1)) & (chunk_labels.view(1, -1) >= 0)
            cos = (q @ chunk.t()).double()
            near = ((cos - threshold).abs() <= width) & kept
            near_count += near.sum(dim=1)
            logits = (s * torch.where(cos > threshold, torch.zeros_like(cos), cos)).masked_fill(~kept | near, -math.inf)
            rest = torch.logaddexp(rest, torch.logsumexp(logits, dim=1))
    cos_error = torch.full((rows,), 2 * gamma, dtype=torch.float64, device=q.device)
    probability_rounding = 0.0
    for i, r in enumerate(roundings):
        if i in delta:
            cos_error = cos_error + delta[i].double()
        if r.both_operands:
            cos_error = cos_error + 2 * r.unit
        probability_rounding += r.unit * (2 if r.both_operands else 1)
    positive_cos = (q * w).sum(dim=1).double().clamp(-1.0, 1.0)
    slope_value = (s * margin_derivative(positive_cos, margin.m1, margin.m2)).abs()
    slope_grad = torch.full_like(slope_value, s) if margin.straight_through_margin else slope_value
    shift = s * cos_error + slope_value * 2 * gamma_positive  # a_i
    # Filtering: a kept cosine within `width` of the threshold may be filtered (logit 0) on
    # one backend and not on the other: its exponential moves by at most e^{s(t + width)} - 1,
    # and the row's sum of exponentials is at least that of the other entries (`rest`) and
    # the positive's. That relative jump r adds log(1 + r) to the loss, and moves at most
    # min(2r, 2) of probability mass (the positive's share by min(r, 1)).
    jump = torch.zeros_like(shift)
    if threshold > 0:
        positive = s * margin_value(positive_cos, margin.m1, margin.m2, margin.m3)
        log_jump = near_count.log() + math.log(math.expm1(s * (threshold + width)))
        jump = torch.where(near_count > 0, torch.exp(log_jump - torch.logaddexp(rest, positive)),
                           torch.zeros_like(shift))
    loss_bound = (SECOND_ORDER_MARGIN * shift + torch.log1p(jump)
                  + 2 * (slots + 8) * u_a + 8 * u_a * loss.double().abs())
    grad_bound = None
    if grad is not None:
        x_norm = embeddings.double().norm(dim=1)
        compute = (s * torch.expm1(2 * shift) + slope_grad * shift / 4 + s * probability_rounding
                   + 2 * s * (slots + dim + 8) * u_a)
        filtered = s * (2 * jump).clamp(max=2.0) + slope_grad * jump.clamp(max=1.0)
        grad_bound = ((SECOND_ORDER_MARGIN * compute + filtered) / x_norm
                      + 2 * (dim + 8) * u_a * grad.double().norm(dim=1))
    return loss_bound, grad_bound, near_count > 0
