"""Op families: margin cross-entropy and queue enqueue (registration, fake kernels, autograd)."""
