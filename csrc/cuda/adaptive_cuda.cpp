// segclip::multi_tensor_adaptive_clip_ on CUDA, ATen side: checks, packed copies, scratch, device guard
// and stream; the kernels: adaptive_kernels.cu (see note: [adaptive clip on CUDA] in
// adaptive_apply.cuh). Same semantics and refusals as csrc/cpu/adaptive_cpu.cpp (the op contract:
// csrc/segclip.cpp). Nothing here synchronises with the host: the op can be captured in a CUDA graph.
#define TORCH_ASSERT_ONLY_METHOD_OPERATORS
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/where.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <vector>

#include "../adaptive_checks.h"
#include "../inplace_checks.h"
#include "../shared_memory.h"
#include "adaptive_kernels.h"
#include "cuda_checks.h"

namespace segclip {
namespace cuda {
namespace {

NormKind adaptive_norm_kind(double norm_type) {  // norm_type passed check_adaptive_arguments
  if (norm_type == 2.0) return NormKind::kL2;
  return norm_type == 1.0 ? NormKind::kL1 : NormKind::kLinf;
}

// One pair as planned: the kernels' view, and for a gradient that is not contiguous the packed copy
// they work on and the gradient it is written back to.
struct Planned {
  PairPiece piece;
  at::Tensor w;     // contiguous: the weight or a packed copy (kept alive until queued)
  at::Tensor g;     // contiguous: the gradient or a packed copy
  at::Tensor orig;  // the gradient when g is a packed copy, else undefined
};

// Queues the clip of `pairs` (gradients that share no memory), then the write-back of the packed
// gradients among them, in list order, where a unit was scaled: as the CPU kernel, which copies a
// packed gradient back only when it wrote (here the flag is a device value, read by at::where).
void run(const std::vector<Planned>& pairs, NormKind kind, double clip_factor, double eps, const at::Tensor& flags,
         const at::TensorOptions& options, cudaStream_t stream) {
  std::vector<PairPiece> pieces;
  pieces.reserve(pairs.size());
  for (const Planned& p : pairs) pieces.push_back(p.piece);
  const int64_t scratch_bytes = adaptive_scratch_bytes(pieces);
  at::Tensor scratch;  // freed on return: the caching allocator orders its reuse after the kernels
  if (scratch_bytes > 0) scratch = at::empty({scratch_bytes}, options.dtype(at::kByte));
  launch_adaptive_clip(kind, pieces, clip_factor, eps, scratch_bytes > 0 ? scratch.mutable_data_ptr() : nullptr,
                       flags.defined() ? flags.mutable_data_ptr<bool>() : nullptr, stream);
  for (const Planned& p : pairs) {
    if (p.orig.defined()) p.orig.copy_(at::where(flags.select(0, p.piece.wrote), p.g, p.orig));
  }
}

void multi_tensor_adaptive_clip_cuda(at::TensorList weights, at::TensorList grads, double clip_factor, double eps,
                                     double norm_type) {
  const char* op = "segclip::multi_tensor_adaptive_clip_";
  check_adaptive_arguments(weights, grads, clip_factor, eps, norm_type, op);  // shared with the CPU kernel
  if (grads.empty()) return;
  const NormKind kind = adaptive_norm_kind(norm_type);
  const at::Device device = check_tensors(grads, op, std::nullopt, "grads");
  std::string grads_name = "grads";  // names the device in the weights' messages
  for (size_t i = 0; i < grads.size(); ++i) {
    if (grads[i].is_cuda()) {
      grads_name = "grads[" + std::to_string(i) + "]";
      break;
    }
  }
  check_tensors(weights, op, device, "weights", grads_name.c_str());
  int64_t n_packed = 0;
  for (size_t i = 0; i < grads.size(); ++i) {  // every check before anything is queued
    check_adaptive_pair(weights[i], grads[i], i, op);
    if (grads[i].numel() > 0 && !grads[i].is_contiguous()) ++n_packed;
  }
  TORCH_CHECK(n_packed <= std::numeric_limits<int16_t>::max(), op, ": more than 32767 non-contiguous gradients");
  c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index());
  const auto options = grads[0].options().device(device);
  // Packed copies first (queued before any kernel): every pair reads the gradients as they were.
  std::vector<Planned> pairs;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // see note: [tensors that share memory]
  int16_t next_flag = 0;
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    if (g.numel() == 0) continue;
    Planned p;
    p.w = weights[i].contiguous();
    if (g.is_contiguous()) {
      p.g = g;
      ranges.push_back(byte_range(g));
    } else {  // rows of the contiguous layout: a packed copy, written back if a unit clips
      p.orig = g;
      p.g = g.contiguous();
    }
    const int64_t rows = adaptive_rows(g);
    p.piece = {p.w.const_data_ptr(), p.g.mutable_data_ptr(), rows, g.numel() / rows, *to_dtype(g.scalar_type()),
               static_cast<int16_t>(p.orig.defined() ? next_flag++ : -1)};
    pairs.push_back(std::move(p));
  }
  const at::Tensor flags = next_flag > 0 ? at::zeros({next_flag}, options.dtype(at::kBool)) : at::Tensor();
  if (any_ranges_intersect(std::move(ranges))) {  // a gradient listed twice: one pair after another
    for (const Planned& p : pairs) run({p}, kind, clip_factor, eps, flags, options, stream);
  } else {
    run(pairs, kind, clip_factor, eps, flags, options, stream);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CUDA, m) { m.impl("multi_tensor_adaptive_clip_", &multi_tensor_adaptive_clip_cuda); }

}  // namespace cuda
}  // namespace segclip
