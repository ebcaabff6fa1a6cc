// Importing segclip._C_cuda loads this shared library, which registers the CUDA kernels
// (TORCH_LIBRARY_IMPL in multi_tensor_cuda.cpp); import segclip._C first (it declares the schemas).
// The module holds only the multi-tensor apply's sizes, for tests and benchmarks that need to cross
// chunk and launch boundaries (see note: [CUDA chunking and launches]).
#include <Python.h>

#include "multi_tensor_apply.cuh"

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  using namespace segclip::cuda;
  if (PyModule_AddIntConstant(module, "CHUNK_ELEMS", static_cast<long>(kChunkElems)) < 0 ||
      PyModule_AddIntConstant(module, "MAX_TENSORS_PER_LAUNCH", kMaxTensors) < 0 ||
      PyModule_AddIntConstant(module, "MAX_BLOCKS_PER_LAUNCH", kMaxBlocks) < 0 ||
      PyModule_AddIntConstant(module, "BLOCK_THREADS", kBlockThreads) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
