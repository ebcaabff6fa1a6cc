// What the CPU (csrc/cpu) and CUDA (csrc/cuda) scale kernels check before their first write, and
// the layout test both use. Host code.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <c10/core/InferenceMode.h>

#include <cstddef>

namespace segclip {

// A tensor whose elements fill exactly [data_ptr, data_ptr + numel) in some order (contiguous,
// channels_last, transposed, ...): the kernels process it as one flat array.
inline bool is_flat(const at::Tensor& t) { return t.is_contiguous() || t.is_non_overlapping_and_dense(); }

// tensors[i] may be scaled in place: what torch's mul_ refuses is refused here, whether or not
// anything will be written (coef >= 1 writes nothing; mul_ by 1 refuses all the same).
inline void check_scalable(const at::Tensor& t, size_t i, const char* op) {
  TORCH_CHECK(!t.is_inference() || c10::InferenceMode::is_enabled(), op, ": tensors[", i,
              "] is an inference tensor; an in-place update outside torch.inference_mode is not allowed "
              "(clone it first)");
  TORCH_CHECK(is_flat(t) || at::has_internal_overlap(t) != at::MemOverlap::Yes, op, ": tensors[", i,
              "] has internally overlapping memory (an expanded view?); it cannot be scaled in place");
}

}  // namespace segclip
