"""Autograd shared by the fused backends (chunked and triton).

Their ops return (loss per row, gradient of each row's loss with respect to the
embeddings): the gradient is produced in the same pass as the loss, so the
backward only scales it and never reads the queue, which DCQLoss overwrites
right after the forward (DESIGN.md §4).
"""

from __future__ import annotations

import torch


def _setup_context(ctx, inputs, output):
    _, grad_rows = output
    ctx.save_for_backward(grad_rows)
    ctx.embedding_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(grad_rows)


def _backward(ctx, grad_loss_rows, _unused_grad_of_grad_rows):
    (grad_rows,) = ctx.saved_tensors
    if grad_rows.shape[0] != grad_loss_rows.shape[0]:
        raise RuntimeError(
            "dcq_cross_entropy ran its forward without computing the gradient "
            "(embeddings did not require grad, or grad mode was off), so it cannot backpropagate"
        )
    grad_embeddings = (grad_rows * grad_loss_rows.unsqueeze(1).to(grad_rows.dtype)).to(ctx.embedding_dtype)
    # One gradient for embeddings; none for every other input and parameter.
    return (grad_embeddings,) + (None,) * (ctx.num_inputs - 1)


def register_fused_autograd(op_name: str, num_inputs: int) -> None:
    def setup_context(ctx, inputs, output):
        ctx.num_inputs = num_inputs
        _setup_context(ctx, inputs, output)

    torch.library.register_autograd(op_name, _backward, setup_context=setup_context)


def fused_fake(embeddings: torch.Tensor, compute_grad: bool):
    """Shapes of a fused op's outputs, for its fake (meta) kernel."""
    rows, dim = embeddings.shape
    loss_rows = embeddings.new_empty((rows,), dtype=torch.float32)
    grad_rows = embeddings.new_empty((rows if compute_grad else 0, dim), dtype=torch.float32)
    return loss_rows, grad_rows
