// The work split of the adaptive clip on CUDA (segclip::multi_tensor_adaptive_clip_): which block
// takes which units of which (weight, grad) pair, and the launch tables. Plain C++, host and device
// (no ATen): the kernels are in adaptive_kernels.cu, and csrc/cuda/test/multi_tensor_apply_test.cpp
// runs this planning on the host without a GPU.
#pragma once

#include <cstdint>
#include <type_traits>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace segclip {
namespace cuda {

// NOTE: [adaptive clip on CUDA]
// A unit is a row of a contiguous (weight, grad) pair: `rows` rows of `len` elements (rows = size(0)
// for two or more dimensions, else one row of numel), as in the CPU kernel (see note: [adaptive clip
// work split] in cpu/adaptive_cpu.cpp). How a unit is read depends only on its length:
//   * warp rows (len <= kWarpRowMaxElems: biases, depthwise and 1x1 convolutions, thousands of tiny
//     units): a block takes rows_per_block(len) consecutive rows, one warp per row; the warp takes
//     both norms (lane-strided, a fixed shuffle tree) and scales the row at once, while it is in L1;
//   * block rows (len <= kChunkElems): one block per row, both norms by the norm kernel's per-thread
//     code (thread_partial, vectorised, any alignment) and block_reduce, then the scale;
//   * split rows (len > kChunkElems: one huge unit, e.g. a 1-d parameter of millions of elements): a
//     row is cut into segments of kChunkElems, one block each. A first kernel writes each segment's
//     two partials to its slot (the block's number over all launches of the split pairs); a second
//     kernel, over the same blocks, combines the unit's slots (the same fixed order in every block, so
//     every segment gets the same coefficient, bitwise) and scales its segment. Stream order makes
//     the first kernel's slots visible to the second: no atomics, no counter.
// The warp and block rows of all pairs go in one launch sequence (one kernel, one read of each
// element), the split rows in another (two kernels: the unit's gradient is read twice). Each block's
// arithmetic is fixed by the sizes alone: the result is bitwise reproducible.
// Norms accumulate in the op-math type per thread (float; double for double) and are combined in
// double; the bound and the coefficient are computed in the op-math type, as the CPU kernel does.
constexpr int64_t kWarpRowMaxElems = 1024;
constexpr int64_t kMaxRowsPerBlock = 128;  // warp rows: 8 per warp at most, so that tiny rows spread over blocks

enum class UnitMode : uint8_t { kWarpRows = 0, kBlockRow = 1, kSplitRow = 2 };

SEGCLIP_HOST_DEVICE UnitMode unit_mode(int64_t len) {
  if (len <= kWarpRowMaxElems) return UnitMode::kWarpRows;
  return len <= kChunkElems ? UnitMode::kBlockRow : UnitMode::kSplitRow;
}

// Rows per block (warp rows), 1 otherwise.
SEGCLIP_HOST_DEVICE int64_t rows_per_block(int64_t len) {
  if (unit_mode(len) != UnitMode::kWarpRows) return 1;
  const int64_t r = kChunkElems / (len > 0 ? len : 1);
  return r < kMaxRowsPerBlock ? r : kMaxRowsPerBlock;
}

// Segments per row (split rows), 1 otherwise.
SEGCLIP_HOST_DEVICE int64_t segments_per_row(int64_t len) {
  return unit_mode(len) == UnitMode::kSplitRow ? (len + kChunkElems - 1) / kChunkElems : 1;
}

constexpr double kGradNormFloor = 1e-6;  // timm: grad_norm.clamp(min=1e-6)

// The unit's coefficient from its norms wn, gn (in the op-math type A), as the CPU kernel computes it
// (clip_rows in cpu/adaptive_cpu.cpp): false when gn < clip_factor * max(wn, eps) (nothing to write),
// else *coef = that bound / max(gn, 1e-6). NaN in either norm gives a NaN coefficient (NaN compares
// false, and max keeps its first argument as std::max does), so the unit becomes NaN, as in timm.
// Host and device: csrc/cuda/test/multi_tensor_apply_test.cpp checks it against the CPU's formula.
template <typename A>
SEGCLIP_HOST_DEVICE bool unit_coefficient(A wn, A gn, double clip_factor, double eps, A* coef) {
  const A e = static_cast<A>(eps);
  const A bound = (wn < e ? e : wn) * static_cast<A>(clip_factor);
  if (gn < bound) return false;
  const A floor = static_cast<A>(kGradNormFloor);
  *coef = bound / (gn < floor ? floor : gn);
  return true;
}

// One (weight, grad) pair as the kernels see it: both contiguous, same dtype, rows x len elements.
struct PairPiece {
  const void* w;
  void* g;
  int64_t rows;
  int64_t len;
  DType dtype;
  int16_t wrote;  // index of the flag set when a unit of this pair is scaled, or -1 (see adaptive_cuda.cpp)
};

inline int64_t pair_blocks(const PairPiece& p) {
  if (p.rows == 0 || p.len == 0) return 0;
  const int64_t rpb = rows_per_block(p.len);
  return (p.rows + rpb - 1) / rpb * segments_per_row(p.len);
}

// The launch table: as TensorListMeta (see note: [CUDA chunking and launches]), with two addresses
// and a shape per entry. A pair whose blocks do not all fit continues in the next launch: `skip` is the
// number of its blocks launched before, so a block finds its rows from the pair's own addresses.
// Per launch: 384 pairs and 6144 blocks in the 32 KiB layout (29,568 bytes), 40 pairs and 2048 blocks
// in the 4 KiB one (3,848 bytes).
constexpr int kMaxPairs = kKernelParamBytes >= 32768 ? 384 : 40;
constexpr int kMaxPairBlocks = kMaxBlocks;
using PairIndex = std::conditional_t<(kMaxPairs <= 256), uint8_t, uint16_t>;

struct PairListMeta {
  const void* w[kMaxPairs];
  void* g[kMaxPairs];
  int64_t rows[kMaxPairs];
  int64_t len[kMaxPairs];
  int64_t skip[kMaxPairs];            // blocks of the pair in earlier launches
  uint16_t first_block[kMaxPairs];    // block processing the entry's first block in this launch
  int16_t wrote[kMaxPairs];
  DType dtype[kMaxPairs];
  PairIndex block_pair[kMaxPairBlocks];  // block -> entry
};
static_assert(kMaxPairs - 1 <= std::numeric_limits<PairIndex>::max(), "block_pair holds every entry");
static_assert(kMaxPairBlocks <= 65535, "first_block holds a block index in 16 bits");
static_assert(sizeof(PairListMeta) + kMaxExtraParamBytes <= kKernelParamLimit, "kernel arguments exceed their space");

// What block `block` of a launch does: rows [row_begin, row_end) of entry `entry` (warp and block
// rows), or segment `seg` of row `row_begin` (split rows: elements [seg * kChunkElems, ...) of it).
struct PairWork {
  int entry;
  int64_t row_begin;
  int64_t row_end;
  int64_t seg;  // 0 unless split
};

SEGCLIP_HOST_DEVICE PairWork pair_work(const PairListMeta& meta, int64_t block) {
  PairWork w;
  w.entry = meta.block_pair[block];
  const int64_t k = block - meta.first_block[w.entry] + meta.skip[w.entry];  // the pair's block number
  const int64_t len = meta.len[w.entry];
  const int64_t segs = segments_per_row(len);
  const int64_t rpb = rows_per_block(len);
  const int64_t row_block = k / segs;
  w.seg = k % segs;
  w.row_begin = row_block * rpb;
  const int64_t end = w.row_begin + rpb;
  w.row_end = end < meta.rows[w.entry] ? end : meta.rows[w.entry];
  return w;
}

// Calls launch(meta, n_blocks, first_block) once per launch, pairs in list order (first_block: blocks
// of earlier launches, the slots of split rows).
template <typename Launch>
void pair_apply(const std::vector<PairPiece>& pairs, Launch&& launch) {
  PairListMeta meta{};
  int n_pairs = 0;
  int n_blocks = 0;
  int64_t first_block = 0;
  auto flush = [&] {
    launch(meta, n_blocks, first_block);
    first_block += n_blocks;
    n_pairs = 0;
    n_blocks = 0;
  };
  for (const PairPiece& p : pairs) {
    const int64_t blocks = pair_blocks(p);
    for (int64_t done = 0; done < blocks;) {
      if (n_pairs == kMaxPairs || n_blocks == kMaxPairBlocks) flush();
      const int64_t take = std::min<int64_t>(blocks - done, kMaxPairBlocks - n_blocks);
      meta.w[n_pairs] = p.w;
      meta.g[n_pairs] = p.g;
      meta.rows[n_pairs] = p.rows;
      meta.len[n_pairs] = p.len;
      meta.skip[n_pairs] = done;
      meta.first_block[n_pairs] = static_cast<uint16_t>(n_blocks);
      meta.wrote[n_pairs] = p.wrote;
      meta.dtype[n_pairs] = p.dtype;
      for (int64_t b = 0; b < take; ++b) meta.block_pair[n_blocks++] = static_cast<PairIndex>(n_pairs);
      ++n_pairs;
      done += take;
    }
  }
  if (n_blocks > 0) flush();
}

}  // namespace cuda
}  // namespace segclip
