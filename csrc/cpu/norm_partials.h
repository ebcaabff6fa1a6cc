// The CPU norm kernel's per-chunk partial results, shared by the norm ops (cpu/multi_tensor_cpu.cpp)
// and the per-group norms (cpu/group_norms_cpu.cpp), so that both read the gradients through the same
// chunks and combine them in the same order (see note: [CPU chunking and determinism]).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace segclip {

struct ChunkPartials {
  // Per chunk, in list order: the sum of |x|^p (p = 1, 2) or max |x| (p = inf), in double.
  std::vector<double> partials;
  std::vector<int64_t> tensor_of;  // the index (in the input list) of each chunk's tensor
  at::ScalarType out_dtype;        // float64 when any input is float64, else float32
  bool is_max;                     // p = inf: partials combine by max, else by sum
};

// Checks the list as the norm ops do (non-empty, CPU, strided, a supported dtype; norm_type 1, 2 or
// inf) and returns the partial result of every chunk. Empty tensors have no chunk.
ChunkPartials norm_chunk_partials(at::TensorList tensors, double norm_type, const char* op);

// Two partial results combined; the max propagates NaN, so a NaN anywhere gives a NaN inf-norm.
inline double combine_partial(double a, double b, bool is_max) {
  if (!is_max) return a + b;
  return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN() : std::max(a, b);
}

}  // namespace segclip
