// The clip coefficient, shared by the CPU kernel (csrc/cpu) and the CUDA kernel (csrc/cuda).
#pragma once

#if defined(__CUDACC__)
#define SEGCLIP_COEF_HD __host__ __device__ __forceinline__
#else
#define SEGCLIP_COEF_HD inline
#endif

namespace segclip {

// min(1, max_norm / (norm + 1e-6)) in the norm's dtype, evaluated exactly as
// torch.nn.utils.clip_grad_norm_ evaluates it: there `max_norm / (total_norm + 1e-6)` is a number
// divided by a tensor, i.e. Tensor.__rtruediv__ = reciprocal() * max_norm, then clamp(max=1.0).
// So a norm equal to torch's gives a coefficient bitwise equal to torch's (a true division differs
// by one ulp about a quarter of the time). A NaN norm gives NaN: torch.clamp keeps NaN.
template <typename T>
SEGCLIP_COEF_HD T clip_coefficient(T norm, T max_norm) {
  const T coef = (T(1) / (norm + T(1e-6))) * max_norm;
  return coef != coef ? coef : (coef < T(1) ? coef : T(1));
}

}  // namespace segclip
