// What every CUDA kernel's ATen side checks of a tensor list before anything is queued (see note:
// [op contract] in csrc/segclip.cpp), and the dtype mapping to the kernels' DType: one definition for
// the norm, scale and clip ops (multi_tensor_cuda.cpp), the per-group partials (group_cuda.cpp) and
// the adaptive clip (adaptive_cuda.cpp). Host code.
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "multi_tensor_kernels.h"  // NormKind, DType

namespace segclip {
namespace cuda {

// The norm types the kernels take; others go through PyTorch (segclip.total_norm, fused_clip_).
inline NormKind norm_kind(double norm_type) {
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  if (std::isinf(norm_type) && norm_type > 0) return NormKind::kLinf;
  TORCH_CHECK(false, "segclip kernels support norm_type 1, 2 and inf, got ", norm_type,
              " (segclip.total_norm and segclip.fused_clip_ handle other norm types through PyTorch)");
}

inline std::optional<DType> to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf: return DType::kHalf;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat: return DType::kFloat;
    case at::kDouble: return DType::kDouble;
    default: return std::nullopt;
  }
}

// Checks every tensor (all errors are RuntimeErrors naming `name`[index]) and returns their device,
// which every tensor must be on: `expected` when given (named `expected_name` in the messages: the
// scale's coef, the adaptive clip's grads), else the device of the first CUDA tensor. Nothing has
// been queued or written when a check fails.
inline at::Device check_tensors(at::TensorList tensors, const char* op,
                                std::optional<at::Device> expected = std::nullopt, const char* name = "tensors",
                                const char* expected_name = "coef") {
  std::string ref_name = expected_name;
  if (!expected.has_value()) {
    for (size_t i = 0; i < tensors.size() && !expected.has_value(); ++i) {
      TORCH_CHECK(tensors[i].defined(), op, ": ", name, "[", i, "] is undefined");
      if (tensors[i].is_cuda()) {
        expected = tensors[i].device();
        ref_name = std::string(name) + "[" + std::to_string(i) + "]";
      }
    }
    TORCH_CHECK(expected.has_value(), op, ": the CUDA kernel got no CUDA tensor (", name, "[0] is on ",
                tensors[0].device(), ")");
  }
  const at::Device device = *expected;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, "[", i, "] has layout ", t.layout(),
                "; only strided (dense) tensors are supported");
    TORCH_CHECK(t.device() == device, op, ": ", name, "[", i, "] is on ", t.device(), " but ", ref_name, " is on ",
                device, "; all tensors must be on one CUDA device");
    TORCH_CHECK(to_dtype(t.scalar_type()).has_value(), op, ": ", name, "[", i, "] has dtype ", t.scalar_type(),
                "; supported: float32, float64, float16, bfloat16");
    // Possible with set_() on a byte offset of a storage, or DLPack: the GPU cannot even load such an
    // element (a misaligned-address fault kills the CUDA context), so refuse it before anything runs.
    TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0, op,
                ": ", name, "[", i, "]'s data pointer ", t.const_data_ptr(), " is not a multiple of its element size (",
                t.element_size(), " bytes); a CUDA kernel cannot read it (copy it with .clone() first)");
  }
  return device;
}

}  // namespace cuda
}  // namespace segclip
