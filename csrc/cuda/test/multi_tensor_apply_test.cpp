// Host-only test of the multi-tensor apply's chunking (csrc/cuda/multi_tensor_apply.cuh): the launch
// tables, block_chunk, VecSplit and the strided scale's indexing are the exact functions the kernels
// use, run here without a GPU on fake addresses (nothing is dereferenced); so are the group runs
// (multi_tensor_apply_grouped) and the adaptive clip's work split (adaptive_apply.cuh). Built and run by tests/test_cuda.py once per table
// layout (see note: [kernel argument space]):
//   c++ -std=c++17 -O1 -Wall -Werror -DSEGCLIP_KERNEL_PARAM_BYTES=32768 -I csrc/cuda
//       csrc/cuda/test/multi_tensor_apply_test.cpp       (and again with =4096)
// Not part of the extension (setup.py only compiles csrc/cuda/*.cpp). Prints "OK <cases> ..." on success.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "adaptive_apply.cuh"
#include "multi_tensor_apply.cuh"

#include "expect.h"

using namespace segclip::cuda;
using segclip_test::g_failures;

namespace {


struct Spec {
  int64_t numel;
  DType dtype;
  int misalign_elems;  // the data pointer is this many elements past a 256-byte boundary
};

// Runs multi_tensor_apply over fake tensors and checks that every chunk of every tensor is launched
// exactly once, in list order, with the right address/length/dtype, within the table sizes.
void check_apply(const std::vector<Spec>& specs, const char* name) {
  std::vector<TensorPiece> pieces;
  std::vector<uintptr_t> base;
  for (size_t i = 0; i < specs.size(); ++i) {
    // Far apart (2^40 bytes) so any 64-bit tensor fits; never dereferenced.
    const uintptr_t b = (uintptr_t{1} << 44) + (uintptr_t{i} << 40) +
                        static_cast<uintptr_t>(specs[i].misalign_elems * elem_size(specs[i].dtype));
    base.push_back(b);
    pieces.push_back({reinterpret_cast<void*>(b), specs[i].numel, specs[i].dtype});
  }
  const int64_t expected_blocks = count_blocks(pieces);
  int64_t seen_blocks = 0;
  size_t cursor_tensor = 0;  // the next chunk expected, in list order
  int64_t cursor_chunk = 0;
  auto advance_cursor = [&] {
    while (cursor_tensor < specs.size() && cursor_chunk >= num_chunks(specs[cursor_tensor].numel)) {
      ++cursor_tensor;
      cursor_chunk = 0;
    }
  };
  advance_cursor();
  int launches = 0;
  multi_tensor_apply(pieces, [&](const TensorListMeta& meta, int n_blocks, int64_t first_block) {
    ++launches;
    EXPECT(n_blocks > 0 && n_blocks <= kMaxBlocks, "%s: launch with %d blocks", name, n_blocks);
    EXPECT(first_block == seen_blocks, "%s: first_block %lld, expected %lld", name, (long long)first_block,
           (long long)seen_blocks);
    int prev_t = -1;
    for (int b = 0; b < n_blocks; ++b) {
      const int t = meta.block_tensor[b];
      EXPECT(t < kMaxTensors, "%s: tensor index %d", name, t);
      EXPECT(t == prev_t || t == prev_t + 1, "%s: block %d jumps from entry %d to %d", name, b, prev_t, t);
      if (t != prev_t) EXPECT(meta.first_block[t] == b, "%s: first_block[%d] = %d, block %d", name, t,
                              meta.first_block[t], b);
      prev_t = t;
      const BlockChunk c = block_chunk(meta, b);
      if (cursor_tensor >= specs.size()) {
        EXPECT(false, "%s: more blocks than chunks", name);
        return;
      }
      const Spec& s = specs[cursor_tensor];
      const int64_t es = elem_size(s.dtype);
      const uintptr_t expect_ptr = base[cursor_tensor] + static_cast<uintptr_t>(cursor_chunk * kChunkElems * es);
      const int64_t left = s.numel - cursor_chunk * kChunkElems;
      const int64_t expect_len = left < kChunkElems ? left : kChunkElems;
      EXPECT(reinterpret_cast<uintptr_t>(c.ptr) == expect_ptr, "%s: tensor %zu chunk %lld: wrong address", name,
             cursor_tensor, (long long)cursor_chunk);
      EXPECT(c.len == expect_len, "%s: tensor %zu chunk %lld: len %d, expected %lld", name, cursor_tensor,
             (long long)cursor_chunk, c.len, (long long)expect_len);
      EXPECT(c.dtype == s.dtype, "%s: tensor %zu: wrong dtype", name, cursor_tensor);
      ++cursor_chunk;
      advance_cursor();
    }
    EXPECT(prev_t + 1 <= kMaxTensors, "%s: %d tensor entries", name, prev_t + 1);
    seen_blocks += n_blocks;
  });
  EXPECT(seen_blocks == expected_blocks, "%s: %lld blocks launched, %lld chunks", name, (long long)seen_blocks,
         (long long)expected_blocks);
  EXPECT(cursor_tensor == specs.size(), "%s: chunks of tensor %zu never launched", name, cursor_tensor);
  EXPECT((launches == 0) == (expected_blocks == 0), "%s: %d launches for %lld blocks", name, launches,
         (long long)expected_blocks);
}

// multi_tensor_apply_reversed: the launches of multi_tensor_apply, last first, each with the same
// blocks and chunks (so reversing inside each launch too, as the scale kernel does, visits every
// chunk once).
void check_reversed(const std::vector<Spec>& specs, const char* name) {
  std::vector<TensorPiece> pieces;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uintptr_t b = (uintptr_t{1} << 44) + (uintptr_t{i} << 40) +
                        static_cast<uintptr_t>(specs[i].misalign_elems * elem_size(specs[i].dtype));
    pieces.push_back({reinterpret_cast<void*>(b), specs[i].numel, specs[i].dtype});
  }
  struct Launch {
    int64_t first_block;
    std::vector<uintptr_t> chunk_ptrs;
    std::vector<int> chunk_lens;
  };
  auto record = [](std::vector<Launch>& out) {
    return [&out](const TensorListMeta& meta, int n_blocks, int64_t first_block) {
      Launch l{first_block, {}, {}};
      for (int b = 0; b < n_blocks; ++b) {
        const BlockChunk c = block_chunk(meta, b);
        l.chunk_ptrs.push_back(reinterpret_cast<uintptr_t>(c.ptr));
        l.chunk_lens.push_back(c.len);
      }
      out.push_back(std::move(l));
    };
  };
  std::vector<Launch> forward, backward;
  multi_tensor_apply(pieces, record(forward));
  multi_tensor_apply_reversed(pieces, record(backward));
  EXPECT(forward.size() == backward.size(), "%s: %zu launches forward, %zu reversed", name, forward.size(),
         backward.size());
  for (size_t k = 0; k < forward.size() && k < backward.size(); ++k) {
    const Launch& f = forward[forward.size() - 1 - k];
    const Launch& r = backward[k];
    EXPECT(f.first_block == r.first_block && f.chunk_ptrs == r.chunk_ptrs && f.chunk_lens == r.chunk_lens,
           "%s: reversed launch %zu differs from forward launch %zu", name, k, forward.size() - 1 - k);
  }
}

