"""Autograd shared by the fused backends (chunked and triton).

Their ops return (loss per row, gradient of each row's loss with respect to the
embeddings): the gradient is produced in the same pass as the loss, so the
backward only scales it and never reads the queue, which DCQLoss overwrites
right after the forward (docs/loss.md, "The queue and the backward").
"""

from __future__ import annotations

import torch


def _setup_context(ctx, inputs, output):
    _, grad_rows = output
    ctx.save_for_backward(grad_rows, inputs[0])  # the embeddings: see _NoDoubleBackward (no copy)
    ctx.embedding_dtype = inputs[0].dtype
    ctx.mark_non_differentiable(grad_rows)


DOUBLE_BACKWARD_ERROR = (
    "the fused DCQ loss backends ('chunked', 'triton') compute the first derivative only: their gradient "
    "is produced in the forward pass, so it has no derivative of its own and cannot be differentiated again "
    "(double backward, torch.autograd.grad(..., create_graph=True) then backward through the gradient). "
    "Use backend='reference' for higher-order derivatives")


class _NoDoubleBackward(torch.autograd.Function):
    """The gradient of the embeddings when the backward itself is recorded (create_graph=True):
    the value passes through, and differentiating it raises a clear error instead of
    autograd's "element 0 of tensors does not require grad" (the saved gradient rows
    are constants to autograd)."""

    @staticmethod
    def forward(ctx, grad_embeddings, embeddings):
        # ``embeddings`` only ties the result to the graph (so that differentiating it
        # reaches the backward below); its value is not used.
        return grad_embeddings.clone()

    @staticmethod
    def backward(ctx, _):
        raise RuntimeError(DOUBLE_BACKWARD_ERROR)


def _scaled(grad_rows, grad_loss_rows, embedding_dtype, embeddings=None):
    """Row i's saved gradient times the upstream gradient of loss row i."""
    if grad_rows.shape[0] != grad_loss_rows.shape[0]:
        raise RuntimeError(
            "the DCQ loss ran its forward without computing the gradient "
            "(embeddings did not require grad, or grad mode was off), so it cannot backpropagate"
        )
    grad = (grad_rows * grad_loss_rows.unsqueeze(1).to(grad_rows.dtype)).to(embedding_dtype)
    if torch.is_grad_enabled() and embeddings is not None:  # create_graph=True: the backward is recorded
        grad = _NoDoubleBackward.apply(grad, embeddings)
    return grad


def _backward(ctx, grad_loss_rows, _unused_grad_of_grad_rows):
    grad_rows, embeddings = ctx.saved_tensors
    # One gradient for embeddings; none for every other input and parameter.
    return (_scaled(grad_rows, grad_loss_rows, ctx.embedding_dtype, embeddings),) + (None,) * (ctx.num_inputs - 1)


def register_fused_autograd(op_name: str, num_inputs: int) -> None:
    def setup_context(ctx, inputs, output):
        ctx.num_inputs = num_inputs
        _setup_context(ctx, inputs, output)

    torch.library.register_autograd(op_name, _backward, setup_context=setup_context)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 when an input is float64 (the fused ops' output dtype)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def fused_fake(embeddings: torch.Tensor, compute_grad: bool, dtype: torch.dtype = torch.float32):
    """Shapes of a fused op's outputs (loss rows, gradient rows), for its fake (meta) kernel."""
    rows, dim = embeddings.shape
    loss_rows = embeddings.new_empty((rows,), dtype=dtype)
    grad_rows = embeddings.new_empty((rows if compute_grad else 0, dim), dtype=dtype)
    return loss_rows, grad_rows


class _RowsWithGradient(torch.autograd.Function):
    """Per-row losses whose gradient with respect to the embeddings was computed in the
    forward, when the rows come from a composition of ops rather than one op (the
    sharded queue): the backward only scales it, communicates nothing and never reads
    the queue."""

    @staticmethod
    def forward(ctx, embeddings, loss_rows, grad_rows):
        ctx.save_for_backward(grad_rows, embeddings)
        ctx.embedding_dtype = embeddings.dtype
        ctx.mark_non_differentiable(grad_rows)
        return loss_rows.clone()

    @staticmethod
    def backward(ctx, grad_loss_rows):
        grad_rows, embeddings = ctx.saved_tensors
        return _scaled(grad_rows, grad_loss_rows, ctx.embedding_dtype, embeddings), None, None


def rows_with_gradient(embeddings: torch.Tensor, loss_rows: torch.Tensor, grad_rows: torch.Tensor) -> torch.Tensor:
    """``loss_rows`` whose gradient with respect to ``embeddings`` is ``grad_rows`` (row i's
    gradient is grad_rows[i] times the upstream gradient of loss_rows[i])."""
    return _RowsWithGradient.apply(embeddings, loss_rows, grad_rows)
