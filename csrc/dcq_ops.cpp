// The one place that lists every op of dcq_ops._C (schemas only; the kernels
// register themselves per device in margin_ce.cpp, cpu/ and cuda/).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import dcq_ops._C` loads this library, which runs the registrations below.
// The module itself is empty: every entry point is a torch.ops.dcq_ops op.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dcq_ops, m) {
  // DESIGN.md §2 over the queue in chunks; returns (loss per row, gradient of
  // each row's loss with respect to the embeddings, or [0, D] when
  // compute_grad is false). Gradient to embeddings only.
  m.def(
      "margin_cross_entropy(Tensor embeddings, Tensor class_weights, Tensor labels, "
      "Tensor queue_weights, Tensor queue_labels, float scale, float m1, float m2, float m3, "
      "float filter_threshold, bool straight_through, bool compute_grad, int chunk_size) "
      "-> (Tensor, Tensor)");
  // FIFO write of normalised keys into (weights, labels) at the device-side
  // pointer ptr [1] (int64), which it advances modulo the queue size.
  m.def(
      "queue_enqueue_(Tensor(a!) weights, Tensor(b!) labels, Tensor(c!) ptr, Tensor keys, "
      "Tensor key_labels) -> ()");
}
