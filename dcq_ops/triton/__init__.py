"""Triton kernels of dcq_ops (the "triton" backend):

- ``dcq_ops.triton.kernels``: the @triton.jit kernels;
- ``dcq_ops.triton.launch``: launch planning (queue splits, tiles per
  architecture from ``dcq_ops.triton.configs``, autotuning) and the launches;
- ``dcq_ops.triton.ops``: the registered ops ``dcq_ops::triton_dcq_cross_entropy``,
  ``dcq_ops::triton_dcq_cross_entropy_partials`` and
  ``dcq_ops::triton_dcq_cross_entropy_finalize``, and the backend table's adapters.

Nothing is imported here, so that ``import dcq_ops.triton`` never needs Triton.
Kernels are decorated when ``dcq_ops.triton.kernels`` is first imported: with
``TRITON_INTERPRET=1`` set at that moment they run on CPU tensors through
Triton's interpreter, otherwise they compile for the GPU (``import_ops`` sets
the variable for that import only).
"""

from __future__ import annotations

import os
import sys


def import_ops(interpret: bool):
    """Import and return ``dcq_ops.triton.ops`` (registering its ops), with the
    kernels decorated for Triton's CPU interpreter when ``interpret`` is true:
    TRITON_INTERPRET=1 is set for that import only, since left set it would make
    the triton backend "available" on CPU tensors everywhere after
    (dcq_ops.backends). Triton decorates its own library when it is first
    imported, so this works only if Triton was not imported yet (else the
    kernels follow the mode Triton was imported in); whether they are
    interpreted is then ``dcq_ops.triton.kernels.INTERPRETED``. Triton reads
    TRITON_INTERPRET=1 again when interpreted kernels are launched. Raises
    ImportError without Triton."""
    saved = os.environ.get("TRITON_INTERPRET")
    if interpret and "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
    try:
        from dcq_ops.triton import ops
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return ops
