"""The Python side of the compiled ops of dcq_ops._C (their schemas are in csrc/dcq_ops.cpp):
fake kernels and autograd of the chunked backend's ops (chunked.py), the autograd the
fused backends share (fused_autograd.py), and the enqueue op with its plain-PyTorch
fallback (queue.py). The Triton backend registers its own ops (dcq_ops/triton/)."""
