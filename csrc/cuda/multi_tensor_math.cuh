// What one thread does with its share of a chunk: the norm's accumulation and the scale. Host and
// device code (needs nvcc): the kernels call these with threadIdx.x, and csrc/cuda/test/ calls them
// on the host for every thread index to check that each element is read/written exactly once.
// No synchronisation or shuffles in here; the block-level parts are in multi_tensor_kernels.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "../clip_coefficient.h"
#include "multi_tensor_apply.cuh"
#include "multi_tensor_kernels.h"  // NormKind

namespace segclip {
namespace cuda {

// Element traits: storage type, the op-math type arithmetic happens in, and the conversions (round
// to nearest even). Half and bfloat16 are handled as raw 16-bit words (no c10 types in device code).
struct HalfT {
  using storage = uint16_t;
  using acc = float;
  static SEGCLIP_HOST_DEVICE float load(uint16_t u) { return __half2float(__ushort_as_half(u)); }
  static SEGCLIP_HOST_DEVICE uint16_t store(float f) { return __half_as_ushort(__float2half_rn(f)); }
};
struct BFloat16T {
  using storage = uint16_t;
  using acc = float;
  static SEGCLIP_HOST_DEVICE float load(uint16_t u) { return __bfloat162float(__ushort_as_bfloat16(u)); }
  static SEGCLIP_HOST_DEVICE uint16_t store(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }
};
struct FloatT {
  using storage = float;
  using acc = float;
  static SEGCLIP_HOST_DEVICE float load(float x) { return x; }
  static SEGCLIP_HOST_DEVICE float store(float x) { return x; }
};
struct DoubleT {
  using storage = double;
  using acc = double;
  static SEGCLIP_HOST_DEVICE double load(double x) { return x; }
  static SEGCLIP_HOST_DEVICE double store(double x) { return x; }
};

// Combines two partial results: sums for the 1- and 2-norm, a NaN-propagating max for the inf-norm
// (fmax would drop a NaN; torch's inf-norm of a tensor holding NaN is NaN).
template <NormKind K, typename T>
SEGCLIP_HOST_DEVICE T combine(T a, T b) {
  if constexpr (K == NormKind::kLinf) {
    return (b > a || b != b) ? b : a;
  } else {
    return a + b;
  }
}

// acc + |x|^p (p = 1, 2), or max(acc, |x|) for the inf-norm.
template <NormKind K, typename T>
SEGCLIP_HOST_DEVICE T accumulate(T acc, T x) {
  if constexpr (K == NormKind::kL2) {
    return fma(x, x, acc);
  } else {
    const T a = fabs(x);
    return K == NormKind::kL1 ? acc + a : combine<K>(acc, a);
  }
}

// Thread `tid`'s share of a chunk's partial (a block of kBlockThreads threads), accumulated in the
// op-math type (float for half/bfloat16/float, double for double) in kILP independent accumulators,
// one per 16-byte load in flight. Element i of the chunk goes to one thread only: the head (before
// the first 16-byte boundary) and the tail element by element, the vectors in rounds of kILP
// coalesced loads per thread. See VecSplit.
template <NormKind K, typename Tr>
SEGCLIP_HOST_DEVICE typename Tr::acc thread_partial(const void* ptr, int len, int tid) {
  static_assert(kILP == 4, "the accumulators are combined as a fixed pair of pairs");
  using S = typename Tr::storage;
  using A = typename Tr::acc;
  using P = Pack<S>;
  const S* p = static_cast<const S*>(ptr);
  const VecSplit split(p, static_cast<int>(sizeof(S)), len);
  A acc[kILP];
SEGCLIP_UNROLL
  for (int k = 0; k < kILP; ++k) acc[k] = A(0);

  if (tid < split.head) acc[0] = accumulate<K>(acc[0], Tr::load(p[tid]));
  const P* vp = reinterpret_cast<const P*>(p + split.head);
  int i = tid;
  for (; i + (kILP - 1) * kBlockThreads < split.nvec; i += kILP * kBlockThreads) {  // full rounds
    P v[kILP];
SEGCLIP_UNROLL
    for (int k = 0; k < kILP; ++k) v[k] = vp[i + k * kBlockThreads];
SEGCLIP_UNROLL
    for (int k = 0; k < kILP; ++k) {
SEGCLIP_UNROLL
      for (int e = 0; e < P::kSize; ++e) acc[k] = accumulate<K>(acc[k], Tr::load(v[k].v[e]));
    }
  }
SEGCLIP_UNROLL
  for (int k = 0; k < kILP; ++k) {  // the last, partial round
    const int j = i + k * kBlockThreads;
    if (j < split.nvec) {
      const P v = vp[j];
SEGCLIP_UNROLL
      for (int e = 0; e < P::kSize; ++e) acc[k] = accumulate<K>(acc[k], Tr::load(v.v[e]));
    }
  }
  if (split.tail + tid < len) acc[1] = accumulate<K>(acc[1], Tr::load(p[split.tail + tid]));
  return combine<K>(combine<K>(acc[0], acc[1]), combine<K>(acc[2], acc[3]));
}

// x = round(x * c) for one element: the product in the op-math type, rounded once to the storage type.
template <typename Tr>
SEGCLIP_HOST_DEVICE void scale_element(typename Tr::storage* p, typename Tr::acc c) {
  *p = Tr::store(Tr::load(*p) * c);
}

// Thread `tid`'s share of x = round(x * c) over a chunk: the product in the op-math type A, rounded
// once to the storage type. Same element-to-thread mapping as thread_partial.
template <typename Tr>
SEGCLIP_HOST_DEVICE void scale_chunk(void* ptr, int len, typename Tr::acc c, int tid) {
  using S = typename Tr::storage;
  using P = Pack<S>;
  S* p = static_cast<S*>(ptr);
  const VecSplit split(p, static_cast<int>(sizeof(S)), len);
  if (tid < split.head) scale_element<Tr>(p + tid, c);
  P* vp = reinterpret_cast<P*>(p + split.head);
  int i = tid;
  for (; i + (kILP - 1) * kBlockThreads < split.nvec; i += kILP * kBlockThreads) {
    P v[kILP];
SEGCLIP_UNROLL
    for (int k = 0; k < kILP; ++k) v[k] = vp[i + k * kBlockThreads];
SEGCLIP_UNROLL
    for (int k = 0; k < kILP; ++k) {
SEGCLIP_UNROLL
      for (int e = 0; e < P::kSize; ++e) v[k].v[e] = Tr::store(Tr::load(v[k].v[e]) * c);
      vp[i + k * kBlockThreads] = v[k];
    }
  }
SEGCLIP_UNROLL
  for (int k = 0; k < kILP; ++k) {
    const int j = i + k * kBlockThreads;
    if (j < split.nvec) {
      P v = vp[j];
SEGCLIP_UNROLL
      for (int e = 0; e < P::kSize; ++e) v.v[e] = Tr::store(Tr::load(v.v[e]) * c);
      vp[j] = v;
    }
  }
  if (split.tail + tid < len) scale_element<Tr>(p + split.tail + tid, c);
}

}  // namespace cuda
}  // namespace segclip