// The persistent clip's split of one table (see note: [persistent clip work split]) over `grid`
// blocks: every unit owned once, owners' shares differ by at most one, and the slices of each chunk
// tile it exactly (contiguous, in order, nothing past its end).
void check_persistent_split(const std::vector<Spec>& specs, const char* name) {
  std::vector<TensorPiece> pieces;
  for (size_t i = 0; i < specs.size(); ++i) {
    const uintptr_t b = (uintptr_t{1} << 44) + (uintptr_t{i} << 40) +
                        static_cast<uintptr_t>(specs[i].misalign_elems * elem_size(specs[i].dtype));
    pieces.push_back({reinterpret_cast<void*>(b), specs[i].numel, specs[i].dtype});
  }
  int launches = 0;
  multi_tensor_apply(pieces, [&](const TensorListMeta& meta, int n_blocks, int64_t) {
    ++launches;
    const int64_t units = int64_t{n_blocks} * kSlicesPerChunk;
    for (int64_t grid : {int64_t{1}, int64_t{7}, int64_t{264}, units, units + 5}) {
      std::vector<int> owner(static_cast<size_t>(units), -1);
      int64_t min_share = units, max_share = 0;
      for (int64_t g = 0; g < grid; ++g) {
        const UnitRange r = persistent_units(units, grid, g);
        EXPECT(r.begin <= r.end && r.end <= units, "%s: grid %lld block %lld: [%lld, %lld)", name, (long long)grid,
               (long long)g, (long long)r.begin, (long long)r.end);
        min_share = std::min(min_share, r.end - r.begin);
        max_share = std::max(max_share, r.end - r.begin);
        for (int64_t u = r.begin; u < r.end && u < units; ++u) {
          EXPECT(owner[u] == -1, "%s: unit %lld owned twice", name, (long long)u);
          owner[u] = static_cast<int>(g);
        }
      }
      EXPECT(max_share - min_share <= 1, "%s: grid %lld: shares %lld..%lld", name, (long long)grid,
             (long long)min_share, (long long)max_share);
      for (int64_t u = 0; u < units; ++u) EXPECT(owner[u] != -1, "%s: unit %lld has no owner", name, (long long)u);
    }
    for (int b = 0; b < n_blocks; ++b) {  // the slices tile the chunk
      const BlockChunk c = block_chunk(meta, b);
      const int64_t es = elem_size(c.dtype);
      uintptr_t next = reinterpret_cast<uintptr_t>(c.ptr);
      int64_t covered = 0;
      for (int k = 0; k < kSlicesPerChunk; ++k) {
        const BlockChunk sl = unit_slice(meta, int64_t{b} * kSlicesPerChunk + k);
        EXPECT(sl.dtype == c.dtype, "%s: slice dtype", name);
        if (sl.len == 0) continue;
        EXPECT(reinterpret_cast<uintptr_t>(sl.ptr) == next, "%s: block %d slice %d not contiguous", name, b, k);
        EXPECT(reinterpret_cast<uintptr_t>(sl.ptr) % kVecBytes == reinterpret_cast<uintptr_t>(c.ptr) % kVecBytes,
               "%s: block %d slice %d changes the alignment", name, b, k);
        next += static_cast<uintptr_t>(sl.len * es);
        covered += sl.len;
      }
      EXPECT(covered == c.len, "%s: block %d: slices cover %lld of %d elements", name, b, (long long)covered, c.len);
    }
  });
  EXPECT(launches >= 1 || count_blocks(pieces) == 0, "%s: no launch", name);
}

