"""``python -m dcq_ops.check`` (also ``dcq-check``): what this machine's backends compute, as JSON.

Run it on your GPU after installing (``scripts/gpu_check.sh`` runs it too). It reports:

1. **numerics**: every available backend ("triton", "chunked", "reference") and queue
   dtype (fp32, fp16, bf16; float64 where the backend computes it) against the loss
   computed in float64 from the same inputs, on small seeded inputs and three margins,
   within the first-contact check's error bound (``dcq_ops.rounding_bound.difference_bound``);
2. **triton_configuration**: the architecture, the tile configurations that fit (the first
   is the default) and the autotuner's pick (``launch.autotuner_picks()``, autotuning
   forced on for that call);
3. **first_contact**: ``dcq_ops.warmup`` of each fused backend and queue dtype (the
   first-contact check), its outcomes (status "passed", "demoted" or "skipped", with the
   reason: the mismatch, or the exception of a fused call that failed to compile or
   launch) and ``dcq_ops.backends()`` after it;
4. **sync_free_step**: training steps of a small model with ``DCQLoss`` after
   ``DCQLoss.prepare`` and one warm-up step, under ``torch.cuda.set_sync_debug_mode("error")``;
5. **timing**: the fused Triton pass against the cuBLAS GEMM pair it fuses (logits
   ``q W^T`` then ``P W``, bf16) and against "chunked", forward with the gradient.

Parts that cannot run here (no GPU, no Triton, no extension) are listed under
``"skipped"`` with the reason. The JSON goes to stdout, or to ``--out PATH`` (rewritten
after every part, with ``"unfinished": true`` until the end, so that a time limit keeps
what ran); progress goes to stderr. Exit status: 0 when every check that ran passed, 1 when
one failed (a numerics or first-contact mismatch, a demotion, a synchronisation in the
step, an error), 2 on a bad argument, before anything runs (an ``--out`` whose folder does
not exist or cannot be written included). On a CPU it takes a few seconds.

The parts live in their own modules: ``report`` (the JSON being built), ``numerics``,
``first_contact_part``, ``gpu_parts`` (configuration, sync-free step, timing) and
``command`` (the arguments and the run).
"""

from dcq_ops.check.command import main, parser, run

__all__ = ["main", "parser", "run"]
