"""``warmup``: compile, autotune and first-contact-check the loss's kernels before training,
so that no training step compiles, autotunes, checks or synchronises (e.g. before
capturing CUDA graphs). ``DCQLoss.prepare`` does the same for a module's queue.

It is what covers the calls the first-contact check cannot check: calls traced by
``torch.compile`` and calls under CUDA-graph capture (they cannot read a number on the
host; the first of them of a class never checked warns once). A shape class includes the
launch plan (dcq_ops.launch_plans), so give every batch size the run will see: a last,
smaller batch has another row tail, and another class."""

from __future__ import annotations

import torch

from dcq_ops.backends import FUSED_BACKENDS
from dcq_ops.first_contact import Outcome, no_autocast, outcome_of, shape_class
from dcq_ops.margin import margin_from
from dcq_ops.validation import check_positive_int



def warmup(batch_sizes, embedding_size: int, queue_size: int, *, margin=None, dtype: torch.dtype = torch.float32,
           class_weights_dtype: torch.dtype | None = None, queue_dtype: torch.dtype | None = None, device=None,
           backend: str = "auto", training: bool = True, evaluation: bool = False, seed: int = 0) -> list[Outcome]:
    """Compile, autotune and check (first contact) the loss's kernels for these batch sizes
    now, on seeded synthetic inputs of the same shapes and dtypes, so that no later call
    compiles, autotunes, checks or synchronises (e.g. before capturing CUDA graphs, or
    before ``torch.cuda.set_sync_debug_mode("error")``). Nothing is enqueued anywhere.

    Parameters
    ----------
    batch_sizes : iterable of int
        The numbers of rows N the loss will see (e.g. the batch and a smaller last batch:
        each N with another launch plan is another shape class).
    embedding_size : int
        D.
    queue_size : int
        K, the slots of the queue the loss runs against (a synthetic queue of this size is
        allocated for the warm-up, then freed).
    margin : MarginConfig or margin object, optional
        As ``DCQLoss``'s ``margin_loss`` (default: CosFace, s=50, m=0.3). Only whether
        filtering is on changes the kernels.
    dtype : torch.dtype
        The embeddings' dtype (e.g. bfloat16 under autocast).
    class_weights_dtype : torch.dtype, optional
        Default: ``dtype``.
    queue_dtype : torch.dtype, optional
        Default: bf16 on CUDA, fp32 elsewhere (``DCQLoss``'s "auto").
    device : torch.device or str, optional
        Default: the current CUDA device if there is one, else the CPU.
    backend : str
        "auto", "triton", "chunked" or "reference".
    training, evaluation : bool
        Warm the calls with a gradient (training) and without (evaluation, ``no_grad``).
    seed : int
        Seed of the synthetic inputs.

    Returns
    -------
    list of Outcome
        The outcome of each shape class touched (fused backends only; "skipped" with the
        reason where the check did not run; "demoted" with the mismatch or the exception
        of a fused call that failed: the warm-up itself never raises for it).
    """
    from dcq_ops.backends import select_backend
    from dcq_ops.functional import dcq_cross_entropy

    sizes = [check_positive_int(f"batch_sizes[{i}]", n) for i, n in enumerate(batch_sizes)]
    check_positive_int("embedding_size", embedding_size)
    check_positive_int("queue_size", queue_size)
    for name, flag in (("training", training), ("evaluation", evaluation)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {flag!r}")
    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    queue_dtype = queue_dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    class_weights_dtype = class_weights_dtype or dtype
    margin = margin_from(margin)
    generator = torch.Generator(device=device).manual_seed(seed)
    classes = max(2, queue_size)
    queue_weights = torch.nn.functional.normalize(
        torch.randn(queue_size, embedding_size, device=device, generator=generator), dim=1).to(queue_dtype)
    queue_labels = torch.randint(0, classes, (queue_size,), device=device, generator=generator)
    resolved = select_backend(device, backend, input_dtypes=(dtype, class_weights_dtype), queue_dtype=queue_dtype)
    touched = []
    for rows in sizes:
        x = torch.randn(rows, embedding_size, device=device, generator=generator)
        k = (0.5 * x + torch.randn(rows, embedding_size, device=device, generator=generator)).to(class_weights_dtype)
        x = x.to(dtype)
        y = torch.randint(0, classes, (rows,), device=device, generator=generator)
        modes = [mode for mode, wanted in ((True, training), (False, evaluation)) if wanted]
        for grad in modes:
            xg = x.clone().requires_grad_(grad)
            with no_autocast(device.type), torch.set_grad_enabled(grad):
                loss = dcq_cross_entropy(xg, k, y, queue_weights, queue_labels, **margin.kwargs(), reduction="none",
                                         backend=resolved)
                if grad:
                    loss.sum().backward()
            if resolved in FUSED_BACKENDS:
                key = shape_class(resolved, xg, k, queue_weights, margin, grad)
                outcome = outcome_of(key)
                if outcome is not None and outcome not in touched:
                    touched.append(outcome)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return touched
