// The argument checks of segclip::multi_tensor_adaptive_clip_ that do not depend on the device, shared
// by its CPU (cpu/adaptive_cpu.cpp) and CUDA (cuda/adaptive_cuda.cpp) kernels so that both refuse the
// same arguments with the same words before anything is written. Host code.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstddef>

#include "inplace_checks.h"

namespace segclip {

inline bool adaptive_norm_type_supported(double norm_type) {
  return norm_type == 2.0 || norm_type == 1.0 || (std::isinf(norm_type) && norm_type > 0);
}

// The list lengths and the scalars.
inline void check_adaptive_arguments(at::TensorList weights, at::TensorList grads, double clip_factor, double eps,
                                     double norm_type, const char* op) {
  TORCH_CHECK(weights.size() == grads.size(), op, ": got ", weights.size(), " weights and ", grads.size(),
              " grads; expected one weight per grad");
  TORCH_CHECK(clip_factor >= 0, op, ": clip_factor must be a non-negative number, got ", clip_factor);
  TORCH_CHECK(eps >= 0, op, ": eps must be a non-negative number, got ", eps);
  TORCH_CHECK(adaptive_norm_type_supported(norm_type), op, " supports norm_type 1, 2 and inf, got ", norm_type,
              " (segclip.adaptive_clip_ handles other norm types through PyTorch)");
}

// Pair i, after each tensor passed its device's own checks: one shape, one dtype, a gradient that
// may be written in place.
inline void check_adaptive_pair(const at::Tensor& w, const at::Tensor& g, size_t i, const char* op) {
  TORCH_CHECK(w.sizes() == g.sizes(), op, ": weights[", i, "] has shape ", w.sizes(), " but grads[", i,
              "] has shape ", g.sizes());
  TORCH_CHECK(w.scalar_type() == g.scalar_type(), op, ": weights[", i, "] has dtype ", w.scalar_type(),
              " but grads[", i, "] has dtype ", g.scalar_type());
  check_scalable(g, i, op);
}

// The units of a gradient of this shape: rows (size(0) for two or more dimensions, else 1) of
// numel / rows elements, see note: [adaptive clip work split] (cpu/adaptive_cpu.cpp).
inline int64_t adaptive_rows(const at::Tensor& g) { return g.dim() <= 1 ? 1 : g.size(0); }

}  // namespace segclip
