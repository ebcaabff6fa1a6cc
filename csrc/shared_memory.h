// Whether the tensors of a list share memory, for the CPU (csrc/cpu) and CUDA (csrc/cuda) scale
// kernels. Host code, no device access.
#pragma once

#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cstdint>
#include <utility>
#include <vector>

namespace segclip {

// NOTE: [tensors that share memory]
// A list may hold the same memory twice: a parameter passed twice, parameters that share one .grad,
// views of one buffer. torch's clip_grad_norm_ scales each list entry in turn (_foreach_mul_), so
// such memory is scaled once per entry, and its norm counts it once per entry. The fused scale pass
// works on the chunks of all tensors at once: two entries' chunks would read-modify-write the same
// memory concurrently, a data race (some elements scaled once, some twice, differently every call).
// So when the memory of two flat tensors may intersect, the kernels scale one tensor at a time, in
// list order: torch's result. A flat (non-overlapping and dense) tensor fills its byte range, so two
// flat tensors share memory exactly when their ranges intersect. The test costs a sort of one pair
// per tensor; the common list (separate gradients) keeps the fused pass. A list with any shared
// memory is scaled wholly one tensor at a time (one parallel region or launch per tensor), not in
// rounds of disjoint tensors: simpler, and such lists are rare (a parameter passed twice).

// [first byte, one past the last byte] of a non-overlapping and dense tensor with n > 0 elements.
inline std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& flat) {
  const auto begin = reinterpret_cast<uintptr_t>(flat.const_data_ptr());
  return {begin, begin + static_cast<uintptr_t>(flat.numel()) * static_cast<uintptr_t>(flat.element_size())};
}

// True when two of the ranges intersect. Takes the vector by value: it is sorted here.
inline bool any_ranges_intersect(std::vector<std::pair<uintptr_t, uintptr_t>> ranges) {
  std::sort(ranges.begin(), ranges.end());
  uintptr_t reach = 0;  // the largest end so far
  for (size_t i = 0; i < ranges.size(); ++i) {
    if (i > 0 && ranges[i].first < reach) return true;
    reach = std::max(reach, ranges[i].second);
  }
  return false;
}

}  // namespace segclip