void check_vec_split() {
  for (int es : {2, 4, 8}) {
    const int per_vec = kVecBytes / es;
    for (int mis = 0; mis < kVecBytes; mis += es) {
      for (int len : {0, 1, 2, 3, 7, 8, 9, 15, 16, 17, 31, 33, 100, int(kChunkElems) - 1, int(kChunkElems)}) {
        const uintptr_t addr = (uintptr_t{1} << 40) + static_cast<uintptr_t>(mis);
        const VecSplit s(reinterpret_cast<const void*>(addr), es, len);
        EXPECT(s.head >= 0 && s.head <= len && s.head < per_vec, "es %d mis %d len %d: head %d", es, mis, len, s.head);
        EXPECT(s.tail == s.head + s.nvec * per_vec && s.tail <= len, "es %d mis %d len %d: tail %d", es, mis, len,
               s.tail);
        EXPECT(len - s.tail < per_vec, "es %d mis %d len %d: %d scalar tail elements", es, mis, len, len - s.tail);
        if (s.nvec > 0) EXPECT((addr + static_cast<uintptr_t>(s.head * es)) % kVecBytes == 0,
                               "es %d mis %d len %d: vectors misaligned", es, mis, len);
        if (len >= per_vec + s.head && len - s.head >= per_vec) EXPECT(s.nvec > 0, "es %d mis %d len %d: no vectors", es, mis, len);
      }
    }
  }
}

// make_strided_view + strided_offset (the strided scale's indexing) against an odometer over the
// original sizes and strides: the same multiset of offsets, so every element is visited exactly once.
void check_strided(const std::vector<int64_t>& sizes, const std::vector<int64_t>& strides, int expect_ndim,
                   const char* name) {
  const int ndim = static_cast<int>(sizes.size());
  StridedView v;
  const bool ok = make_strided_view(reinterpret_cast<void*>(uintptr_t{1} << 32), DType::kFloat, sizes.data(),
                                    strides.data(), ndim, &v);
  if (expect_ndim < 0) {
    EXPECT(!ok, "%s: accepted, expected a refusal", name);
    return;
  }
  EXPECT(ok, "%s: refused", name);
  if (!ok) return;
  EXPECT(v.ndim == expect_ndim, "%s: %d dims after merging, expected %d", name, v.ndim, expect_ndim);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  EXPECT(v.numel == numel, "%s: numel %lld", name, (long long)v.numel);
  std::vector<int64_t> want, got;
  std::vector<int64_t> idx(sizes.size(), 0);
  for (int64_t i = 0; i < numel; ++i) {
    int64_t off = 0;
    for (int d = 0; d < ndim; ++d) off += idx[d] * strides[d];
    want.push_back(off);
    for (int d = ndim - 1; d >= 0 && ++idx[d] == sizes[d]; --d) idx[d] = 0;
    got.push_back(strided_offset(v, i));
  }
  std::sort(want.begin(), want.end());
  std::sort(got.begin(), got.end());
  EXPECT(want == got, "%s: offsets differ", name);
  EXPECT(std::adjacent_find(got.begin(), got.end()) == got.end(), "%s: an element is visited twice", name);
}

