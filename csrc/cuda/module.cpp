// Importing segclip._C_cuda loads this shared library, which registers the CUDA kernels
// (TORCH_LIBRARY_IMPL in multi_tensor_cuda.cpp); import segclip._C first (it declares the schemas).
// The module holds only the multi-tensor apply's sizes, for tests and benchmarks that need to cross
// chunk and launch boundaries (see note: [CUDA chunking and launches]).
#include <Python.h>

#include "adaptive_apply.cuh"
#include "multi_tensor_kernels.h"

extern "C" PyObject* PyInit__C_cuda(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_cuda", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
  using namespace segclip::cuda;
  // See note: [kernel argument space]: the tables' layout is chosen per translation unit from
  // CUDART_VERSION; the launchers (nvcc) and this file (the host compiler) must agree on it.
  if (kernel_param_bytes() != kKernelParamBytes) {
    PyErr_Format(PyExc_ImportError,
                 "segclip._C_cuda: the kernels were compiled for %d bytes of kernel arguments, the host side for "
                 "%d (different CUDA headers?); rebuild with one toolkit",
                 kernel_param_bytes(), kKernelParamBytes);
    Py_DECREF(module);
    return nullptr;
  }
  if (PyModule_AddIntConstant(module, "CHUNK_ELEMS", static_cast<long>(kChunkElems)) < 0 ||
      PyModule_AddIntConstant(module, "KERNEL_PARAM_BYTES", kKernelParamBytes) < 0 ||
      PyModule_AddIntConstant(module, "MAX_TENSORS_PER_LAUNCH", kMaxTensors) < 0 ||
      PyModule_AddIntConstant(module, "MAX_BLOCKS_PER_LAUNCH", kMaxBlocks) < 0 ||
      PyModule_AddIntConstant(module, "BLOCK_THREADS", kBlockThreads) < 0 ||
      PyModule_AddIntConstant(module, "MAX_GROUP_RUNS_PER_LAUNCH", kMaxGroupRuns) < 0 ||
      PyModule_AddIntConstant(module, "MAX_PAIRS_PER_LAUNCH", kMaxPairs) < 0 ||
      PyModule_AddIntConstant(module, "MAX_PAIR_BLOCKS_PER_LAUNCH", kMaxPairBlocks) < 0 ||
      PyModule_AddIntConstant(module, "ADAPTIVE_WARP_ROW_MAX", static_cast<long>(kWarpRowMaxElems)) < 0 ||
      PyModule_AddIntConstant(module, "ADAPTIVE_MAX_ROWS_PER_BLOCK", static_cast<long>(kMaxRowsPerBlock)) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}
