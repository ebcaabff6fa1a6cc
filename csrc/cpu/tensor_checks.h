#pragma once
// What every CPU kernel checks of each list entry before it reads or writes anything (see note:
// [op contract] in csrc/segclip.cpp): one definition, so every op refuses the same inputs with the
// same words.
#include <ATen/ATen.h>

#include <cstddef>

namespace segclip {

inline bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// `name[i]` of op `op`: defined, dense, on the CPU, of a supported floating dtype.
inline void check_cpu_tensor(const at::Tensor& t, const char* op, const char* name, size_t i) {
  TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] has layout ", t.layout(),
              "; only strided (dense) tensors are supported");
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, "[", i, "] is on ", t.device(),
              "; the CPU kernel takes CPU tensors only");
  TORCH_CHECK(is_supported_dtype(t.scalar_type()), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
              "; supported: float32, float64, float16, bfloat16");
}

}  // namespace segclip