void check_strided_views() {
  check_strided({64, 65}, {130, 2}, 1, "x[:, ::2] of 64x130 is x.view(-1)[::2]: merged");
  check_strided({64, 66}, {131, 2}, 2, "x[:, ::2] of 64x131");
  check_strided({517, 100}, {1, 517 * 3}, 2, "x.t()[:, ::3]");
  check_strided({6, 16, 5, 7}, {1008, 1, 224, 16}, 4, "channels_last x[:, :, ::2]");
  check_strided({5, 20, 29}, {1200, 30, 1}, 3, "x[::2, :, 1:] of 10x20x30");
  check_strided({1, 4, 1, 6}, {999, 12, 5, 2}, 1, "size-1 dims dropped, the rest merged");
  check_strided({3, 4, 5}, {40, 10, 2}, 1, "x[..., ::2]: all merge into one strided dim");
  check_strided({2, 2, 2, 2, 2, 2, 2, 2}, {3 << 14, 3 << 12, 3 << 10, 3 << 8, 3 << 6, 3 << 4, 3 << 2, 3}, 8,
                "8 dims, none mergeable");
  check_strided({2, 2, 2, 2, 2, 2, 2, 2, 2},
                {3 << 16, 3 << 14, 3 << 12, 3 << 10, 3 << 8, 3 << 6, 3 << 4, 3 << 2, 3}, -1,
                "9 dims left: not for the strided kernel");
  check_strided({3, 3}, {1, 1}, -1, "overlapping (as_strided): not for the strided kernel");
  check_strided({4, 3}, {0, 2}, -1, "expanded (zero stride): not for the strided kernel");
  check_strided({4, 3}, {2, 3}, -1, "interleaved strides that may overlap: not for the strided kernel");
  check_strided({int64_t{1} << 20, 3}, {int64_t{1} << 12, 1}, 2, "offsets past 2^32");
}

}  // namespace

// multi_tensor_apply_grouped (see note: [group runs]): the same chunks in the same block slots as
// multi_tensor_apply, each block's group (group_of_entry, what the kernel calls) that of its tensor,
// valid run tables; returns the number of launches.
int check_grouped(const std::vector<Spec>& specs, const std::vector<int32_t>& groups, const char* name) {
  std::vector<TensorPiece> pieces;
  struct Want {
    uintptr_t ptr;
    int64_t len;
    size_t piece;
  };
  std::vector<Want> want;  // per block slot, over all launches
  for (size_t i = 0; i < specs.size(); ++i) {
    const uintptr_t b = (uintptr_t{1} << 44) + (uintptr_t{i} << 40) +
                        static_cast<uintptr_t>(specs[i].misalign_elems * elem_size(specs[i].dtype));
    pieces.push_back({reinterpret_cast<void*>(b), specs[i].numel, specs[i].dtype});
    for (int64_t c = 0; c < num_chunks(specs[i].numel); ++c) {
      const int64_t left = specs[i].numel - c * kChunkElems;
      want.push_back({b + static_cast<uintptr_t>(c * kChunkElems * elem_size(specs[i].dtype)),
                      left < kChunkElems ? left : kChunkElems, i});
    }
  }
  int launches = 0;
  int64_t seen = 0;
  multi_tensor_apply_grouped(pieces, groups, [&](const TensorListMeta& meta, const GroupRuns& runs, int n_blocks,
                                                 int64_t first_block) {
    ++launches;
    EXPECT(first_block == seen, "%s: first_block %lld, expected %lld", name, (long long)first_block, (long long)seen);
    EXPECT(runs.n >= 1 && runs.n <= kMaxGroupRuns, "%s: %d runs", name, runs.n);
    EXPECT(runs.first_entry[0] == 0, "%s: the first run starts at entry %d", name, runs.first_entry[0]);
    for (int r = 1; r < runs.n; ++r) {
      EXPECT(runs.first_entry[r] > runs.first_entry[r - 1] && runs.group[r] != runs.group[r - 1],
             "%s: run %d not a new run", name, r);
    }
    for (int b = 0; b < n_blocks; ++b) {
      const int64_t slot = first_block + b;
      if (slot >= static_cast<int64_t>(want.size())) {
        EXPECT(false, "%s: more blocks than chunks", name);
        return;
      }
      const BlockChunk c = block_chunk(meta, b);
      EXPECT(reinterpret_cast<uintptr_t>(c.ptr) == want[slot].ptr && c.len == want[slot].len,
             "%s: slot %lld holds another chunk", name, (long long)slot);
      const int32_t g = group_of_entry(runs, meta.block_tensor[b]);
      EXPECT(g == groups[want[slot].piece], "%s: slot %lld in group %d, its tensor in %d", name, (long long)slot, g,
             groups[want[slot].piece]);
    }
    seen += n_blocks;
  });
  EXPECT(seen == static_cast<int64_t>(want.size()), "%s: %lld blocks for %zu chunks", name, (long long)seen,
         want.size());
  return launches;
}

