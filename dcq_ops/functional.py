"""dcq_cross_entropy, the functional form of the loss: argument checks and
dispatch to a backend (docs/loss.md)."""

from __future__ import annotations

import warnings

import torch

from dcq_ops import reference
from dcq_ops.backends import select_backend, why_unavailable
from dcq_ops.ops.chunked import margin_cross_entropy_chunked

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_tensor(name: str, value, *, dim: int, floating: bool) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(value.shape)}")
    if floating and value.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {value.dtype}")
    if not floating and (value.is_floating_point() or value.is_complex() or value.dtype == torch.bool):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")


def check_arguments(embeddings, class_weights, labels, queue_weights, queue_labels) -> None:
    """Shape, dtype and device checks; they read no tensor data, so no host sync."""
    _check_tensor("embeddings", embeddings, dim=2, floating=True)
    _check_tensor("class_weights", class_weights, dim=2, floating=True)
    _check_tensor("labels", labels, dim=1, floating=False)
    _check_tensor("queue_weights", queue_weights, dim=2, floating=True)
    _check_tensor("queue_labels", queue_labels, dim=1, floating=False)
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
    device = embeddings.device
    for name, t in (("class_weights", class_weights), ("labels", labels),
                    ("queue_weights", queue_weights), ("queue_labels", queue_labels)):
        if t.device != device:
            raise ValueError(f"{name} must be on the device of embeddings ({device}), got {t.device}")


def check_margin(scale: float, m1: float, m2: float, m3: float, threshold: float, reduction: str) -> None:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if not m1 >= 1:
        raise ValueError(f"m1 (multiplicative angular margin) must be >= 1, got {m1}")
    if not 0 <= threshold < 1:
        raise ValueError(f"interclass_filtering_threshold must be in [0, 1) (0 = off), got {threshold}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


_WARNED_FALLBACK: set = set()


def warn_reference_fallback(device: torch.device) -> None:
    """backend="auto" found no fused kernel for ``device``: say once per device type what
    that costs and how to get the kernels, instead of running N x K logits in silence."""
    if device.type in _WARNED_FALLBACK:
        return
    _WARNED_FALLBACK.add(device.type)
    reason = why_unavailable("chunked", device)
    warnings.warn(
        f"dcq_ops: backend='auto' runs the plain PyTorch 'reference' backend on {device.type}, because the fused "
        f"'chunked' kernels cannot run there ({reason}). The reference materialises the N x K logits: memory grows "
        "with batch x queue size, and it is several times slower. Build the extension against your torch "
        "(`pip install --no-build-isolation .`), or pass backend='reference' to silence this warning.",
        RuntimeWarning, stacklevel=3)


def check_triton_dtype(queue_weights: torch.Tensor, device: torch.device) -> None:
    """Triton's CPU interpreter computes bf16 tl.dot wrongly (losses of ~1e11 were seen): a
    bf16 queue is refused there rather than answered with garbage. On a GPU it is the default."""
    if device.type == "cpu" and queue_weights.dtype == torch.bfloat16:
        raise TypeError("the Triton interpreter (TRITON_INTERPRET=1, CPU tensors) does not compute bfloat16 "
                        "tl.dot correctly, so backend='triton' refuses a bfloat16 queue on the CPU; use a float32 "
                        "or float16 queue there, or backend='chunked' (bfloat16 runs on a GPU)")


def reduce_loss(loss_rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return loss_rows.mean()
    if reduction == "sum":
        return loss_rows.sum()
    if reduction == "none":
        return loss_rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def dcq_cross_entropy(
    embeddings: torch.Tensor,
    class_weights: torch.Tensor,
    labels: torch.Tensor,
    queue_weights: torch.Tensor,
    queue_labels: torch.Tensor,
    *,
    scale: float = 50.0,
    m1: float = 1.0,
    m2: float = 0.0,
    m3: float = 0.3,
    interclass_filtering_threshold: float = 0.0,
    straight_through_margin: bool = False,
    reduction: str = "mean",
    backend: str = "auto",
) -> torch.Tensor:
    """The DCQ margin cross-entropy (docs/loss.md).

    Loss of each embedding against its own (normalised) class weight as the
    positive, with the queue's entries of other classes as negatives. The
    gradient flows to ``embeddings`` only. ``backend``: "auto", "triton",
    "chunked" or "reference" (see ``dcq_ops.backends()``).

    Dtypes: the fused backends take both GEMMs' operands in the queue's dtype
    and accumulate in fp32; with a float64 input, "chunked" and "reference"
    compute everything in float64 (and return float64 losses), and "triton"
    refuses it ("auto" then runs "chunked").
    """
    check_arguments(embeddings, class_weights, labels, queue_weights, queue_labels)
    check_margin(scale, m1, m2, m3, interclass_filtering_threshold, reduction)
    labels = labels.long()
    queue_labels = queue_labels.long()
    margin = dict(scale=float(scale), m1=float(m1), m2=float(m2), m3=float(m3))
    resolved = select_backend(embeddings.device, backend)
    if resolved == "triton" and any(t.dtype == torch.float64 for t in (embeddings, class_weights, queue_weights)):
        # float64 is computed in float64 or not at all (docs/loss.md, "Numerics").
        if backend != "auto":
            raise TypeError("backend='triton' computes in float32 with float32/float16/bfloat16 GEMM operands; "
                            "float64 inputs run in float64 on the 'chunked' or 'reference' backend")
        resolved = "chunked" if why_unavailable("chunked", embeddings.device) is None else "reference"
    if resolved == "triton":
        check_triton_dtype(queue_weights, embeddings.device)
    if resolved == "reference" and backend == "auto":
        warn_reference_fallback(embeddings.device)
    if resolved == "reference":
        return reference.dcq_cross_entropy(
            embeddings, class_weights, labels, queue_weights, queue_labels, **margin,
            interclass_filtering_threshold=interclass_filtering_threshold,
            straight_through_margin=straight_through_margin, reduction=reduction,
        )
    compute_grad = embeddings.requires_grad and torch.is_grad_enabled()
    class_weights = class_weights.detach()
    queue_weights = queue_weights.detach()
    if resolved == "chunked":
        loss_rows, _ = margin_cross_entropy_chunked(
            embeddings, class_weights, labels, queue_weights, queue_labels,
            margin["scale"], margin["m1"], margin["m2"], margin["m3"],
            float(interclass_filtering_threshold), bool(straight_through_margin), compute_grad,
        )
    else:
        from dcq_ops.triton.margin_ce import margin_cross_entropy_triton

        loss_rows, _ = margin_cross_entropy_triton(
            embeddings, class_weights, labels, queue_weights, queue_labels,
            margin["scale"], margin["m1"], margin["m2"], margin["m3"],
            float(interclass_filtering_threshold), bool(straight_through_margin), compute_grad,
        )
    return reduce_loss(loss_rows, reduction)
