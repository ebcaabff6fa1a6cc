// CUDA kernel of segclip::multi_tensor_clip_value_ (contract: csrc/segclip.cpp, see note: [op
// contract]); its ATen side: value_cuda.cpp. One launch per full table of the multi-tensor apply
// (see note: [CUDA chunking and launches]); one block per chunk.
#include "multi_tensor_math.cuh"  // element traits
#include "value_kernels.h"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

namespace segclip {
namespace cuda {
namespace {

static_assert(sizeof(ValueBounds) <= kMaxExtraParamBytes, "see kMaxExtraParamBytes");

// x = clamp(x, -h, h), stored only when it changes; NaN compares false and is never written.
template <typename Tr>
__device__ __forceinline__ bool clamp_element(typename Tr::storage& x, typename Tr::acc h) {
  const typename Tr::acc v = Tr::load(x);
  if (v > h) {
    x = Tr::store(h);
    return true;
  }
  if (v < -h) {
    x = Tr::store(-h);
    return true;
  }
  return false;
}

// Thread `tid`'s share of one chunk: the scalar head and tail, and the 16-byte vectors between,
// each vector stored back only when one of its elements was beyond the bound. The element ->
// thread mapping is the one of for_thread_elements (multi_tensor_math.cuh), without its
// unconditional store.
template <typename Tr>
__device__ __forceinline__ void clamp_chunk(void* ptr, int len, typename Tr::acc h, int tid) {
  using S = typename Tr::storage;
  using P = Pack<S>;
  S* p = static_cast<S*>(ptr);
  const VecSplit split(p, static_cast<int>(sizeof(S)), len);
  if (tid < split.head) clamp_element<Tr>(p[tid], h);
  P* vp = reinterpret_cast<P*>(p + split.head);
  for (int i = tid; i < split.nvec; i += kBlockThreads) {
    P v = vp[i];
    bool changed = false;
#pragma unroll
    for (int e = 0; e < P::kSize; ++e) changed |= clamp_element<Tr>(v.v[e], h);
    if (changed) vp[i] = v;
  }
  if (split.tail + tid < len) clamp_element<Tr>(p[split.tail + tid], h);
}

__global__ void __launch_bounds__(kBlockThreads) clip_value_kernel(const TensorListMeta meta, const ValueBounds b) {
  const BlockChunk ch = block_chunk(meta, blockIdx.x);
  switch (ch.dtype) {  // uniform across the block
    case DType::kHalf: clamp_chunk<HalfT>(ch.ptr, ch.len, b.half, threadIdx.x); return;
    case DType::kBFloat16: clamp_chunk<BFloat16T>(ch.ptr, ch.len, b.bfloat16, threadIdx.x); return;
    case DType::kFloat: clamp_chunk<FloatT>(ch.ptr, ch.len, b.single, threadIdx.x); return;
    case DType::kDouble: clamp_chunk<DoubleT>(ch.ptr, ch.len, b.dbl, threadIdx.x); return;
  }
}

}  // namespace

void launch_multi_tensor_clip_value(const std::vector<TensorPiece>& pieces, const ValueBounds& bounds,
                                    cudaStream_t stream) {
  multi_tensor_apply(pieces, [&](const TensorListMeta& meta, int n_blocks, int64_t /*first_block*/) {
    clip_value_kernel<<<n_blocks, kBlockThreads, 0, stream>>>(meta, bounds);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace cuda
}  // namespace segclip
