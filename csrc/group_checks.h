// The argument checks of segclip::multi_tensor_group_partials that do not depend on the device, shared
// by its CPU (cpu/group_norms_cpu.cpp) and CUDA (cuda/group_cuda.cpp) kernels, and by the composite
// group norms and clip ops (segclip.cpp) for their lists with None entries, so that all refuse the
// same arguments with the same words, before anything is read. Host code.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <limits>

namespace segclip {

// n_tensors: the length of the tensor list (which may hold None entries: multi_tensor_group_norms).
inline void check_group_arguments(size_t n_tensors, at::IntArrayRef groups, int64_t num_groups, const char* op) {
  TORCH_CHECK(num_groups >= 0, op, ": num_groups must be >= 0, got ", num_groups);
  // Group indices travel as int32 to the CUDA kernels; a (2^31)-entry float64 result is 16 GiB.
  TORCH_CHECK(num_groups < std::numeric_limits<int32_t>::max(), op, ": num_groups must be < 2^31 - 1, got ",
              num_groups);
  TORCH_CHECK(groups.size() == n_tensors, op, ": groups has ", groups.size(), " entries for ", n_tensors,
              " tensors; expected one group index per tensor");
  for (size_t i = 0; i < groups.size(); ++i) {
    TORCH_CHECK(groups[i] >= 0 && groups[i] < num_groups, op, ": groups[", i, "] is ", groups[i],
                "; expected a group index in [0, ", num_groups, ")");
  }
}

inline void check_group_arguments(at::TensorList tensors, at::IntArrayRef groups, int64_t num_groups,
                                  const char* op) {
  check_group_arguments(tensors.size(), groups, num_groups, op);
}

}  // namespace segclip
