// The one place that lists every op of dcq_ops._C (schemas only; the kernels
// register themselves per device in margin_ce.cpp, cpu/ and cuda/).
#include <Python.h>
#include <torch/library.h>

#include "cpu/epilogue.h"

namespace {

// dcq_ops._C.cpu_capability(): the instruction set of the CPU epilogue in use.
PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(dcq_ops::cpu_capability()); }

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU epilogue's instruction set: 'avx512', 'avx2' or 'default' (ATEN_CPU_CAPABILITY lowers it)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import dcq_ops._C` loads this library, which runs the registrations below.
// Every entry point is a torch.ops.dcq_ops op, but for cpu_capability().
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(dcq_ops, m) {
  // The DCQ loss of docs/loss.md against the whole queue (partials, then
  // finalize); returns (loss per row, gradient of each row's loss with respect
  // to the embeddings, or [0, D] when compute_grad is false), in fp32, or in
  // fp64 when an input is float64. Gradient to embeddings only.
  m.def(
      "dcq_cross_entropy(Tensor embeddings, Tensor class_weights, Tensor labels, "
      "Tensor queue_weights, Tensor queue_labels, float scale, float m1, float m2, float m3, "
      "float interclass_filtering_threshold, bool straight_through_margin, bool compute_grad, int chunk_size) "
      "-> (Tensor, Tensor)");
  // The loss algebra's first step over a slice of the queue: (row_max [N],
  // row_sum [N], accumulator [N, D], or [0, D] when compute_grad is false).
  m.def(
      "dcq_cross_entropy_partials(Tensor embeddings, Tensor labels, Tensor queue_weights, Tensor queue_labels, "
      "float scale, float interclass_filtering_threshold, bool compute_grad, int chunk_size) "
      "-> (Tensor, Tensor, Tensor)");
  // Its last step, from the merged partials of every row: (loss per row,
  // gradient rows or [0, D]).
  m.def(
      "dcq_cross_entropy_finalize(Tensor embeddings, Tensor class_weights, Tensor row_max, Tensor row_sum, "
      "Tensor accumulator, float scale, float m1, float m2, float m3, bool straight_through_margin, "
      "bool compute_grad) -> (Tensor, Tensor)");
  // FIFO write of the normalised class_weights and their class_labels into
  // (weights, labels) at the device-side pointer ptr [1] (int64), which it
  // advances modulo the queue size. With bad_reasons (int64 [1] on the queue's
  // device), nothing is written and the pointer stays where it was unless
  // bad_reasons == 0: a bad batch never enters the queue, and the host never
  // waits to find out.
  m.def(
      "queue_enqueue_(Tensor(a!) weights, Tensor(b!) labels, Tensor(c!) ptr, Tensor class_weights, "
      "Tensor class_labels, Tensor? bad_reasons=None) -> ()");
}
