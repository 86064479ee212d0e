"""Triton kernels of dcq_ops (the "triton" backend).

Nothing is imported here, so that ``import dcq_ops.triton`` never needs Triton;
``dcq_ops.triton.margin_ce`` imports it and registers
``dcq_ops::margin_cross_entropy_triton``. Kernels are decorated when that module
is first imported: with ``TRITON_INTERPRET=1`` set at that moment they run on
CPU tensors through Triton's interpreter, otherwise they compile for the GPU.
"""
