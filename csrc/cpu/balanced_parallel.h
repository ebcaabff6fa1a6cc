// A parallel loop over work items of unequal sizes, split by size. Used by every CPU kernel that
// runs over the chunks (or row blocks) of a whole list: norm, scale, value clip, AGC.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <vector>

namespace segclip {

// NOTE: [balanced split]
// at::parallel_for cuts an index range into equal counts, one run of consecutive indices per thread.
// The chunks of a model's gradient list are of unequal sizes: every tensor's last chunk is short, and
// the many small tensors (BatchNorm weights and biases, the first convolutions) come before the big
// ones. Cut by count, on 2 threads one thread got 82% of deeplabv3_mobilenet_v3_large's elements and
// 93% of lraspp_mobilenet_v3_large's, so a "2-thread" pass ran at about the speed of one.
// parallel_for_weighted cuts the total weight instead: the range [0, total weight) goes to
// at::parallel_for, and each thread runs the items whose first unit of weight falls in its part. Every
// item runs exactly once, and the threads' shares differ by at most one item. Which thread runs an
// item changes no result: each item writes only its own slot or its own elements (see note: [CPU
// chunking and determinism] in multi_tensor_cpu.cpp).
//
// weights[k] is item k's size (elements); 0 counts as 1. parallel = false runs everything inline on
// the calling thread (for small lists: waking a thread costs more than it saves). min_grain: the least
// weight worth a thread of its own.
template <typename Fn>
void parallel_for_weighted(const std::vector<int64_t>& weights, bool parallel, int64_t min_grain, const Fn& fn) {
  const int64_t n = static_cast<int64_t>(weights.size());
  if (!parallel || n <= 1 || at::get_num_threads() <= 1) {
    for (int64_t k = 0; k < n; ++k) fn(k);
    return;
  }
  std::vector<int64_t> start(static_cast<size_t>(n));
  int64_t total = 0;
  for (int64_t k = 0; k < n; ++k) {
    start[k] = total;
    total += std::max<int64_t>(weights[k], 1);
  }
  at::parallel_for(0, total, std::max<int64_t>(min_grain, 1), [&](int64_t begin, int64_t end) {
    auto k = static_cast<int64_t>(std::lower_bound(start.begin(), start.end(), begin) - start.begin());
    for (; k < n && start[k] < end; ++k) fn(k);
  });
}

}  // namespace segclip
