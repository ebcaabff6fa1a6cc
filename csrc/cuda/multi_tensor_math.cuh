// What one thread does with its share of a chunk: the norm's accumulation and the scale. Host and
// device code (needs nvcc): the kernels call these with threadIdx.x, and csrc/cuda/test/ calls them
// on the host for every thread index to check that each element is read/written exactly once.
// No synchronisation or shuffles in here; the block-level parts are in multi_tensor_kernels.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

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

// Thread `tid`'s share of a chunk (a block of kBlockThreads threads): element i of the chunk goes to
// one thread only. The head (before the first 16-byte boundary) and the tail go element by element:
// scalar(k, x) with k = 0 for the head, 1 for the tail. The 16-byte vectors go in rounds of kILP
// coalesced loads per thread, all issued before any is used (kILP loads in flight): vector(k, v)
// for the k-th load of a round. With a non-const S the vectors are stored back after vector(k, v),
// so both callbacks may modify the elements. thread_partial and scale_chunk share this mapping.
template <typename S, typename Scalar, typename Vector>
SEGCLIP_HOST_DEVICE void for_thread_elements(S* p, int len, int tid, Scalar&& scalar, Vector&& vector) {
  using P = Pack<std::remove_const_t<S>>;
  using PP = std::conditional_t<std::is_const_v<S>, const P, P>;
  constexpr bool kStore = !std::is_const_v<S>;
  const VecSplit split(p, static_cast<int>(sizeof(S)), len);
  if (tid < split.head) scalar(0, p[tid]);
  PP* vp = reinterpret_cast<PP*>(p + split.head);
  int i = tid;
  for (; i + (kILP - 1) * kBlockThreads < split.nvec; i += kILP * kBlockThreads) {  // full rounds
    P v[kILP];
SEGCLIP_UNROLL
    for (int k = 0; k < kILP; ++k) v[k] = vp[i + k * kBlockThreads];
SEGCLIP_UNROLL
    for (int k = 0; k < kILP; ++k) {
      vector(k, v[k]);
      if constexpr (kStore) vp[i + k * kBlockThreads] = v[k];
    }
  }
SEGCLIP_UNROLL
  for (int k = 0; k < kILP; ++k) {  // the last, partial round
    const int j = i + k * kBlockThreads;
    if (j < split.nvec) {
      P v = vp[j];
      vector(k, v);
      if constexpr (kStore) vp[j] = v;
    }
  }
  if (split.tail + tid < len) scalar(1, p[split.tail + tid]);
}

// Thread `tid`'s share of a chunk's partial, accumulated in the op-math type (float for half/
// bfloat16/float, double for double) in kILP independent accumulators, one per load in flight.
template <NormKind K, typename Tr>
SEGCLIP_HOST_DEVICE typename Tr::acc thread_partial(const void* ptr, int len, int tid) {
  static_assert(kILP == 4, "the accumulators are combined as a fixed pair of pairs");
  using S = typename Tr::storage;
  using A = typename Tr::acc;
  A acc[kILP];
SEGCLIP_UNROLL
  for (int k = 0; k < kILP; ++k) acc[k] = A(0);
  for_thread_elements(
      static_cast<const S*>(ptr), len, tid, [&](int k, const S& x) { acc[k] = accumulate<K>(acc[k], Tr::load(x)); },
      [&](int k, const Pack<S>& v) {
SEGCLIP_UNROLL
        for (int e = 0; e < Pack<S>::kSize; ++e) acc[k] = accumulate<K>(acc[k], Tr::load(v.v[e]));
      });
  return combine<K>(combine<K>(acc[0], acc[1]), combine<K>(acc[2], acc[3]));
}

// x = round(x * c) for one element: the product in the op-math type, rounded once to the storage type.
template <typename Tr>
SEGCLIP_HOST_DEVICE void scale_element(typename Tr::storage* p, typename Tr::acc c) {
  *p = Tr::store(Tr::load(*p) * c);
}

// Thread `tid`'s share of x = round(x * c) over a chunk: the product in the op-math type, rounded
// once to the storage type.
template <typename Tr>
SEGCLIP_HOST_DEVICE void scale_chunk(void* ptr, int len, typename Tr::acc c, int tid) {
  using S = typename Tr::storage;
  for_thread_elements(
      static_cast<S*>(ptr), len, tid, [&](int, S& x) { scale_element<Tr>(&x, c); },
      [&](int, Pack<S>& v) {
SEGCLIP_UNROLL
        for (int e = 0; e < Pack<S>::kSize; ++e) scale_element<Tr>(&v.v[e], c);
      });
}

}  // namespace cuda
}  // namespace segclip
