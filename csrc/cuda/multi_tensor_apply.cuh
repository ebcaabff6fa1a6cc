// segclip's multi-tensor apply: runs one kernel over the chunks of a list of tensors in as few
// launches as possible. Plain C++, host and device: module.cpp reads the sizes, and
// csrc/cuda/test/multi_tensor_apply_test.cpp runs the chunking (multi_tensor_apply, block_chunk,
// VecSplit) on the host without a GPU. What a block's threads do with its chunk:
// multi_tensor_math.cuh; the kernels: multi_tensor_kernels.cu.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__CUDACC__)
#define SEGCLIP_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define SEGCLIP_HOST_DEVICE inline
#endif
#if defined(__CUDA_ARCH__)  // host compilers do not know the pragma (-Wunknown-pragmas)
#define SEGCLIP_UNROLL _Pragma("unroll")
#else
#define SEGCLIP_UNROLL
#endif

// NOTE: [kernel argument space]
// A kernel's parameters are limited to 4 KiB, or to 32 KiB with CUDA >= 12.1 on Volta and newer when
// the driver is >= 530. Like torch's MultiTensorApply.cuh, the 32 KiB tables are compiled in only
// for CUDA >= 13 (CUDART_VERSION >= 13000): a driver that runs CUDA 13 code supports 32 KiB, and
// CUDA 13 has no pre-Volta target, so no run-time check (and no second set of kernels) is needed;
// older toolkits keep the 4 KiB tables. The choice is made once per build, from CUDART_VERSION,
// which every file including this header sees the same (the header includes cuda_runtime_api.h
// itself when the toolkit's headers are on the include path). The host-only tests in
// csrc/cuda/test/ set SEGCLIP_KERNEL_PARAM_BYTES to 4096 or 32768 on the command line and run the
// chunking in both layouts. module.cpp checks at import that the kernels (nvcc) and the host side
// were compiled with the same layout (kernel_param_bytes()).
#if !defined(SEGCLIP_KERNEL_PARAM_BYTES)
#if defined(__has_include)
#if __has_include(<cuda_runtime_api.h>)
#include <cuda_runtime_api.h>
#endif
#endif
#if defined(CUDART_VERSION) && CUDART_VERSION >= 13000
#define SEGCLIP_KERNEL_PARAM_BYTES 32768
#else
#define SEGCLIP_KERNEL_PARAM_BYTES 4096
#endif
#endif

