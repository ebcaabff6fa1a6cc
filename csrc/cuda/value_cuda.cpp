// segclip::multi_tensor_clip_value_ on CUDA, ATen side: checks, device guard, stream; the kernel is in
// value_kernels.cu. Same semantics as csrc/cpu/value_cpu.cpp; nothing here synchronises with the host.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "../inplace_checks.h"
#include "../shared_memory.h"
#include "value_kernels.h"

namespace segclip {
namespace cuda {
namespace {

bool to_dtype(at::ScalarType t, DType* out) {
  switch (t) {
    case at::kHalf: *out = DType::kHalf; return true;
    case at::kBFloat16: *out = DType::kBFloat16; return true;
    case at::kFloat: *out = DType::kFloat; return true;
    case at::kDouble: *out = DType::kDouble; return true;
    default: return false;
  }
}

// The bound rounded to each dtype, see note: [value clip bound] (csrc/cpu/value_cpu.cpp).
ValueBounds rounded_bounds(double c) {
  const float f = static_cast<float>(c);
  return {static_cast<float>(c10::Half(f)), static_cast<float>(c10::BFloat16(f)), f, c};
}

double bound_for(const ValueBounds& b, at::ScalarType t) {
  switch (t) {
    case at::kHalf: return b.half;
    case at::kBFloat16: return b.bfloat16;
    case at::kFloat: return b.single;
    default: return b.dbl;
  }
}

void multi_tensor_clip_value_cuda(at::TensorList tensors, double clip_value) {
  const char* op = "segclip::multi_tensor_clip_value_";
  TORCH_CHECK(clip_value >= 0, op, ": clip_value must be a non-negative number, got ", clip_value);
  if (tensors.empty()) return;
  TORCH_CHECK(tensors[0].defined() && tensors[0].is_cuda(), op, ": tensors[0] is not a CUDA tensor");
  const at::Device device = tensors[0].device();
  std::vector<TensorPiece> pieces;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;
  std::vector<at::Tensor> strided;
  for (size_t i = 0; i < tensors.size(); ++i) {  // every check before anything is queued
    const at::Tensor& t = tensors[i];
    TORCH_CHECK(t.defined(), op, ": tensors[", i, "] is undefined");
    TORCH_CHECK(t.layout() == at::kStrided, op, ": tensors[", i, "] has layout ", t.layout(),
                "; only strided (dense) tensors are supported");
    TORCH_CHECK(t.device() == device, op, ": tensors[", i, "] is on ", t.device(), " but tensors[0] is on ", device,
                "; all tensors must be on one CUDA device");
    DType dtype;
    TORCH_CHECK(to_dtype(t.scalar_type(), &dtype), op, ": tensors[", i, "] has dtype ", t.scalar_type(),
                "; supported: float32, float64, float16, bfloat16");
    TORCH_CHECK(t.numel() == 0 || reinterpret_cast<uintptr_t>(t.const_data_ptr()) % t.element_size() == 0, op,
                ": tensors[", i, "]'s data pointer is not a multiple of its element size; a CUDA kernel cannot "
                "read it (copy it with .clone() first)");
    check_scalable(t, i, op);
    if (t.numel() == 0) continue;
    if (is_flat(t)) {
      pieces.push_back({t.mutable_data_ptr(), t.numel(), dtype});
      ranges.push_back(byte_range(t));
    } else {
      strided.push_back(t);
    }
  }
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const ValueBounds bounds = rounded_bounds(clip_value + 0.0);
  if (any_ranges_intersect(std::move(ranges))) {  // shared memory: one launch per tensor, stream-ordered
    for (const TensorPiece& piece : pieces) launch_multi_tensor_clip_value({piece}, bounds, stream);
  } else {
    launch_multi_tensor_clip_value(pieces, bounds, stream);
  }
  for (const at::Tensor& t : strided) {  // views with gaps: torch's own clamps, with the rounded bound
    const double h = bound_for(bounds, t.scalar_type());
    if (std::isinf(h)) continue;
    t.clamp_min_(-h).clamp_max_(h);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CUDA, m) { m.impl("multi_tensor_clip_value_", &multi_tensor_clip_value_cuda); }

}  // namespace cuda
}  // namespace segclip
