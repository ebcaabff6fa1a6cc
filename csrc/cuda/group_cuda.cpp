// segclip::multi_tensor_group_partials on CUDA, ATen side: checks, output, scratch, device guard and
// stream; the kernel is the norm's, with a group per block (multi_tensor_kernels.cu, see note: [group
// partials on CUDA]). Same semantics and refusals as csrc/cpu/group_norms_cpu.cpp (the op contract:
// csrc/segclip.cpp). Nothing here synchronises with the host: the op can be captured in a CUDA graph.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <vector>

#include "../group_checks.h"
#include "../inplace_checks.h"
#include "cuda_checks.h"
#include "multi_tensor_kernels.h"

namespace segclip {
namespace cuda {
namespace {

at::Tensor multi_tensor_group_partials_cuda(at::TensorList tensors, at::IntArrayRef groups, int64_t num_groups,
                                            double norm_type) {
  const char* op = "segclip::multi_tensor_group_partials";
  check_group_arguments(tensors, groups, num_groups, op);  // shared with the CPU kernel
  TORCH_CHECK(!tensors.empty(), op, ": expected a non-empty list of tensors");
  const at::Device device = check_tensors(tensors, op);
  const NormKind kind = norm_kind(norm_type);
  c10::cuda::CUDAGuard guard(device);
  // The norm's inputs (see note: [CUDA non-dense tensors]), with each piece's group.
  std::vector<at::Tensor> packed;  // keeps the copies of non-dense tensors alive until queued
  std::vector<TensorPiece> pieces;
  std::vector<int32_t> piece_groups;
  pieces.reserve(tensors.size());
  piece_groups.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    if (t.numel() == 0) continue;
    const DType dtype = *to_dtype(t.scalar_type());
    if (is_flat(t)) {
      pieces.push_back({const_cast<void*>(t.const_data_ptr()), t.numel(), dtype});
    } else {
      packed.push_back(t.contiguous());
      pieces.push_back({const_cast<void*>(packed.back().const_data_ptr()), t.numel(), dtype});
    }
    piece_groups.push_back(static_cast<int32_t>(groups[i]));
  }
  const auto options = tensors[0].options().device(device);
  at::Tensor out = at::empty({num_groups + 1}, options.dtype(at::kDouble));
  const int64_t scratch_bytes = group_scratch_bytes(count_blocks(pieces));
  at::Tensor scratch;  // freed on return: the caching allocator orders its reuse after the kernels
  if (scratch_bytes > 0) scratch = at::empty({scratch_bytes}, options.dtype(at::kByte));
  launch_multi_tensor_group_partials(kind, pieces, piece_groups, static_cast<int32_t>(num_groups),
                                     scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr,
                                     out.mutable_data_ptr<double>(), c10::cuda::getCurrentCUDAStream(device.index()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CUDA, m) { m.impl("multi_tensor_group_partials", &multi_tensor_group_partials_cuda); }

}  // namespace cuda
}  // namespace segclip
