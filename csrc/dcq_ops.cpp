// The one place that lists every op of dcq_ops._C (schemas only; the kernels
// register themselves per device in margin_ce.cpp, cpu/ and cuda/).
#include <Python.h>
#include <torch/library.h>

#include <exception>
#include <string>

#include "cpu/epilogue.h"
#include "cpu/tile_gemm.h"

namespace {

// dcq_ops._C.cpu_capability(): the instruction set of the CPU epilogue in use.
PyObject* cpu_capability(PyObject*, PyObject*) { return PyUnicode_FromString(dcq_ops::cpu_capability()); }

// dcq_ops._C.cpu_gemm_provider(): who computes the fp32 tile GEMMs (chosen on
// first call: DCQ_OPS_CPU_GEMM, else the probe). ValueError for a bad DCQ_OPS_CPU_GEMM.
PyObject* cpu_gemm_provider(PyObject*, PyObject*) {
  try {
    return PyUnicode_FromString(dcq_ops::provider_name(dcq_ops::cpu_gemm_provider()));
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

PyObject* cpu_gemm_providers(PyObject*, PyObject*) {
  const auto names = dcq_ops::available_cpu_gemm_providers();
  PyObject* list = PyList_New(0);
  for (const auto& name : names) {
    PyObject* item = PyUnicode_FromString(name.c_str());
    PyList_Append(list, item);
    Py_DECREF(item);
  }
  return list;
}

PyObject* set_cpu_gemm_provider(PyObject*, PyObject* arg) {
  PyObject* utf8 = PyUnicode_AsUTF8String(arg);  // the limited API's way (abi3)
  if (utf8 == nullptr) return nullptr;             // not a str: TypeError already set
  const std::string name = PyBytes_AsString(utf8);
  Py_DECREF(utf8);
  try {
    dcq_ops::set_cpu_gemm_provider(name);
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
  Py_RETURN_NONE;
}

PyObject* cpu_gemm_probe(PyObject*, PyObject*) {
  PyObject* dict = PyDict_New();
  for (const auto& [name, seconds] : dcq_ops::cpu_gemm_probe()) {
    PyObject* value = PyFloat_FromDouble(seconds);
    PyDict_SetItemString(dict, name.c_str(), value);
    Py_DECREF(value);
  }
  return dict;
}

PyMethodDef methods[] = {
    {"cpu_capability", cpu_capability, METH_NOARGS,
     "The CPU epilogue's instruction set: 'avx512', 'avx2' or 'default' (ATEN_CPU_CAPABILITY lowers it)."},
    {"cpu_gemm_provider", cpu_gemm_provider, METH_NOARGS,
     "Who computes the CPU queue pass's fp32 tile GEMMs: 'aten' or 'avx512' (chosen on first call)."},
    {"cpu_gemm_providers", cpu_gemm_providers, METH_NOARGS, "The CPU GEMM providers this CPU can run."},
    {"set_cpu_gemm_provider", set_cpu_gemm_provider, METH_O, "Replaces the CPU GEMM provider of this process."},
    {"cpu_gemm_probe", cpu_gemm_probe, METH_NOARGS,
     "Single-thread GFLOP/s of each provider on the probe tiles ({} when the choice was not measured)."},
    {nullptr, nullptr, 0, nullptr}};

}  // namespace

extern "C" {
// `import dcq_ops._C` loads this library, which runs the registrations below.
// Every entry point is a torch.ops.dcq_ops op, but for the methods above (CPU kernel choices).
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
