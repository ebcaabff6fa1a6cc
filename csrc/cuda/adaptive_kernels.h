// The interface between adaptive_cuda.cpp (ATen side, host compiler) and adaptive_kernels.cu (nvcc)
// for the unit-wise adaptive clip (segclip::multi_tensor_adaptive_clip_). Plain C++.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "adaptive_apply.cuh"
#include "multi_tensor_kernels.h"  // NormKind

namespace segclip {
namespace cuda {

// Device scratch launch_adaptive_clip needs for these pairs: two doubles per block of the split rows
// (see note: [adaptive clip on CUDA]); 0 when no unit is longer than a chunk.
int64_t adaptive_scratch_bytes(const std::vector<PairPiece>& pairs);

// Queues the adaptive clip of every pair on `stream`: per unit, the norms of weight and gradient, and
// the gradient scaled by clip_factor * max(||w||, eps) / max(||g||, 1e-6) unless ||g|| is below the
// bound. A pair with wrote >= 0 sets wrote_flags[wrote] (a bool) when one of its units is scaled.
// scratch: adaptive_scratch_bytes(pairs) bytes of device memory, 16-byte aligned, used by this call
// only (null when 0). The pairs' gradients must not share memory. Never synchronises with the host.
void launch_adaptive_clip(NormKind kind, const std::vector<PairPiece>& pairs, double clip_factor, double eps,
                          void* scratch, bool* wrote_flags, cudaStream_t stream);

}  // namespace cuda
}  // namespace segclip