int count_launches(const std::vector<Spec>& specs) {
  std::vector<TensorPiece> pieces;
  for (const Spec& s : specs) pieces.push_back({reinterpret_cast<void*>(uintptr_t{1} << 44), s.numel, s.dtype});
  int launches = 0;
  multi_tensor_apply(pieces, [&](const TensorListMeta&, int, int64_t) { ++launches; });
  return launches;
}

void check_grouped_cases(std::mt19937_64& rng, int* cases) {
  const int64_t C = kChunkElems;
  {  // a segmentation model: backbone, classifier, aux as runs: as many launches as the norm
    std::vector<Spec> specs;
    std::vector<int32_t> groups;
    for (int i = 0; i < 180; ++i) {
      specs.push_back({(i % 9 == 0) ? 0 : (i * 7919) % (2 * C) + 1, DType(i % 4), i % 8});
      groups.push_back(i < 150 ? 0 : (i < 170 ? 1 : 2));
    }
    const int launches = check_grouped(specs, groups, "three groups in runs");
    EXPECT(launches == count_launches(specs), "three groups: %d launches, the norm %d", launches,
           count_launches(specs));
    ++*cases;
  }
  {  // every tensor its own group, more groups than one launch's runs: launches go out early
    std::vector<Spec> specs;
    std::vector<int32_t> groups;
    for (int i = 0; i < 3 * kMaxGroupRuns + 5; ++i) {
      specs.push_back({(i % 5 == 0) ? 0 : 1 + i, DType::kFloat, 0});
      groups.push_back(i);
    }
    const int launches = check_grouped(specs, groups, "one group per tensor");
    EXPECT(launches >= 3, "one group per tensor: %d launches", launches);
    ++*cases;
  }
  {  // alternating groups, a tensor cut across launches, empties, the tensor table full
    std::vector<Spec> specs;
    std::vector<int32_t> groups;
    for (int i = 0; i < 2 * kMaxTensors + 7; ++i) {
      specs.push_back({(i % 11 == 0) ? 0 : (i * 977) % (3 * C), DType(i % 4), i % 8});
      groups.push_back(i % 2);
    }
    specs.insert(specs.begin() + 40, {2 * kMaxBlocks * C + 5, DType::kHalf, 1});
    groups.insert(groups.begin() + 40, 1);
    check_grouped(specs, groups, "alternating groups, several launches");
    ++*cases;
  }
  check_grouped({}, {}, "grouped: empty list");
  check_grouped({{0, DType::kFloat, 0}, {0, DType::kFloat, 0}}, {0, 1}, "grouped: all empty");
  *cases += 2;
  for (int trial = 0; trial < 100; ++trial) {
    std::vector<Spec> specs;
    std::vector<int32_t> groups;
    const int n = static_cast<int>(rng() % 600);
    const int n_groups = 1 + static_cast<int>(rng() % 300);
    for (int i = 0; i < n; ++i) {
      const int64_t numel = rng() % 4 == 0 ? 0 : static_cast<int64_t>(rng() % (3 * C));
      specs.push_back({numel, DType(rng() % 4), static_cast<int>(rng() % 8)});
      groups.push_back(rng() % 3 == 0 || i == 0 ? static_cast<int32_t>(rng() % n_groups) : groups.back());
    }
    check_grouped(specs, groups, "grouped: random");
    ++*cases;
  }
}

