// The interface between value_cuda.cpp (ATen side, host compiler) and value_kernels.cu (nvcc) for the
// value clip (segclip::multi_tensor_clip_value_). Plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include <vector>

#include "multi_tensor_apply.cuh"

namespace segclip {
namespace cuda {

// The bound per dtype, already rounded to it (see note: [value clip bound] in cpu/value_cpu.cpp):
// the kernel clamps each element against its own dtype's bound.
struct ValueBounds {
  float half;
  float bfloat16;
  float single;
  double dbl;
};

// Queues the clamp of every piece to [-bound, bound] on `stream`; stores only 16-byte vectors (or
// scalars) that hold an element beyond the bound. Never synchronises with the host.
void launch_multi_tensor_clip_value(const std::vector<TensorPiece>& pieces, const ValueBounds& bounds,
                                    cudaStream_t stream);

}  // namespace cuda
}  // namespace segclip
