// CUDA kernels for segclip's ops, ATen side: argument checks, outputs, scratch memory, device guard and
// stream; the kernels themselves are in multi_tensor_kernels.cu. The op schemas and the op contract:
// csrc/segclip.cpp, see note: [op contract]. Same semantics as csrc/cpu/multi_tensor_cpu.cpp.
//
// Nothing here synchronises with the host or reads a device value on the host, so the ops can be
// captured in a CUDA graph: outputs and scratch come from the caching allocator, work goes to the
// current stream.
//
// Per-operator ATen headers instead of ATen/ATen.h (which declares every op): halves this file's
// compile time. TORCH_ASSERT_ONLY_METHOD_OPERATORS makes a missing ops/ include a compile error.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/clamp_max.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../inplace_checks.h"
#include "../scale_out_of_place.h"
#include "../shared_memory.h"
#include "cuda_checks.h"
#include "multi_tensor_kernels.h"

namespace segclip {
namespace cuda {
namespace {

// NOTE: [CUDA non-dense tensors]
// A tensor with gaps or overlaps in memory (x[:, ::2], an expanded view) cannot be processed as a
// flat array. The norm reads a packed copy (t.contiguous(), queued on the current stream; the
// caching allocator keeps its memory from being reused before the kernel has read it). The scale
// walks a tensor with gaps by its sizes and strides, one extra launch per such tensor (see note:
// [CUDA strided scale]), with the fused kernel's rounding and its early exit: nothing is written
// when coef >= 1. A view with internal overlap (expanded) is refused before anything is queued.
// The rare view that strided scale cannot take (more than 8 dimensions left after merging, or
// overlap that neither ATen nor make_strided_view can rule out, as_strided((3, 3), (1, 1))) is
// scaled by scale_out_of_place (csrc/scale_out_of_place.h, shared with the CPU kernel) with
// min(coef, 1) (clamp_max keeps NaN): rounded once, each element once, but written even when
// coef >= 1 (with the same values).
// The norm's inputs: one piece per non-empty tensor (a packed copy for a non-dense one).
struct NormPlan {
  std::vector<at::Tensor> packed;  // keeps the copies of non-dense tensors alive until queued
  std::vector<TensorPiece> pieces;
  bool out_double = false;
};

NormPlan plan_norm(at::TensorList tensors) {
  NormPlan plan;
  plan.pieces.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    plan.out_double |= t.scalar_type() == at::kDouble;
    const DType dtype = *to_dtype(t.scalar_type());
    if (t.numel() == 0) continue;
    if (is_flat(t)) {
      plan.pieces.push_back({const_cast<void*>(t.const_data_ptr()), t.numel(), dtype});
    } else {  // see note: [CUDA non-dense tensors]
      plan.packed.push_back(t.contiguous());
      plan.pieces.push_back({const_cast<void*>(plan.packed.back().const_data_ptr()), t.numel(), dtype});
    }
  }
  return plan;
}

// Queues the norm (and the coefficient when max_norm is given) of a checked list on `stream`.
std::tuple<at::Tensor, at::Tensor> queue_norm(const NormPlan& plan, const at::TensorOptions& options,
                                              NormKind kind, std::optional<double> max_norm, cudaStream_t stream) {
  const auto out_options = options.dtype(plan.out_double ? at::kDouble : at::kFloat);
  at::Tensor norm = at::empty({}, out_options);
  at::Tensor coef = max_norm.has_value() ? at::empty({}, out_options) : at::Tensor();
  const int64_t scratch_bytes = norm_scratch_bytes(count_blocks(plan.pieces));
  at::Tensor scratch;  // freed on return: the caching allocator orders its reuse after the kernels
  if (scratch_bytes > 0) scratch = at::empty({scratch_bytes}, out_options.dtype(at::kByte));
  // Queues a memset and the launches; the last block writes norm and coef,
  // see note: [last-block reduction] (multi_tensor_kernels.cu).
  launch_multi_tensor_norm(kind, plan.pieces, scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr,
                           norm.mutable_data_ptr(), coef.defined() ? coef.mutable_data_ptr() : nullptr,
                           max_norm.value_or(0.0), plan.out_double, stream);
  return {norm, coef};
}

std::tuple<at::Tensor, at::Tensor> norm_impl(at::TensorList tensors, double norm_type,
                                             std::optional<double> max_norm, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": expected a non-empty list of tensors");
  const NormKind kind = norm_kind(norm_type);
  const at::Device device = check_tensors(tensors, op);
  c10::cuda::CUDAGuard guard(device);
  const NormPlan plan = plan_norm(tensors);
  return queue_norm(plan, tensors[0].options().device(device), kind, max_norm,
                    c10::cuda::getCurrentCUDAStream(device.index()));
}

at::Tensor multi_tensor_norm_cuda(at::TensorList tensors, double norm_type) {
  return std::get<0>(norm_impl(tensors, norm_type, std::nullopt, "segclip::multi_tensor_norm"));
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_coef_cuda(at::TensorList tensors, double norm_type,
                                                               double max_norm) {
  return norm_impl(tensors, norm_type, max_norm, "segclip::multi_tensor_norm_coef");
}

// What the scale does with each tensor, decided (and every refusal made) before anything is queued.
struct ScalePlan {
  std::vector<TensorPiece> pieces;  // the fused pass
  std::vector<StridedView> gappy;   // one strided launch each, see note: [CUDA non-dense tensors]
  std::vector<at::Tensor> out_of_place;
  bool shared = false;              // pieces share memory: one launch per tensor, in list order
};

ScalePlan plan_scale(at::TensorList tensors, const char* op) {
  ScalePlan plan;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // of pieces; see note: [tensors that share memory]
  plan.pieces.reserve(tensors.size());
  ranges.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {  // every check before anything is written
    const at::Tensor& t = tensors[i];
    const DType dtype = *to_dtype(t.scalar_type());
    check_scalable(t, i, op);
    if (t.numel() == 0) continue;
    if (is_flat(t)) {
      plan.pieces.push_back({t.mutable_data_ptr(), t.numel(), dtype});
      ranges.push_back(byte_range(t));
      continue;
    }
    StridedView v;
    if (make_strided_view(t.mutable_data_ptr(), dtype, t.sizes().data(), t.strides().data(),
                          static_cast<int>(t.dim()), &v)) {
      plan.gappy.push_back(v);
    } else {
      plan.out_of_place.push_back(t);
    }
  }
  plan.shared = any_ranges_intersect(std::move(ranges));
  return plan;
}

// Queues the scale by the device value `c` (a 0-dim tensor of a dtype to_dtype takes, its bytes its
// value, aligned). Reads c on the device; writes nothing when c >= 1, see note: [scale: nothing to clip].
void queue_scale(const ScalePlan& plan, const at::Tensor& c, cudaStream_t stream) {
  const DType cdtype = *to_dtype(c.scalar_type());
  if (plan.shared) {  // one launch per tensor: the stream orders them
    for (const TensorPiece& piece : plan.pieces) launch_multi_tensor_scale({piece}, c.const_data_ptr(), cdtype, stream);
  } else {
    launch_multi_tensor_scale(plan.pieces, c.const_data_ptr(), cdtype, stream);
  }
  for (const StridedView& v : plan.gappy) launch_strided_scale(v, c.const_data_ptr(), cdtype, stream);
  if (!plan.out_of_place.empty()) {  // see note: [CUDA non-dense tensors]
    const at::Tensor at_most_one = at::clamp_max(c, 1.0);
    for (const at::Tensor& t : plan.out_of_place) scale_out_of_place(t, at_most_one);
  }
}

void multi_tensor_scale_cuda(at::TensorList tensors, const at::Tensor& coef) {
  const char* op = "segclip::multi_tensor_scale_";
  TORCH_CHECK(coef.defined() && coef.dim() == 0, op, ": coef must be a 0-dim tensor, got shape ",
              coef.defined() ? coef.sizes() : at::IntArrayRef{});
  TORCH_CHECK(at::isFloatingType(coef.scalar_type()), op, ": coef must be floating point, got ",
              coef.scalar_type());
  TORCH_CHECK(coef.layout() == at::kStrided, op, ": coef has layout ", coef.layout(), "; expected strided");
  TORCH_CHECK(coef.is_cuda(), op, ": coef is on ", coef.device(), "; expected it on the tensors' CUDA device");
  const at::Device device = check_tensors(tensors, op, coef.device());
  if (tensors.empty()) return;
  c10::cuda::CUDAGuard guard(device);

  // The kernel reads coef's bytes. A coefficient whose value is not its bytes (a negative view; a
  // zero tensor without storage: both resolved by the dispatcher before a normal call gets here),
  // that no GPU load can read (not aligned to its element size) or of a dtype the kernel does not
  // read (float8) is first copied, on the device: no synchronisation.
  const std::optional<DType> coef_dtype = to_dtype(coef.scalar_type());
  const bool coef_aligned = reinterpret_cast<uintptr_t>(coef.const_data_ptr()) % coef.element_size() == 0;
  const at::Tensor c = coef_dtype.has_value() && coef_aligned && !coef.is_neg() && !coef._is_zerotensor()
                           ? coef
                           : coef.to(coef_dtype.has_value() ? coef.scalar_type() : at::kFloat, /*non_blocking=*/false,
                                     /*copy=*/true);
  const ScalePlan plan = plan_scale(tensors, op);
  queue_scale(plan, c, c10::cuda::getCurrentCUDAStream(device.index()));
}

// NOTE: [selecting the persistent clip]
// SEGCLIP_CUDA_PERSISTENT=1 in the environment (read once, at the first clip) makes
// multi_tensor_clip_ (hence segclip.fused_clip_) use the single-launch persistent clip (see note:
// [persistent clip] in multi_tensor_kernels.cu) for every list it can take: all tensors flat (dense),
// no memory shared between entries, one table's worth (kMaxTensors tensors, kMaxBlocks chunks), and
// at most the device's L2 size in bytes. Any other list takes the default path, with a one-time
// warning saying why. Off by default until a GPU run shows it correct and faster.
bool persistent_requested() {
  static const bool on = [] {
    const char* v = std::getenv("SEGCLIP_CUDA_PERSISTENT");
    return v != nullptr && std::string(v) == "1";
  }();
  return on;
}

// Why the persistent clip cannot take this list (nullptr: it can).
const char* persistent_refusal(const ScalePlan& scale, const NormPlan& norm, int device) {
  if (!scale.gappy.empty() || !scale.out_of_place.empty() || !norm.packed.empty()) return "a tensor is not dense";
  if (scale.shared) return "two entries share memory";
  if (norm.pieces.empty()) return "no element";
  if (norm.pieces.size() > static_cast<size_t>(kMaxTensors) || count_blocks(norm.pieces) > kMaxBlocks) {
    return "the list does not fit one launch table";
  }
  int l2 = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device));
  int64_t bytes = 0;
  for (const TensorPiece& p : norm.pieces) bytes += p.numel * elem_size(p.dtype);
  if (bytes > l2) return "the list is larger than the L2 cache";
  return nullptr;
}