// pair_apply / pair_work (see note: [adaptive clip on CUDA]): every unit of every pair covered exactly
// once (warp and block rows: whole rows; split rows: every segment once, the unit's segments in
// consecutive slots), within the table sizes, entries in list order.
void check_pairs(const std::vector<std::pair<int64_t, int64_t>>& shapes, const char* name) {
  std::vector<PairPiece> pairs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    const uintptr_t b = (uintptr_t{1} << 44) + (uintptr_t{i} << 40);
    pairs.push_back({reinterpret_cast<const void*>(b), reinterpret_cast<void*>(b + (uintptr_t{1} << 39)),
                     shapes[i].first, shapes[i].second, DType(i % 4), static_cast<int16_t>(i % 3 == 0 ? i : -1)});
  }
  // covered[i][r * segs + s]: how often segment s of row r of pair i was taken
  std::vector<std::vector<int>> covered(pairs.size());
  for (size_t i = 0; i < pairs.size(); ++i) {
    const int64_t units = pairs[i].len == 0 ? 0 : pairs[i].rows;  // an empty pair has no work
    covered[i].assign(static_cast<size_t>(units * segments_per_row(pairs[i].len)), 0);
  }
  int64_t seen = 0;
  pair_apply(pairs, [&](const PairListMeta& meta, int n_blocks, int64_t first_block) {
    EXPECT(n_blocks > 0 && n_blocks <= kMaxPairBlocks, "%s: %d blocks", name, n_blocks);
    EXPECT(first_block == seen, "%s: first_block %lld, expected %lld", name, (long long)first_block, (long long)seen);
    for (int b = 0; b < n_blocks; ++b) {
      const PairWork w = pair_work(meta, b);
      EXPECT(w.entry >= 0 && w.entry < kMaxPairs, "%s: entry %d", name, w.entry);
      const uintptr_t base = reinterpret_cast<uintptr_t>(meta.w[w.entry]);
      const size_t i = static_cast<size_t>((base - (uintptr_t{1} << 44)) >> 40);
      if (i >= pairs.size()) {
        EXPECT(false, "%s: block %d of an unknown pair", name, b);
        continue;
      }
      EXPECT(meta.g[w.entry] == pairs[i].g && meta.dtype[w.entry] == pairs[i].dtype &&
                 meta.wrote[w.entry] == pairs[i].wrote && meta.rows[w.entry] == pairs[i].rows &&
                 meta.len[w.entry] == pairs[i].len, "%s: entry %d does not describe pair %zu", name, w.entry, i);
      const int64_t segs = segments_per_row(pairs[i].len);
      EXPECT(w.row_begin < w.row_end && w.row_end <= pairs[i].rows, "%s: rows [%lld, %lld) of %lld", name,
             (long long)w.row_begin, (long long)w.row_end, (long long)pairs[i].rows);
      EXPECT(w.seg >= 0 && w.seg < segs, "%s: segment %lld of %lld", name, (long long)w.seg, (long long)segs);
      if (segs > 1) EXPECT(w.row_end == w.row_begin + 1, "%s: a split block takes one row", name);
      for (int64_t r = w.row_begin; r < w.row_end; ++r) ++covered[i][static_cast<size_t>(r * segs + w.seg)];
    }
    seen += n_blocks;
  });
  for (size_t i = 0; i < pairs.size(); ++i) {
    for (size_t k = 0; k < covered[i].size(); ++k) {
      EXPECT(covered[i][k] == 1, "%s: pair %zu unit-segment %zu taken %d times", name, i, k, covered[i][k]);
    }
  }
}

// The split rows' slots: the blocks of one unit are consecutive over all launches, so the unit's
// segments are at slot - seg .. slot - seg + segs - 1 in every one of its blocks.
void check_split_slots(const std::vector<std::pair<int64_t, int64_t>>& shapes, const char* name) {
  std::vector<PairPiece> pairs;
  for (size_t i = 0; i < shapes.size(); ++i) {
    pairs.push_back({reinterpret_cast<const void*>((uintptr_t{1} << 44) + (uintptr_t{i} << 40)),
                     reinterpret_cast<void*>(uintptr_t{1} << 45), shapes[i].first, shapes[i].second, DType::kFloat,
                     -1});
  }
  std::vector<std::pair<int64_t, int64_t>> slot_unit;  // slot -> (unit id, seg), over all launches
  std::vector<int64_t> slot_first;
  pair_apply(pairs, [&](const PairListMeta& meta, int n_blocks, int64_t first_block) {
    for (int b = 0; b < n_blocks; ++b) {
      const PairWork w = pair_work(meta, b);
      EXPECT(first_block + b == static_cast<int64_t>(slot_unit.size()), "%s: slots out of order", name);
      const uintptr_t w_addr = reinterpret_cast<uintptr_t>(meta.w[w.entry]);
      const int64_t pair = static_cast<int64_t>((w_addr - (uintptr_t{1} << 44)) >> 40);
      slot_unit.push_back({pair * (int64_t{1} << 32) + w.row_begin, w.seg});
      slot_first.push_back(first_block + b - w.seg);
    }
  });
  for (size_t s = 0; s < slot_unit.size(); ++s) {
    const int64_t f = slot_first[s];
    EXPECT(f >= 0 && static_cast<size_t>(f) < slot_unit.size() && slot_unit[static_cast<size_t>(f)].second == 0 &&
               slot_unit[static_cast<size_t>(f)].first == slot_unit[s].first,
           "%s: slot %zu's unit does not start at slot %lld", name, s, (long long)f);
  }
}

