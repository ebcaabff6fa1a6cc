// CPU kernel of segclip::multi_tensor_group_partials (the op contract: csrc/segclip.cpp).
//
// The chunks' partial results are those of the norm ops (cpu/norm_partials.h): one parallel pass over
// all tensors, then one thread adds each chunk's result to its group's slot and to the total, both in
// chunk order. The total is therefore bitwise the sum (or max) multi_tensor_norm takes before its
// square root, and every group's value is deterministic for every thread count.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "../group_checks.h"
#include "norm_partials.h"

namespace segclip {
namespace {

at::Tensor multi_tensor_group_partials_cpu(at::TensorList tensors, at::IntArrayRef groups, int64_t num_groups,
                                           double norm_type) {
  const char* op = "segclip::multi_tensor_group_partials";
  check_group_arguments(tensors, groups, num_groups, op);  // shared with the CUDA kernel
  const ChunkPartials p = norm_chunk_partials(tensors, norm_type, op);
  std::vector<double> out(static_cast<size_t>(num_groups) + 1, 0.0);
  double& total = out.back();
  for (size_t c = 0; c < p.partials.size(); ++c) {
    double& slot = out[static_cast<size_t>(groups[p.tensor_of[c]])];
    slot = combine_partial(slot, p.partials[c], p.is_max);
    total = combine_partial(total, p.partials[c], p.is_max);
  }
  at::Tensor result = at::empty({num_groups + 1}, tensors[0].options().dtype(at::kDouble));
  std::copy(out.begin(), out.end(), result.mutable_data_ptr<double>());
  return result;
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CPU, m) { m.impl("multi_tensor_group_partials", &multi_tensor_group_partials_cpu); }

}  // namespace segclip