namespace segclip {
namespace cuda {

// NOTE: [CUDA chunking and launches]
// Every tensor is cut into chunks of kChunkElems elements (its last chunk may be shorter); one
// thread block processes one chunk of one tensor. A launch describes its work in a TensorListMeta
// passed by value as the kernel argument (no host-to-device copy, nothing to keep alive, and a CUDA
// graph captures it with the kernel node):
//   * a tensor table of up to kMaxTensors entries (address, element count, dtype, first block), and
//   * a block table of up to kMaxBlocks entries: blockIdx.x -> tensor table index. A block's chunk
//     within its tensor is blockIdx.x - first_block[tensor], so the block table holds only the
//     tensor index (one byte for up to 256 tensors, else two).
// The host walks the list in order and adds each tensor's chunks; when either table is full the
// launch goes out and a new one starts. A tensor whose chunks do not all fit is cut at a chunk
// boundary: its entry in the next launch starts at the first chunk not yet launched (the address is
// advanced, the element count reduced), so every chunk is launched exactly once.
// Zero-element tensors have no chunk and take no table entry, wherever they sit in the list; the
// last launch goes out after the loop whenever it holds any block, so an empty tensor at the end
// never drops the final launch. Addresses, element counts and offsets are 64-bit throughout
// (a tensor of more than 2^31 elements works); only indices inside one chunk are 32-bit.
// Per-launch limits (tensor table entries; block table entries = blocks), chosen at compile time
// from the kernel-argument space the toolkit guarantees, see note: [kernel argument space]:
//   32 KiB layout (CUDA >= 13): 1024 tensors, 6144 blocks (384M elements, 1.5 GiB of float32);
//       19 bytes per tensor entry, 2 per block entry (a uint16 tensor index): 31,744 bytes. Every
//       torchvision segmentation model (<= 200 parameter tensors; deeplabv3_resnet50's 39.6M
//       elements are about 700 chunks) and most LLMs (LLaMA-70B: 723 tensors) take one launch per
//       pass. (torch's foreach kernels take 770 tensors and 2240 blocks in this space.)
//   4 KiB layout (older toolkits): 100 tensors, 2048 blocks (512 MiB of float32); 19 bytes per
//       tensor entry, 1 per block entry (a uint8 tensor index): 3,948 bytes. A model of up to 200
//       parameter tensors takes two launches per pass; 2 GiB of float32, four.
// Every launch boundary drains and refills the GPU, besides the host's launch cost.
// Blocks are numbered across launches in list order (launch k's first block is the number of
// blocks launched before it): the norm writes block b's partial to slot b,
// see note: [last-block reduction].
constexpr int64_t kChunkElems = int64_t{1} << 16;  // elements per chunk (a multiple of every vector width)
constexpr int kKernelParamBytes = SEGCLIP_KERNEL_PARAM_BYTES;
constexpr int kMaxTensors = kKernelParamBytes >= 32768 ? 1024 : 100;  // tensor table entries per launch
constexpr int kMaxBlocks = kKernelParamBytes >= 32768 ? 6144 : 2048;  // block table entries (= blocks) per launch
constexpr int kBlockThreads = 512;                 // threads per block
constexpr int kILP = 4;                            // independent 16-byte loads (and accumulators) per thread
constexpr int kVecBytes = 16;                      // bytes per vectorised load/store

// The element types the kernels take; the values are what the device code switches on.
enum class DType : uint8_t { kHalf = 0, kBFloat16 = 1, kFloat = 2, kDouble = 3 };

SEGCLIP_HOST_DEVICE int64_t elem_size(DType d) {
  switch (d) {
    case DType::kHalf:
    case DType::kBFloat16: return 2;
    case DType::kFloat: return 4;
    case DType::kDouble: return 8;
  }
  return 0;
}

// One dense tensor as the apply sees it: numel elements of dtype, flat in memory from ptr.
struct TensorPiece {
  void* ptr;
  int64_t numel;
  DType dtype;
};

// The block table's entry: a tensor table index.
using TensorIndex = std::conditional_t<(kMaxTensors <= 256), uint8_t, uint16_t>;

struct TensorListMeta {
  void* ptr[kMaxTensors];                // address of the entry's first chunk in this launch
  int64_t numel[kMaxTensors];            // elements from ptr to the tensor's end
  uint16_t first_block[kMaxTensors];     // block processing the entry's first chunk
  DType dtype[kMaxTensors];
  TensorIndex block_tensor[kMaxBlocks];  // block -> tensor table index
};

static_assert(kMaxTensors - 1 <= std::numeric_limits<TensorIndex>::max(), "block_tensor holds every tensor index");
static_assert(kMaxBlocks <= 65535, "first_block holds a block index in 16 bits");
static_assert(kChunkElems % (kVecBytes / 2) == 0, "a chunk keeps every vector width's alignment");
static_assert(kChunkElems <= (int64_t{1} << 30), "in-chunk indices are 32-bit");
// The kernels' other arguments fit in kMaxExtraParamBytes (each kernel's own static_assert), so the
// table plus them stays within the kernel-argument space, see note: [kernel argument space].
constexpr int kMaxExtraParamBytes = 128;
// The exact limit on a kernel's parameters: 32,764 bytes in the large layout (CUDA 12.1+), 4,096 else.
// For kernels that pass more than kMaxExtraParamBytes beside a table (see note: [group runs]).
constexpr int kKernelParamLimit = kKernelParamBytes >= 32768 ? 32764 : 4096;
static_assert(kKernelParamBytes == 4096 || kKernelParamBytes == 32768, "SEGCLIP_KERNEL_PARAM_BYTES: 4096 or 32768");
static_assert(sizeof(TensorListMeta) + kMaxExtraParamBytes <= kKernelParamBytes,
              "kernel arguments exceed their space");

inline int64_t num_chunks(int64_t numel) { return (numel + kChunkElems - 1) / kChunkElems; }

// Blocks (= chunks) over all launches of multi_tensor_apply(pieces, ...).
inline int64_t count_blocks(const std::vector<TensorPiece>& pieces) {
  int64_t blocks = 0;
  for (const TensorPiece& p : pieces) blocks += num_chunks(p.numel);
  return blocks;
}

// Calls launch(meta, n_blocks, first_block) once per launch, in list order, where first_block is the
// number of blocks in earlier launches. See note: [CUDA chunking and launches].
// admit(piece, entry) is asked before piece `piece` (its index in `pieces`) gets tensor table entry
// `entry`: a caller with a side table of its own (see note: [group runs]) returns false when that
// table is full, and the launch goes out first; asked again with entry 0 (a new launch), it must
// return true. The caller resets its side table in `launch`.
template <typename Admit, typename Launch>
void multi_tensor_apply_admit(const std::vector<TensorPiece>& pieces, Admit&& admit, Launch&& launch) {
  TensorListMeta meta{};
  int n_tensors = 0;
  int n_blocks = 0;
  int64_t first_block = 0;
  auto flush = [&] {
    launch(meta, n_blocks, first_block);
    first_block += n_blocks;
    n_tensors = 0;
    n_blocks = 0;
  };
  for (size_t i = 0; i < pieces.size(); ++i) {
    const TensorPiece& piece = pieces[i];
    const int64_t chunks = num_chunks(piece.numel);  // 0 for an empty tensor: no entry at all
    for (int64_t done = 0; done < chunks;) {
      if (n_tensors == kMaxTensors || n_blocks == kMaxBlocks) flush();  // a table is full
      if (!admit(i, n_tensors)) {  // the caller's side table is full
        flush();
        admit(i, 0);
      }
      const int64_t take = std::min<int64_t>(chunks - done, kMaxBlocks - n_blocks);
      const int64_t offset = done * kChunkElems;  // elements already launched
      meta.ptr[n_tensors] = static_cast<char*>(piece.ptr) + offset * elem_size(piece.dtype);
      meta.numel[n_tensors] = piece.numel - offset;
      meta.first_block[n_tensors] = static_cast<uint16_t>(n_blocks);
      meta.dtype[n_tensors] = piece.dtype;
      for (int64_t b = 0; b < take; ++b) meta.block_tensor[n_blocks++] = static_cast<TensorIndex>(n_tensors);
      ++n_tensors;
      done += take;
    }
  }
  if (n_blocks > 0) flush();  // after the loop: trailing empty tensors cannot drop it
}

template <typename Launch>
void multi_tensor_apply(const std::vector<TensorPiece>& pieces, Launch&& launch) {
  multi_tensor_apply_admit(pieces, [](size_t, int) { return true; }, launch);
}

// NOTE: [group runs]
// The per-group partials (multi_tensor_group_partials) need each block's group. A launch carries it
// as runs: run r covers tensor table entries first_entry[r] .. first_entry[r + 1] - 1, all of group
// group[r] (consecutive entries of one group share a run). Up to kMaxGroupRuns runs fit beside the
// tensor table in the kernel-argument space; a launch goes out early when an entry would need one
// more (multi_tensor_apply_grouped). The usual groups (backbone, classifier, aux; an optimizer's
// param groups) are runs of consecutive tensors: one run each, one launch as for the norm. Only a
// list whose groups alternate more often than kMaxGroupRuns times takes more launches. Launch
// boundaries change neither the chunks nor the slots (block numbers over all launches), so the
// partials are those of the norm, see note: [last-block reduction].
constexpr int kMaxGroupRuns = kKernelParamBytes >= 32768 ? 128 : 10;

struct GroupRuns {
  uint16_t first_entry[kMaxGroupRuns];  // increasing; first_entry[0] == 0
  int32_t group[kMaxGroupRuns];
  int32_t n;
};

// The group of tensor table entry `entry` (runs.n >= 1).
SEGCLIP_HOST_DEVICE int32_t group_of_entry(const GroupRuns& runs, int entry) {
  int r = 0;
  while (r + 1 < runs.n && runs.first_entry[r + 1] <= entry) ++r;
  return runs.group[r];
}

// multi_tensor_apply with pieces[i] in group groups[i]: calls launch(meta, runs, n_blocks, first_block).
template <typename Launch>
void multi_tensor_apply_grouped(const std::vector<TensorPiece>& pieces, const std::vector<int32_t>& groups,
                                Launch&& launch) {
  GroupRuns runs{};
  auto admit = [&](size_t piece, int entry) {
    const int32_t g = groups[piece];
    if (entry > 0 && runs.group[runs.n - 1] == g) return true;  // continues the last run
    if (runs.n == kMaxGroupRuns && entry > 0) return false;
    if (entry == 0) runs.n = 0;
    runs.first_entry[runs.n] = static_cast<uint16_t>(entry);
    runs.group[runs.n] = g;
    ++runs.n;
    return true;
  };
  multi_tensor_apply_admit(pieces, admit, [&](const TensorListMeta& meta, int n_blocks, int64_t first_block) {
    launch(meta, runs, n_blocks, first_block);
    runs.n = 0;
  });
}

// multi_tensor_apply's launches, last first: the same tables, in reverse order. For a pass that
// should start where the previous pass over the same list ended (see note: [scale in reverse]). A
// list that takes one launch (the common case) is not copied.
template <typename Launch>
void multi_tensor_apply_reversed(const std::vector<TensorPiece>& pieces, Launch&& launch) {
  int64_t entries = 0;  // tensor table entries if nothing were cut
  for (const TensorPiece& p : pieces) entries += p.numel > 0 ? 1 : 0;
  if (entries <= kMaxTensors && count_blocks(pieces) <= kMaxBlocks) {
    multi_tensor_apply(pieces, launch);
    return;
  }
  struct Pending {
    TensorListMeta meta;
    int n_blocks;
    int64_t first_block;
  };
  std::vector<Pending> pending;
  multi_tensor_apply(pieces, [&](const TensorListMeta& meta, int n_blocks, int64_t first_block) {
    pending.push_back({meta, n_blocks, first_block});
  });
  for (auto it = pending.rbegin(); it != pending.rend(); ++it) launch(it->meta, it->n_blocks, it->first_block);
}

// The chunk of block `block` of a launch (blockIdx.x in the kernels; host and device code, so the
// chunking can be tested without a GPU: csrc/cuda/test/multi_tensor_apply_test.cpp).
// Forced inline: `meta` is the kernel argument and must stay in parameter space, not be copied to
// local memory.
struct BlockChunk {
  void* ptr;  // first element of the chunk
  int len;    // elements in the chunk, 1..kChunkElems
  DType dtype;
};

SEGCLIP_HOST_DEVICE BlockChunk block_chunk(const TensorListMeta& meta, int64_t block) {
  const int t = meta.block_tensor[block];
  const int64_t offset = (block - meta.first_block[t]) * kChunkElems;
  const DType dtype = meta.dtype[t];
  const int64_t left = meta.numel[t] - offset;
  BlockChunk c;
  c.ptr = static_cast<char*>(meta.ptr[t]) + offset * elem_size(dtype);
  c.len = static_cast<int>(left < kChunkElems ? left : kChunkElems);
  c.dtype = dtype;
  return c;
}

// NOTE: [persistent clip work split]
// The opt-in persistent clip (multi_tensor_kernels.cu, see note: [persistent clip]) runs the whole
// clip in one launch of `grid` co-resident blocks over ONE table (the list fits one launch). Its unit
// of work is a slice: kSliceElems elements of a chunk (a chunk of a table's block b holds slices
// b * kSlicesPerChunk .. + kSlicesPerChunk - 1; those past a short last chunk's end are empty). Block
// g owns the contiguous units [g * U / grid, (g + 1) * U / grid) of the U = n_blocks *
// kSlicesPerChunk units: sizes differ by at most one, each unit has exactly one owner, and a block's
// memory is one contiguous run (per tensor). The same split serves the norm and the scale, so each
// block scales what it read. Slices keep the chunk's alignment (kSliceElems is a multiple of every
// vector width).
constexpr int kSlicesPerChunk = 8;
constexpr int64_t kSliceElems = kChunkElems / kSlicesPerChunk;
static_assert(kChunkElems % kSlicesPerChunk == 0 && kSliceElems % (kVecBytes / 2) == 0,
              "a slice keeps every vector width's alignment");

struct UnitRange {
  int64_t begin;
  int64_t end;  // one past the last
};

SEGCLIP_HOST_DEVICE UnitRange persistent_units(int64_t total_units, int64_t grid, int64_t g) {
  return {g * total_units / grid, (g + 1) * total_units / grid};
}

// The slice of unit u (len 0 when it lies past its chunk's end).
SEGCLIP_HOST_DEVICE BlockChunk unit_slice(const TensorListMeta& meta, int64_t u) {
  BlockChunk c = block_chunk(meta, u / kSlicesPerChunk);
  const int64_t first = (u % kSlicesPerChunk) * kSliceElems;
  const int64_t left = c.len - first;
  c.ptr = static_cast<char*>(c.ptr) + (left > 0 ? first : 0) * elem_size(c.dtype);
  c.len = static_cast<int>(left <= 0 ? 0 : (left < kSliceElems ? left : kSliceElems));
  return c;
}

// How a chunk splits into a scalar head (elements before the first 16-byte-aligned address), whole
// 16-byte vectors, and a scalar tail. Every chunk of a tensor has the alignment of the tensor's data
// pointer (kChunkElems is a multiple of every vector width), so a misaligned view (x[1:]) costs only
// a few scalar elements per chunk and the rest stays vectorised. `p` must be aligned to the element
// size (the host refuses other tensors: multi_tensor_cuda.cpp, check_tensors), so the head is shorter
// than one vector and each of its elements gets a thread of its own.
struct VecSplit {
  int head;  // scalar elements first (< elements per vector)
  int nvec;  // whole vectors after the head
  int tail;  // index (from the chunk's start) of the first element after the vectors
  SEGCLIP_HOST_DEVICE VecSplit(const void* p, int elem_bytes, int len) {
    const int misalign = static_cast<int>(reinterpret_cast<uintptr_t>(p) % kVecBytes);
    const int h = misalign == 0 ? 0 : (kVecBytes - misalign) / elem_bytes;
    head = h < len ? h : len;
    nvec = (len - head) / (kVecBytes / elem_bytes);
    tail = head + nvec * (kVecBytes / elem_bytes);
  }
};

// 16 bytes of elements, loaded and stored as one vector.
template <typename S>
struct alignas(kVecBytes) Pack {
  static constexpr int kSize = kVecBytes / static_cast<int>(sizeof(S));
  S v[kSize];
};

// NOTE: [CUDA strided scale]
// A tensor with gaps in memory (x[:, ::2]) cannot be cut into flat chunks. The scale walks it by its
// sizes and strides instead: element i (in row-major order of the sizes) is at strided_offset(v, i)
// elements from ptr. make_strided_view first drops size-1 dimensions and merges each dimension into
// the next when they are contiguous with each other (stride[d] == size[d+1] * stride[d+1]), so a
// typical gappy view has 2 or 3 dimensions left. Scaling in place is only right when no two indices
// share an element; make_strided_view proves that with a sufficient test (sorted by stride, each
// stride exceeds the span of all smaller-stride dimensions) and returns false when it cannot, or
// when more than kMaxStridedDims dimensions are left: the caller then takes another path. Strides
// are in elements (never negative in PyTorch).
constexpr int kMaxStridedDims = 8;

struct StridedView {
  void* ptr;
  int64_t numel;
  int ndim;
  int64_t sizes[kMaxStridedDims];    // outermost first
  int64_t strides[kMaxStridedDims];  // in elements
  DType dtype;
};

inline bool make_strided_view(void* ptr, DType dtype, const int64_t* sizes, const int64_t* strides, int ndim,
                              StridedView* out) {
  StridedView v{};
  v.ptr = ptr;
  v.dtype = dtype;
  v.numel = 1;
  for (int d = ndim - 1; d >= 0; --d) {  // innermost first, so each kept dim can absorb the one outside it
    v.numel *= sizes[d];
    if (sizes[d] == 1) continue;
    if (v.ndim > 0 && strides[d] == v.sizes[v.ndim - 1] * v.strides[v.ndim - 1]) {
      v.sizes[v.ndim - 1] *= sizes[d];  // contiguous with the dimension inside it: merged
      continue;
    }
    if (v.ndim == kMaxStridedDims) return false;
    v.sizes[v.ndim] = sizes[d];
    v.strides[v.ndim] = strides[d];
    ++v.ndim;
  }
  for (int a = 0, b = v.ndim - 1; a < b; ++a, --b) {  // back to outermost first
    std::swap(v.sizes[a], v.sizes[b]);
    std::swap(v.strides[a], v.strides[b]);
  }
  int order[kMaxStridedDims];  // dimensions by increasing stride (insertion sort: at most 8)
  for (int k = 0; k < v.ndim; ++k) {
    int j = k;
    for (; j > 0 && v.strides[order[j - 1]] > v.strides[k]; --j) order[j] = order[j - 1];
    order[j] = k;
  }
  int64_t span = 0;  // largest offset reachable with the dimensions seen so far
  for (int k = 0; k < v.ndim; ++k) {
    const int d = order[k];
    if (v.strides[d] <= span) return false;  // may overlap (or an expanded, zero-stride view)
    span += (v.sizes[d] - 1) * v.strides[d];
  }
  *out = v;
  return true;
}

// Offset (in elements) of element i, counting in row-major order of v's sizes.
SEGCLIP_HOST_DEVICE int64_t strided_offset(const StridedView& v, int64_t i) {
  int64_t offset = 0;
  for (int d = v.ndim - 1; d >= 0; --d) {
    offset += (i % v.sizes[d]) * v.strides[d];
    i /= v.sizes[d];
  }
  return offset;
}


}  // namespace cuda
}  // namespace segclip