// unit_coefficient (the kernels' per-unit decision) against the CPU kernel's formula (clip_rows in
// cpu/adaptive_cpu.cpp: std::max, then gn < bound), and the cases written out.
template <typename A>
void check_unit_coefficient(const char* name) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  const A inf = std::numeric_limits<A>::infinity();
  const A values[] = {A(0), A(1e-9), A(1e-6), A(1e-5), A(1e-3), A(0.5), A(1), A(3), A(1e5), inf, nan};
  for (A wn : values) {
    for (A gn : values) {
      for (double cf : {0.0, 0.01, 1.0}) {
        const double eps = 1e-3;
        A got = A(-7);
        const bool clip = unit_coefficient<A>(wn, gn, cf, eps, &got);
        const A bound = std::max(wn, static_cast<A>(eps)) * static_cast<A>(cf);  // the CPU kernel's
        const bool cpu_clip = !(gn < bound);
        EXPECT(clip == cpu_clip, "%s: wn %g gn %g cf %g: clip %d, CPU %d", name, double(wn), double(gn), cf, clip,
               cpu_clip);
        if (clip && cpu_clip) {
          const A want = bound / std::max(gn, static_cast<A>(1e-6));
          EXPECT((std::isnan(got) && std::isnan(want)) || got == want, "%s: wn %g gn %g cf %g: coef %g, CPU %g", name,
                 double(wn), double(gn), cf, double(got), double(want));
        }
      }
    }
  }
  A c = A(0);
  EXPECT(!unit_coefficient<A>(A(2), A(0.01), 0.01, 1e-3, &c), "%s: below the bound is not clipped", name);
  EXPECT(unit_coefficient<A>(A(2), A(0.04), 0.01, 1e-3, &c) && std::fabs(double(c) - 0.5) < 1e-6,
         "%s: twice the bound is halved (%g)", name, double(c));
  EXPECT(unit_coefficient<A>(A(0), A(1), 0.5, 1e-3, &c) && std::fabs(double(c) - 5e-4) < 1e-9,
         "%s: a zero weight takes eps (%g)", name, double(c));
  EXPECT(unit_coefficient<A>(nan, A(1), 0.01, 1e-3, &c) && std::isnan(c), "%s: NaN weight norm: NaN unit", name);
  EXPECT(unit_coefficient<A>(A(1), nan, 0.01, 1e-3, &c) && std::isnan(c), "%s: NaN grad norm: NaN unit", name);
}

void check_pair_cases(int* cases) {
  check_unit_coefficient<float>("unit_coefficient<float>");
  check_unit_coefficient<double>("unit_coefficient<double>");
  const int64_t C = kChunkElems;
  EXPECT(unit_mode(kWarpRowMaxElems) == UnitMode::kWarpRows && unit_mode(kWarpRowMaxElems + 1) == UnitMode::kBlockRow &&
             unit_mode(C) == UnitMode::kBlockRow && unit_mode(C + 1) == UnitMode::kSplitRow,
         "unit_mode boundaries");
  EXPECT(rows_per_block(1) == kMaxRowsPerBlock && rows_per_block(kWarpRowMaxElems) == C / kWarpRowMaxElems &&
             rows_per_block(C) == 1 && segments_per_row(C) == 1 && segments_per_row(C + 1) == 2,
         "rows_per_block / segments_per_row");
  check_pairs({}, "pairs: empty list");
  check_pairs({{0, 5}, {3, 0}}, "pairs: empty tensors");
  check_pairs({{2048, 64}, {960, 9}, {64, 1}, {1, 300}, {1, 1}}, "pairs: many tiny units (1x1, depthwise, bias)");
  check_pairs({{5, kWarpRowMaxElems}, {5, kWarpRowMaxElems + 1}, {3, C - 1}, {3, C}, {3, C + 1}},
              "pairs: mode boundaries");
  check_pairs({{1, 7 * C + 5}, {3, 2 * C + 1}, {2, 3}}, "pairs: huge units");
  check_split_slots({{1, 7 * C + 5}, {3, 2 * C + 1}, {2, (kMaxPairBlocks + 3) * C}}, "split slots");
  {
    std::vector<std::pair<int64_t, int64_t>> shapes;  // more pairs than one table, and more blocks
    for (int i = 0; i < 2 * kMaxPairs + 7; ++i) shapes.push_back({1 + (i * 37) % 300, 1 + (i * 911) % 3000});
    shapes.insert(shapes.begin() + 17, {kMaxPairBlocks + 10, 2000});  // one pair across launches
    shapes.insert(shapes.begin() + 5, {1, (2 * kMaxPairBlocks + 1) * C});  // one unit across launches
    check_pairs(shapes, "pairs: several launches");
    check_split_slots({{1, (2 * kMaxPairBlocks + 1) * C}, {2, 3 * C}}, "split slots across launches");
  }
  *cases += 8;
}

