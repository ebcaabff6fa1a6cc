// Host-only test of the multi-tensor apply's chunking (csrc/cuda/multi_tensor_apply.cuh): the launch
// tables, block_chunk, VecSplit and the strided scale's indexing are the exact functions the kernels use, run here without a GPU
// on fake addresses (nothing is dereferenced). Built and run by tests/test_cuda.py once per table
// layout (see note: [kernel argument space]):
//   c++ -std=c++17 -O1 -Wall -Werror -DSEGCLIP_KERNEL_PARAM_BYTES=32768 -I csrc/cuda
//       csrc/cuda/test/multi_tensor_apply_test.cpp       (and again with =4096)
// Not part of the extension (setup.py only compiles csrc/cuda/*.cpp). Prints "OK <cases> ..." on success.
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

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
