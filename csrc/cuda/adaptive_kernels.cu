// CUDA kernels of segclip::multi_tensor_adaptive_clip_ (contract: csrc/segclip.cpp, see note: [op
// contract]); the work split: adaptive_apply.cuh, see note: [adaptive clip on CUDA]; the ATen side:
// adaptive_cuda.cpp. Each kernel switches on the element type at run time (uniform per block).
#include "adaptive_kernels.h"
#include "block_reduce.cuh"
#include "multi_tensor_math.cuh"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace segclip {
namespace cuda {
namespace {

struct AdaptiveParams {
  double clip_factor;
  double eps;
  double* w_parts;   // split rows: per block, the segment's partial of the weight
  double* g_parts;   // ... and of the gradient
  bool* wrote;       // flags (see PairPiece::wrote), or null
  int64_t first_block;  // this launch's first block over all launches of the sequence
};
static_assert(sizeof(AdaptiveParams) <= kMaxExtraParamBytes, "see kMaxExtraParamBytes");

// The unit's coefficient from its two partials (sums of |x|^p, or max |x|): the norms (the root in
// double, then rounded to the op-math type, as the CPU kernel), then unit_coefficient.
template <NormKind K, typename A>
__device__ __forceinline__ bool unit_coef(double w_part, double g_part, const AdaptiveParams& p, A* coef) {
  const A wn = static_cast<A>(K == NormKind::kL2 ? sqrt(w_part) : w_part);
  const A gn = static_cast<A>(K == NormKind::kL2 ? sqrt(g_part) : g_part);
  return unit_coefficient<A>(wn, gn, p.clip_factor, p.eps, coef);
}

__device__ __forceinline__ void mark_written(const AdaptiveParams& p, const PairListMeta& meta, int entry) {
  if (p.wrote != nullptr && meta.wrote[entry] >= 0) p.wrote[meta.wrote[entry]] = true;  // same value from every writer
}

// Warp rows: warp w of the block takes rows row_begin + w, + kWarps, ...; lanes stride over the row.
template <NormKind K, typename Tr>
__device__ __forceinline__ void warp_rows(const PairListMeta& meta, const PairWork& work, const AdaptiveParams& p) {
  using S = typename Tr::storage;
  using A = typename Tr::acc;
  const int64_t len = meta.len[work.entry];
  const S* w = static_cast<const S*>(meta.w[work.entry]);
  S* g = static_cast<S*>(meta.g[work.entry]);
  const int lane = threadIdx.x % kWarpSize;
  bool wrote = false;
  for (int64_t r = work.row_begin + threadIdx.x / kWarpSize; r < work.row_end; r += kWarps) {  // uniform per warp
    const S* wr = w + r * len;
    S* gr = g + r * len;
    A wa = A(0), ga = A(0);
    for (int64_t i = lane; i < len; i += kWarpSize) {
      wa = accumulate<K>(wa, Tr::load(wr[i]));
      ga = accumulate<K>(ga, Tr::load(gr[i]));
    }
    const double w_part = warp_allreduce<K>(static_cast<double>(wa));
    const double g_part = warp_allreduce<K>(static_cast<double>(ga));
    A c;
    if (!unit_coef<K, A>(w_part, g_part, p, &c)) continue;
    for (int64_t i = lane; i < len; i += kWarpSize) scale_element<Tr>(gr + i, c);
    wrote = true;
  }
  if (wrote && lane == 0) mark_written(p, meta, work.entry);
}

// Block row: the whole block on one row (or one segment of a split row: partials_only).
template <NormKind K, typename Tr>
__device__ __forceinline__ void block_row(const PairListMeta& meta, const PairWork& work, const AdaptiveParams& p,
                                          bool partials_only, int64_t slot) {
  using S = typename Tr::storage;
  using A = typename Tr::acc;
  const int64_t len = meta.len[work.entry];
  const int64_t begin = work.seg * kChunkElems;
  const int n = static_cast<int>(len - begin < kChunkElems ? len - begin : kChunkElems);
  const S* wr = static_cast<const S*>(meta.w[work.entry]) + work.row_begin * len + begin;
  S* gr = static_cast<S*>(meta.g[work.entry]) + work.row_begin * len + begin;
  const double w_part = block_reduce<K>(static_cast<double>(thread_partial<K, Tr>(wr, n, threadIdx.x)));
  __syncthreads();  // between the two block_reduce calls (shared memory)
  const double g_part = block_reduce<K>(static_cast<double>(thread_partial<K, Tr>(gr, n, threadIdx.x)));
  __shared__ A coef;
  __shared__ bool clip;
  if (threadIdx.x == 0) {
    if (partials_only) {
      p.w_parts[slot] = w_part;
      p.g_parts[slot] = g_part;
    } else {
      clip = unit_coef<K, A>(w_part, g_part, p, &coef);
      if (clip) mark_written(p, meta, work.entry);
    }
  }
  if (partials_only) return;
  __syncthreads();
  if (clip) scale_chunk<Tr>(gr, n, coef, threadIdx.x);
}

// Warp and block rows of one launch: each block finishes its units (norms, then the scale).
template <NormKind K, typename Tr>
__device__ __forceinline__ void rows_dispatch(const PairListMeta& meta, const AdaptiveParams& p) {
  const PairWork work = pair_work(meta, blockIdx.x);
  if (unit_mode(meta.len[work.entry]) == UnitMode::kWarpRows) {
    warp_rows<K, Tr>(meta, work, p);
  } else {
    block_row<K, Tr>(meta, work, p, false, 0);
  }
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads) adaptive_rows_kernel(const PairListMeta meta, const AdaptiveParams p) {
  switch (meta.dtype[meta.block_pair[blockIdx.x]]) {  // uniform across the block
    case DType::kHalf: rows_dispatch<K, HalfT>(meta, p); return;
    case DType::kBFloat16: rows_dispatch<K, BFloat16T>(meta, p); return;
    case DType::kFloat: rows_dispatch<K, FloatT>(meta, p); return;
    case DType::kDouble: rows_dispatch<K, DoubleT>(meta, p); return;
  }
}

// Split rows, first kernel: the segment's two partials to slot first_block + blockIdx.x.
template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads) adaptive_split_partials_kernel(const PairListMeta meta,
                                                                               const AdaptiveParams p) {
  const PairWork work = pair_work(meta, blockIdx.x);
  const int64_t slot = p.first_block + blockIdx.x;
  switch (meta.dtype[work.entry]) {
    case DType::kHalf: block_row<K, HalfT>(meta, work, p, true, slot); return;
    case DType::kBFloat16: block_row<K, BFloat16T>(meta, work, p, true, slot); return;
    case DType::kFloat: block_row<K, FloatT>(meta, work, p, true, slot); return;
    case DType::kDouble: block_row<K, DoubleT>(meta, work, p, true, slot); return;
  }
}

// Split rows, second kernel: warp 0 combines the unit's slots (the unit's segments are consecutive
// blocks: slots slot - seg .. slot - seg + segs - 1), in the same order in every block of the unit;
// then the block scales its segment when the unit clips.
template <NormKind K, typename Tr>
__device__ __forceinline__ void split_scale(const PairListMeta& meta, const PairWork& work, const AdaptiveParams& p) {
  using S = typename Tr::storage;
  using A = typename Tr::acc;
  __shared__ A coef;
  __shared__ bool clip;
  const int64_t len = meta.len[work.entry];
  if (threadIdx.x < kWarpSize) {
    const int64_t first = p.first_block + blockIdx.x - work.seg;
    const int64_t segs = segments_per_row(len);
    double w_part = 0.0, g_part = 0.0;
    for (int64_t s = threadIdx.x; s < segs; s += kWarpSize) {
      w_part = combine<K>(w_part, p.w_parts[first + s]);
      g_part = combine<K>(g_part, p.g_parts[first + s]);
    }
    w_part = warp_allreduce<K>(w_part);
    g_part = warp_allreduce<K>(g_part);
    if (threadIdx.x == 0) {
      A c = A(1);
      clip = unit_coef<K, A>(w_part, g_part, p, &c);
      coef = c;
      if (clip) mark_written(p, meta, work.entry);
    }
  }
  __syncthreads();
  if (!clip) return;
  const int64_t begin = work.seg * kChunkElems;
  const int n = static_cast<int>(len - begin < kChunkElems ? len - begin : kChunkElems);
  scale_chunk<Tr>(static_cast<S*>(meta.g[work.entry]) + work.row_begin * len + begin, n, coef, threadIdx.x);
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads) adaptive_split_scale_kernel(const PairListMeta meta,
                                                                            const AdaptiveParams p) {
  const PairWork work = pair_work(meta, blockIdx.x);
  switch (meta.dtype[work.entry]) {
    case DType::kHalf: split_scale<K, HalfT>(meta, work, p); return;
    case DType::kBFloat16: split_scale<K, BFloat16T>(meta, work, p); return;
    case DType::kFloat: split_scale<K, FloatT>(meta, work, p); return;
    case DType::kDouble: split_scale<K, DoubleT>(meta, work, p); return;
  }
}

template <NormKind K>
void launch_all(const std::vector<PairPiece>& rows, const std::vector<PairPiece>& split, AdaptiveParams p,
                cudaStream_t stream) {
  pair_apply(rows, [&](const PairListMeta& meta, int n_blocks, int64_t first_block) {
    p.first_block = first_block;
    adaptive_rows_kernel<K><<<n_blocks, kBlockThreads, 0, stream>>>(meta, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  // All partials first, then all scales: a unit cut across two launches has all its slots written
  // before any of its segments is scaled (stream order).
  pair_apply(split, [&](const PairListMeta& meta, int n_blocks, int64_t first_block) {
    p.first_block = first_block;
    adaptive_split_partials_kernel<K><<<n_blocks, kBlockThreads, 0, stream>>>(meta, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  pair_apply(split, [&](const PairListMeta& meta, int n_blocks, int64_t first_block) {
    p.first_block = first_block;
    adaptive_split_scale_kernel<K><<<n_blocks, kBlockThreads, 0, stream>>>(meta, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void split_by_mode(const std::vector<PairPiece>& pairs, std::vector<PairPiece>* rows, std::vector<PairPiece>* split) {
  for (const PairPiece& pr : pairs) {
    (unit_mode(pr.len) == UnitMode::kSplitRow ? split : rows)->push_back(pr);
  }
}

}  // namespace

int64_t adaptive_scratch_bytes(const std::vector<PairPiece>& pairs) {
  int64_t blocks = 0;
  for (const PairPiece& pr : pairs) {
    if (unit_mode(pr.len) == UnitMode::kSplitRow) blocks += pair_blocks(pr);
  }
  return blocks * 2 * static_cast<int64_t>(sizeof(double));
}

void launch_adaptive_clip(NormKind kind, const std::vector<PairPiece>& pairs, double clip_factor, double eps,
                          void* scratch, bool* wrote_flags, cudaStream_t stream) {
  std::vector<PairPiece> rows, split;
  split_by_mode(pairs, &rows, &split);
  int64_t split_blocks = 0;
  for (const PairPiece& pr : split) split_blocks += pair_blocks(pr);
  TORCH_CHECK(split_blocks == 0 || scratch != nullptr, "segclip: adaptive clip scratch missing");
  AdaptiveParams p{};
  p.clip_factor = clip_factor;
  p.eps = eps;
  p.w_parts = static_cast<double*>(scratch);
  p.g_parts = split_blocks == 0 ? nullptr : static_cast<double*>(scratch) + split_blocks;
  p.wrote = wrote_flags;
  switch (kind) {
    case NormKind::kL1: launch_all<NormKind::kL1>(rows, split, p, stream); break;
    case NormKind::kL2: launch_all<NormKind::kL2>(rows, split, p, stream); break;
    case NormKind::kLinf: launch_all<NormKind::kLinf>(rows, split, p, stream); break;
  }
}

}  // namespace cuda
}  // namespace segclip