int main() {
  int cases = 0;
  const int64_t C = kChunkElems;
  auto run = [&](const std::vector<Spec>& specs, const char* name) {
    check_apply(specs, name);
    check_reversed(specs, name);
    ++cases;
  };
  run({}, "empty list");
  run({{0, DType::kFloat, 0}}, "one empty tensor");
  run({{0, DType::kFloat, 0}, {0, DType::kHalf, 1}, {0, DType::kDouble, 0}}, "all empty");
  run({{0, DType::kFloat, 0}, {5, DType::kFloat, 0}, {0, DType::kFloat, 0}, {C + 1, DType::kFloat, 1},
       {0, DType::kFloat, 0}}, "empties first, middle, last");
  run({{C - 1, DType::kFloat, 0}, {C, DType::kHalf, 0}, {C + 1, DType::kBFloat16, 3}, {1, DType::kDouble, 1}},
      "chunk size +-1");
  for (int64_t extra : {-1, 0, 1}) {
    run({{(kMaxBlocks + extra) * C, DType::kFloat, 0}, {0, DType::kFloat, 0}}, "block table exactly full");
    run({{7, DType::kFloat, 0}, {(kMaxBlocks + extra) * C - 3, DType::kHalf, 1}, {0, DType::kFloat, 0}},
        "tensor cut at the block-table boundary");
  }
  {
    std::vector<Spec> specs;
    for (int i = 0; i < kMaxTensors; ++i) specs.push_back({i + 1, DType::kFloat, 0});
    run(specs, "tensor table exactly full");
    specs.push_back({0, DType::kFloat, 0});
    run(specs, "tensor table full, then an empty tensor");
    specs.push_back({3, DType::kDouble, 0});
    run(specs, "tensor table full plus one");
  }
  {
    std::vector<Spec> specs;  // > kMaxTensors tensors, > kMaxBlocks chunks, a tensor spanning 3 launches
    const int n = 3 * kMaxTensors;
    for (int i = 0; i < n; ++i) specs.push_back({(i % 7 == 0) ? 0 : (i * 977) % (3 * C), DType(i % 4), i % 8});
    specs.insert(specs.begin() + n / 2, {3 * kMaxBlocks * C + 17, DType::kBFloat16, 1});
    run(specs, "many tensors, several launches");
  }
  {
    std::vector<Spec> specs;  // the tensor table fills before the block table, several times over
    for (int i = 0; i < 2 * kMaxTensors + 3; ++i) specs.push_back({1 + i % 5, DType(i % 4), i % 3});
    run(specs, "small tensors: the tensor table fills first");
  }
  // More than 2^31 elements: 64-bit offsets.
  run({{(int64_t{1} << 31) + 7, DType::kBFloat16, 0}}, "2^31 + 7 bfloat16");
  run({{1, DType::kFloat, 0}, {int64_t{5} << 30, DType::kDouble, 1}, {3, DType::kHalf, 0}}, "5 * 2^30 float64");

  std::mt19937_64 rng(1234);
  for (int trial = 0; trial < 200; ++trial) {
    std::vector<Spec> specs;
    const int n = static_cast<int>(rng() % 400);
    for (int i = 0; i < n; ++i) {
      int64_t numel;
      switch (rng() % 5) {
        case 0: numel = 0; break;
        case 1: numel = static_cast<int64_t>(rng() % 64); break;
        case 2: numel = static_cast<int64_t>(rng() % (4 * C)); break;
        case 3: numel = C * static_cast<int64_t>(rng() % 8) + static_cast<int64_t>(rng() % 3) - 1; break;
        default: numel = static_cast<int64_t>(rng() % (int64_t{600} * C)); break;
      }
      if (numel < 0) numel = 0;
      specs.push_back({numel, DType(rng() % 4), static_cast<int>(rng() % 8)});
    }
    check_apply(specs, "random");
    if (trial % 10 == 0) check_reversed(specs, "random");
    ++cases;
  }
  {  // the persistent clip's split, on lists that fit one table (and one that does not: per table)
    std::vector<Spec> model;
    for (int i = 0; i < 180; ++i) model.push_back({(i % 9 == 0) ? 0 : (i * 7919) % (2 * C) + 1, DType(i % 4), i % 8});
    check_persistent_split(model, "persistent: a segmentation-sized list");
    check_persistent_split({{1, DType::kFloat, 0}}, "persistent: one element");
    check_persistent_split({{C + 1, DType::kHalf, 3}, {kSliceElems - 1, DType::kDouble, 1}, {kSliceElems + 1, DType::kFloat, 0}},
                           "persistent: slice size +-1");
    cases += 3;
  }
  check_grouped_cases(rng, &cases);
  check_pair_cases(&cases);
  check_vec_split();
  ++cases;
  check_strided_views();
  ++cases;
  if (g_failures > 0) {
    std::fprintf(stderr, "FAILED: %d checks\n", g_failures);
    return 1;
  }
  std::printf("OK %d cases; %d-byte layout: %d tensors, %d blocks per launch, table %zu bytes\n", cases,
              kKernelParamBytes, kMaxTensors, kMaxBlocks, sizeof(TensorListMeta));
  return 0;
}