// The whole clip from one call, see note: [op contract]: the list is checked once (the scale's
// refusals too) before anything is queued; then the memset, the norm launches (the last block writes
// norm and coefficient) and the scale launches, which read the coefficient on the device.
std::tuple<at::Tensor, at::Tensor> multi_tensor_clip_cuda(at::TensorList tensors, double norm_type, double max_norm) {
  const char* op = "segclip::multi_tensor_clip_";
  TORCH_CHECK(!tensors.empty(), op, ": expected a non-empty list of tensors");
  const NormKind kind = norm_kind(norm_type);
  const at::Device device = check_tensors(tensors, op);
  c10::cuda::CUDAGuard guard(device);
  const ScalePlan scale = plan_scale(tensors, op);
  const NormPlan norm_plan = plan_norm(tensors);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  if (persistent_requested()) {  // see note: [selecting the persistent clip]
    const char* why_not = persistent_refusal(scale, norm_plan, device.index());
    if (why_not == nullptr) {
      const auto out_options = tensors[0].options().device(device).dtype(norm_plan.out_double ? at::kDouble : at::kFloat);
      at::Tensor norm = at::empty({}, out_options);
      at::Tensor coef = at::empty({}, out_options);
      const int grid = persistent_grid(norm_plan.pieces, device.index());
      at::Tensor scratch = at::empty({norm_scratch_bytes(grid)}, out_options.dtype(at::kByte));
      launch_persistent_clip(kind, norm_plan.pieces, grid, scratch.mutable_data_ptr(), norm.mutable_data_ptr(),
                             coef.mutable_data_ptr(), max_norm, norm_plan.out_double, stream);
      return {norm, coef};
    }
    TORCH_WARN_ONCE("segclip: SEGCLIP_CUDA_PERSISTENT=1, but a list took the default clip: ", why_not);
  }
  auto out = queue_norm(norm_plan, tensors[0].options().device(device), kind, max_norm, stream);
  queue_scale(scale, std::get<1>(out), stream);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CUDA, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cuda);
  m.impl("multi_tensor_norm_coef", &multi_tensor_norm_coef_cuda);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_cuda);
  m.impl("multi_tensor_clip_", &multi_tensor_clip_cuda);
}

}  // namespace cuda
}  // namespace segclip
