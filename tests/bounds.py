"""Error bounds for the fused backends, derived from where they round.

A fused backend computes everything in fp32 except two GEMM operands that it
rounds to the queue's dtype, of unit roundoff u (fp16: 2^-11, bf16: 2^-8;
none for fp32):

1. the normalised embeddings q, for the negatives' cosines. With
   delta_i = max_j |(round(q_i) - q_i) · W_j|, every negative logit of row i
   moves by at most s * delta_i; log-sum-exp and softplus are 1-Lipschitz in
   the max norm, so |loss_i - exact_i| <= s * delta_i (+ fp32 noise). The
   gradient moves by at most [s (e^{2 s delta_i} - 1) + slope_i s delta_i / 4]
   / ||x_i|| (probabilities change by a factor e^{±2 s delta_i}, sigmoid by at
   most a quarter of its argument's change).
2. the probabilities exp(z - max) entering the second GEMM: at most
   u * s / ||x_i|| on the gradient (they sum to at most 1 and ||W_j|| ~ 1).

Finally the gradient is returned in the embeddings' dtype (relative 2^-(p+1)).
These bounds are rigorous to first order, so a test using them can only fail
on a real error; inputs chosen so that delta = 0 make them tight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dcq_ops import margin as margin_math

UNIT_ROUNDOFF = {torch.float32: 0.0, torch.float64: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
OUTPUT_ROUNDOFF = {torch.float32: 2.0**-24, torch.float64: 0.0, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def compute_dtype(embeddings_dtype, queue_dtype):
    """The GEMM operands' dtype: the queue's (float64 when an input is float64)."""
    return torch.float64 if torch.float64 in (embeddings_dtype, queue_dtype) else queue_dtype


def cosine_rounding(embeddings, queue_weights, gemm_dtype):
    """delta_i: the largest change of row i's negative cosines caused by
    rounding q = normalize(x) (computed in fp32) to gemm_dtype."""
    exact = F.normalize(embeddings.double(), dim=1)
    rounded = F.normalize(embeddings.float(), dim=1).to(gemm_dtype).double()
    if queue_weights.shape[0] == 0:
        return torch.zeros(embeddings.shape[0], dtype=torch.float64, device=embeddings.device)
    return ((rounded - exact) @ queue_weights.double().t()).abs().amax(dim=1)


def positive_slope(embeddings, class_weights, m1, m2, scale, straight_through_margin=False):
    """|dz_pos/dc| of each row, as the backends compute it."""
    if straight_through_margin:
        return torch.full((embeddings.shape[0],), scale, dtype=torch.float64, device=embeddings.device)
    cos = (F.normalize(embeddings.double(), dim=1) * F.normalize(class_weights.double(), dim=1)).sum(1)
    return (scale * margin_math.margin_derivative(cos, m1, m2)).abs()


def assert_loss_close(loss, exact, *, scale, delta, rtol=2e-4, atol=1e-12, what="loss"):
    """|loss_i - exact_i| <= s * delta_i * 1.01 + rtol |exact_i| + atol, row by row.

    The relative term alone (delta = 0) keeps confident rows (loss ~ 1e-15) to
    their relative precision: computing 1 - p or log(1 + e) naively gives 0."""
    loss, exact = loss.double(), exact.double()
    err = (loss - exact).abs()
    bound = 1.01 * scale * delta + rtol * exact.abs() + atol
    worst = (err - bound).argmax()
    assert torch.isfinite(loss).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), (
        f"{what}: row {worst.item()} error {err[worst].item():.3e} > bound {bound[worst].item():.3e} "
        f"(value {exact[worst].item():.6e}, rounding term {scale * delta[worst].item():.3e})"
    )


def assert_grad_close(grad, exact, *, embeddings, scale, delta, slope, gemm_dtype, row_weights=None,
                      rtol=1e-5, what="gradient"):
    """Row by row in the L2 norm: the bounds of the module docstring, plus rtol
    of the row's norm for fp32 arithmetic. `row_weights` are the upstream
    gradients of the rows' losses (the bound scales with them)."""
    u_out = OUTPUT_ROUNDOFF[grad.dtype]  # the gradient comes back in the embeddings' dtype
    grad, exact = grad.double(), exact.double()
    rows = exact.shape[0]
    weights = torch.ones(rows, dtype=torch.float64, device=exact.device) if row_weights is None else row_weights.double().abs()
    x_norm = embeddings.double().norm(dim=1)
    u = UNIT_ROUNDOFF[gemm_dtype]
    sd = scale * delta
    compute_term = weights * (scale * torch.expm1(2 * sd) + slope * sd / 4 + scale * u) / x_norm
    err = (grad - exact).norm(dim=1)
    exact_norm = exact.norm(dim=1)
    bound = 1.05 * compute_term + (rtol + 2 * u_out) * exact_norm + 1e-7 * exact_norm.max().clamp_min(1e-30)
    worst = (err - bound).argmax()
    assert torch.isfinite(grad).all(), f"{what}: non-finite values"
    assert (err <= bound).all(), (
        f"{what}: row {worst.item()} error {err[worst].item():.3e} > bound {bound[worst].item():.3e} "
        f"(row norm {exact_norm[worst].item():.3e})"
    )
