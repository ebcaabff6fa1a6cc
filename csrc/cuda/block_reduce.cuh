// Block- and warp-level reductions of the CUDA kernels (device code, nvcc): the norm's
// (multi_tensor_kernels.cu), the per-group partials' and the adaptive clip's (adaptive_kernels.cu).
// Fixed shuffle trees: the same inputs give the same bits on every call, see note: [CUDA determinism].
#pragma once

#include "multi_tensor_math.cuh"  // combine, kBlockThreads

namespace segclip {
namespace cuda {

constexpr int kWarpSize = 32;
constexpr int kWarps = kBlockThreads / kWarpSize;
static_assert(kBlockThreads % kWarpSize == 0 && kWarps <= kWarpSize, "block_reduce's second stage is one warp");

// Combines one value per lane of a warp; every lane gets the result (xor tree: all 32 lanes must call).
template <NormKind K, typename T>
__device__ __forceinline__ T warp_allreduce(T v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = combine<K>(v, __shfl_xor_sync(0xffffffffu, v, offset));
  }
  return v;
}

// Combines one value per thread; the result is valid in thread 0 only. Every thread of the block
// must call it (it synchronises). Two calls with the same T need a __syncthreads() between them.
template <NormKind K, typename T>
__device__ __forceinline__ T block_reduce(T v) {
  __shared__ T warp_vals[kWarps];
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
  }
  if (lane == 0) warp_vals[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kWarps ? warp_vals[lane] : T(0);  // 0 is the identity: all terms are >= 0 or NaN
#pragma unroll
    for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
      v = combine<K>(v, __shfl_down_sync(0xffffffffu, v, offset));
    }
  }
  return v;
}

}  // namespace cuda
}  // namespace segclip
