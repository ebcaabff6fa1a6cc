// CUDA kernels for segclip's ops: the multi-tensor norm (with its final reduction and the clip
// coefficient) and the multi-tensor scale. The op contract: csrc/segclip.cpp, see note: [op contract].
// The ATen side (argument checks, outputs, scratch, streams): multi_tensor_cuda.cpp.
//
// Compile time: four kernels (three norm types + scale), each switching on the element type at run
// time (one dtype per block, so the branch is uniform) instead of one template instance per dtype.
#include "multi_tensor_kernels.h"
#include "multi_tensor_math.cuh"
#include "block_reduce.cuh"

#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace segclip {
namespace cuda {
namespace {

// Minimum resident blocks per SM, i.e. register caps (65536 / (n * 512) per thread). Without one,
// ptxas aims at 32 registers on sm_90 and spills in scale_kernel; with 3 (cap 40) the norm kernels
// spill on sm_80. 2 blocks (1024 threads, 32 KiB of 16-byte loads in flight per SM) are plenty for
// a memory-bound kernel. `-Xptxas -v`: 0 bytes spilled everywhere.
// Turing (sm_75) holds 1024 threads per SM, so at most 2 of our blocks (ptxas ignores a larger minimum,
// with a warning). The other targets hold 2048, or 1536 on sm_86/sm_89, which run the sm_80 code.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 750
constexpr int kMaxThreadsPerSm = 1024;
#else
constexpr int kMaxThreadsPerSm = 1536;
#endif
constexpr int min_blocks_per_sm(int wanted) {
  return wanted * kBlockThreads <= kMaxThreadsPerSm ? wanted : kMaxThreadsPerSm / kBlockThreads;
}
constexpr int kNormMinBlocksPerSm = min_blocks_per_sm(2);
constexpr int kScaleMinBlocksPerSm = min_blocks_per_sm(3);

// NOTE: [CUDA determinism]
// The norm is bitwise identical on every call with the same inputs:
//   * chunk boundaries and the block -> chunk mapping depend only on the tensors' sizes,
//     see note: [CUDA chunking and launches];
//   * inside a block, each thread's elements and the order it accumulates them in are fixed by
//     threadIdx.x, and the block's threads are combined by a fixed shuffle/shared-memory tree;
//   * each block writes its partial to its own slot, and one block combines the slots in a fixed
//     order, see note: [last-block reduction]. Which block is last varies from run to run, but it
//     does the same arithmetic in the same order.
// There are no floating-point atomics anywhere (the only atomic counts blocks).

// The calling block's partial: its chunk's sum of |x|^p, or max |x|. Valid in thread 0.
// Each thread accumulates its 128 elements in its op-math type (float; double for double), and the
// block's 512 thread partials are combined in double: a float sum over the whole chunk would
// overflow to inf for |x| above about 7e16 (65536 squares); now only a thread's 128 squares are
// summed in float (inf above about 1.6e18, close to the CPU kernel's limit, which also sums a few
// dozen vector loads in float). A few double shuffles per 64K elements cost nothing measurable.
template <NormKind K>
__device__ __forceinline__ double block_partial(const TensorListMeta& meta) {
  const BlockChunk c = block_chunk(meta, blockIdx.x);
  double v = 0.0;
  switch (c.dtype) {  // uniform across the block
    case DType::kHalf: v = thread_partial<K, HalfT>(c.ptr, c.len, threadIdx.x); break;
    case DType::kBFloat16: v = thread_partial<K, BFloat16T>(c.ptr, c.len, threadIdx.x); break;
    case DType::kFloat: v = thread_partial<K, FloatT>(c.ptr, c.len, threadIdx.x); break;
    case DType::kDouble: v = thread_partial<K, DoubleT>(c.ptr, c.len, threadIdx.x); break;
  }
  return block_reduce<K>(v);
}

struct NormParams {
  unsigned int* counter;  // blocks done over all launches; zeroed before the first launch
  double* partials;       // one slot per block over all launches
  void* norm_out;         // float or double (out_double)
  void* coef_out;         // same dtype, or null: no coefficient
  double max_norm;
  int64_t first_block;    // this launch's first slot
  int64_t total_blocks;   // blocks over all launches; 0: no element at all
  bool out_double;
};
static_assert(sizeof(NormParams) <= kMaxExtraParamBytes, "see kMaxExtraParamBytes");

// Run by the last block only: combines all slots in a fixed order, writes norm and coefficient.
template <NormKind K>
__device__ __forceinline__ void finalize(const NormParams& p) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < p.total_blocks; i += kBlockThreads) {
    acc = combine<K>(acc, __ldcg(p.partials + i));  // L2, never a stale L1 line
  }
  acc = block_reduce<K>(acc);
  if (threadIdx.x != 0) return;
  const double total = K == NormKind::kL2 ? sqrt(acc) : acc;
  if (p.out_double) {
    *static_cast<double*>(p.norm_out) = total;
    if (p.coef_out != nullptr) *static_cast<double*>(p.coef_out) = clip_coefficient(total, p.max_norm);
  } else {
    const float norm = static_cast<float>(total);
    *static_cast<float*>(p.norm_out) = norm;
    if (p.coef_out != nullptr) {
      *static_cast<float*>(p.coef_out) = clip_coefficient(norm, static_cast<float>(p.max_norm));
    }
  }
}

// NOTE: [last-block reduction]
// The norm needs every block's partial before it can finish, without a host synchronisation and
// without a second pass over the data. Each block writes its partial (a double, see block_partial)
// to slot first_block + blockIdx.x of one buffer that spans all launches of the call, makes it
// visible device-wide (__threadfence, the release), then increments a counter (a relaxed atomicAdd).
// The block that brings the counter to total_blocks is the last one: its thread 0 fences again right
// after the atomic (the acquire: a fence after the read that observed every other block's release),
// so every other partial is visible to it and, after __syncthreads, to its whole block; it combines
// all slots (finalize) and writes the norm and the coefficient. Launches of one call run in stream order, so the last block is in the last launch,
// and the final step runs once per call whatever the number of launches.
// The counter and the slots come from the caching allocator per call (the counter zeroed by a
// cudaMemsetAsync on the same stream): no state survives a call, concurrent calls on different
// streams cannot interfere, and both are capturable in a CUDA graph (memset node + kernel nodes).
// When the list holds no element at all, one block runs finalize alone (norm 0).
// Bitwise reproducible, see note: [CUDA determinism].
// The release/count/acquire step of note: [last-block reduction], for the norm and the per-group
// partials: thread 0 stores the block's partial (valid in thread 0) to partials[slot] and, when
// slot_group is not null, the block's group to slot_group[slot]; returns, in every thread, whether
// this block is the last of total_blocks. Synchronises the block.
__device__ __forceinline__ bool publish_partial(double partial, int64_t slot, double* partials, int32_t* slot_group,
                                                int32_t group, unsigned int* counter, int64_t total_blocks) {
  __shared__ bool is_last;
  if (threadIdx.x == 0) {
    partials[slot] = partial;
    if (slot_group != nullptr) slot_group[slot] = group;
    __threadfence();  // release: the partial is visible device-wide before the count says so
    const unsigned int done_before = atomicAdd(counter, 1u);  // relaxed
    is_last = done_before == static_cast<unsigned int>(total_blocks - 1);
    // Acquire, in the thread that observed the count: with the other blocks' release fences, every
    // partial counted is visible to this thread, and through the barrier below to its whole block.
    if (is_last) __threadfence();
  }
  __syncthreads();  // also separates block_partial's and the finish's use of shared memory
  return is_last;
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads, kNormMinBlocksPerSm) norm_kernel(const TensorListMeta meta, const NormParams p) {
  if (p.total_blocks > 0) {
    const double partial = block_partial<K>(meta);
    if (!publish_partial(partial, p.first_block + blockIdx.x, p.partials, nullptr, 0, p.counter, p.total_blocks)) {
      return;
    }
  }
  finalize<K>(p);
}

// NOTE: [group partials on CUDA]
// multi_tensor_group_partials is the norm kernel with a group per block: the same chunks, the same
// block partials in the same slots (block numbers over all launches, in list order), the same
// release/count/acquire, so the same last block. Each block learns its group from its launch's runs
// (see note: [group runs]) and stores it beside its partial (slot_group[slot]). The last block then
//   * combines all slots exactly as the norm's finalize does (thread-strided, then block_reduce): the
//     total is bitwise the value multi_tensor_norm takes the root of;
//   * computes group g in warp g % kWarps: lane-strided over all slots, those of group g combined,
//     then a fixed shuffle tree. Deterministic; it reads num_groups / kWarps * total_blocks / 32
//     slots per lane (small: a few groups, or a per-layer group for each of a few hundred tensors).
// No memset of the output: the last block writes every entry (0 for a group without elements).
struct GroupParams {
  unsigned int* counter;  // blocks done over all launches; zeroed before the first launch
  double* partials;       // one slot per block over all launches
  int32_t* slot_group;    // the group of each slot
  double* out;            // num_groups + 1 doubles: per group, then the total
  int64_t first_block;    // this launch's first slot
  int64_t total_blocks;   // blocks over all launches; 0: no element at all
  int32_t num_groups;
};
static_assert(sizeof(TensorListMeta) + sizeof(GroupRuns) + sizeof(GroupParams) + 16 <= kKernelParamLimit,
              "group kernel arguments exceed their space, see note: [group runs]");

template <NormKind K>
__device__ __forceinline__ void finalize_groups(const GroupParams& p) {
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < p.total_blocks; i += kBlockThreads) {
    acc = combine<K>(acc, __ldcg(p.partials + i));  // as finalize: the norm's total, bitwise
  }
  acc = block_reduce<K>(acc);
  if (threadIdx.x == 0) p.out[p.num_groups] = acc;
  const int lane = threadIdx.x % kWarpSize;
  for (int32_t g = threadIdx.x / kWarpSize; g < p.num_groups; g += kWarps) {  // uniform within a warp
    double v = 0.0;
    for (int64_t i = lane; i < p.total_blocks; i += kWarpSize) {
      if (__ldcg(p.slot_group + i) == g) v = combine<K>(v, __ldcg(p.partials + i));
    }
    v = warp_allreduce<K>(v);
    if (lane == 0) p.out[g] = v;
  }
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads, kNormMinBlocksPerSm)
    group_partials_kernel(const TensorListMeta meta, const GroupRuns runs, const GroupParams p) {
  if (p.total_blocks > 0) {
    const double partial = block_partial<K>(meta);
    const int32_t group = threadIdx.x == 0 ? group_of_entry(runs, meta.block_tensor[blockIdx.x]) : 0;
    if (!publish_partial(partial, p.first_block + blockIdx.x, p.partials, p.slot_group, group, p.counter,
                         p.total_blocks)) {
      return;
    }
  }
  finalize_groups<K>(p);
}

__device__ __forceinline__ double load_coef(const void* coef, DType dtype) {
  switch (dtype) {
    case DType::kHalf: return __half2float(*static_cast<const __half*>(coef));
    case DType::kBFloat16: return __bfloat162float(*static_cast<const __nv_bfloat16*>(coef));
    case DType::kFloat: return *static_cast<const float*>(coef);
    case DType::kDouble: break;
  }
  return *static_cast<const double*>(coef);
}

// NOTE: [scale: nothing to clip]
// The coefficient is read from device memory by every block (it is usually the output of the norm
// op just queued, so its value is unknown on the host). A block whose coefficient is >= 1 returns
// before touching its chunk: a step that needs no clipping reads and writes no gradient, the whole
// launch costs a few microseconds. NaN is not >= 1, so a NaN coefficient scales (to NaN), as torch.
// The coefficient is read exactly (as double); tensors multiply by it converted to their op-math
// type: double for double tensors, float otherwise.
//
// NOTE: [scale in reverse]
// The scale usually follows the norm over the same list, which read it front to back: the end of the
// list is what is left in L2 (up to 50 MB on an H100/H200). So the scale walks the list back to front:
// its launches go out last table first (multi_tensor_apply_reversed), and block b of a launch takes
// the launch's chunk n_blocks - 1 - b (blocks are dispatched roughly in blockIdx order). Its first
// reads then hit L2 instead of HBM. Each chunk is still scaled once, by one block, with the same
// arithmetic: only the order changes. (On the CPU a backward scale measured no gain: not done there.)
__global__ void __launch_bounds__(kBlockThreads, kScaleMinBlocksPerSm) scale_kernel(const TensorListMeta meta, const void* coef,
                                                              DType coef_dtype) {
  const double c = load_coef(coef, coef_dtype);
  if (c >= 1.0) return;
  const BlockChunk ch = block_chunk(meta, gridDim.x - 1 - blockIdx.x);  // see note: [scale in reverse]
  switch (ch.dtype) {
    case DType::kHalf: scale_chunk<HalfT>(ch.ptr, ch.len, static_cast<float>(c), threadIdx.x); return;
    case DType::kBFloat16: scale_chunk<BFloat16T>(ch.ptr, ch.len, static_cast<float>(c), threadIdx.x); return;
    case DType::kFloat: scale_chunk<FloatT>(ch.ptr, ch.len, static_cast<float>(c), threadIdx.x); return;
    case DType::kDouble: scale_chunk<DoubleT>(ch.ptr, ch.len, c, threadIdx.x); return;
  }
}

// One tensor with gaps in memory, walked by its sizes and strides, see note: [CUDA strided scale].
// The same early exit and the same rounding as scale_kernel.
__global__ void __launch_bounds__(kBlockThreads) strided_scale_kernel(const StridedView v, const void* coef,
                                                                      DType coef_dtype) {
  const double c = load_coef(coef, coef_dtype);
  if (c >= 1.0) return;
  const int64_t step = static_cast<int64_t>(gridDim.x) * kBlockThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kBlockThreads + threadIdx.x; i < v.numel; i += step) {
    char* p = static_cast<char*>(v.ptr) + strided_offset(v, i) * elem_size(v.dtype);
    switch (v.dtype) {  // uniform across the grid
      case DType::kHalf: scale_element<HalfT>(reinterpret_cast<uint16_t*>(p), static_cast<float>(c)); break;
      case DType::kBFloat16: scale_element<BFloat16T>(reinterpret_cast<uint16_t*>(p), static_cast<float>(c)); break;
      case DType::kFloat: scale_element<FloatT>(reinterpret_cast<float*>(p), static_cast<float>(c)); break;
      case DType::kDouble: scale_element<DoubleT>(reinterpret_cast<double*>(p), c); break;
    }
  }
}

// NOTE: [persistent clip]
// An opt-in alternative to memset + norm launches + scale launches for a list that fits in L2 and in
// one table: ONE cooperative launch of `grid` blocks (about 2 per SM, all co-resident: the
// cooperative launch guarantees it or fails, so the grid barrier below cannot deadlock). Each block
// takes its units (see note: [persistent clip work split]):
//   1. norm: its units' partial, to slot blockIdx.x; release fence; counter += 1;
//   2. grid barrier: thread 0 spins until the counter reaches gridDim.x, then an acquire fence;
//   3. every block combines all gridDim.x slots in the same fixed order (so all compute the same
//      norm and coefficient, bitwise, with no second barrier); block 0 writes norm and coefficient;
//   4. scale: when the coefficient is < 1, its own units again, last first, while they are in L2.
// The counter is zeroed by a memset before the launch (capturable, like the norm's). Deterministic
// for a given grid (which depends only on the device); the norm's summation grouping differs from
// the multi-launch path's, so the two may differ in the last bits. Not the default: it has not yet
// been shown correct and faster on a GPU (multi_tensor_cuda.cpp: SEGCLIP_CUDA_PERSISTENT=1).
struct PersistentParams {
  unsigned int* counter;  // zeroed before the launch
  double* partials;       // gridDim.x slots
  void* norm_out;
  void* coef_out;
  double max_norm;
  int64_t total_units;
  bool out_double;
};
static_assert(sizeof(PersistentParams) <= kMaxExtraParamBytes, "see kMaxExtraParamBytes");

template <NormKind K>
__device__ __forceinline__ double units_partial(const TensorListMeta& meta, UnitRange r) {
  double v = 0.0;
#pragma unroll 1
  for (int64_t u = r.begin; u < r.end; ++u) {
    const BlockChunk c = unit_slice(meta, u);
    switch (c.dtype) {  // uniform across the block
      case DType::kHalf: v = combine<K>(v, double(thread_partial<K, HalfT>(c.ptr, c.len, threadIdx.x))); break;
      case DType::kBFloat16: v = combine<K>(v, double(thread_partial<K, BFloat16T>(c.ptr, c.len, threadIdx.x))); break;
      case DType::kFloat: v = combine<K>(v, double(thread_partial<K, FloatT>(c.ptr, c.len, threadIdx.x))); break;
      case DType::kDouble: v = combine<K>(v, thread_partial<K, DoubleT>(c.ptr, c.len, threadIdx.x)); break;
    }
  }
  return v;
}

template <NormKind K>
__global__ void __launch_bounds__(kBlockThreads, kNormMinBlocksPerSm)
    persistent_clip_kernel(const TensorListMeta meta, const PersistentParams p) {
  __shared__ double coef_shared;
  const UnitRange r = persistent_units(p.total_units, gridDim.x, blockIdx.x);
  const double partial = block_reduce<K>(units_partial<K>(meta, r));
  if (threadIdx.x == 0) {
    p.partials[blockIdx.x] = partial;
    __threadfence();  // release: the partial before the count
    atomicAdd(p.counter, 1u);
    while (atomicAdd(p.counter, 0u) < gridDim.x) __nanosleep(32);  // grid barrier (all co-resident)
    __threadfence();  // acquire: every counted partial is visible from here on
  }
  __syncthreads();  // the barrier for the block; also separates block_reduce's shared memory uses
  double acc = 0.0;
  for (int64_t i = threadIdx.x; i < gridDim.x; i += kBlockThreads) acc = combine<K>(acc, __ldcg(p.partials + i));
  acc = block_reduce<K>(acc);
  if (threadIdx.x == 0) {
    const double total = K == NormKind::kL2 ? sqrt(acc) : acc;
    double c;
    if (p.out_double) {
      c = clip_coefficient(total, p.max_norm);
      if (blockIdx.x == 0) {
        *static_cast<double*>(p.norm_out) = total;
        *static_cast<double*>(p.coef_out) = c;
      }
    } else {
      const float norm = static_cast<float>(total);
      const float cf = clip_coefficient(norm, static_cast<float>(p.max_norm));
      c = cf;
      if (blockIdx.x == 0) {
        *static_cast<float*>(p.norm_out) = norm;
        *static_cast<float*>(p.coef_out) = cf;
      }
    }
    coef_shared = c;
  }
  __syncthreads();
  const double c = coef_shared;
  if (c >= 1.0) return;  // nothing to clip (NaN scales), see note: [scale: nothing to clip]
#pragma unroll 1
  for (int64_t u = r.end - 1; u >= r.begin; --u) {  // last read first: still in L2
    const BlockChunk ch = unit_slice(meta, u);
    switch (ch.dtype) {
      case DType::kHalf: scale_chunk<HalfT>(ch.ptr, ch.len, static_cast<float>(c), threadIdx.x); break;
      case DType::kBFloat16: scale_chunk<BFloat16T>(ch.ptr, ch.len, static_cast<float>(c), threadIdx.x); break;
      case DType::kFloat: scale_chunk<FloatT>(ch.ptr, ch.len, static_cast<float>(c), threadIdx.x); break;
      case DType::kDouble: scale_chunk<DoubleT>(ch.ptr, ch.len, c, threadIdx.x); break;
    }
  }
}

// One memset, then one launch per full table, see note: [CUDA chunking and launches].
template <NormKind K>
void launch_norm(const std::vector<TensorPiece>& pieces, NormParams p, cudaStream_t stream) {
  if (p.total_blocks == 0) {  // no element: finalize alone
    norm_kernel<K><<<1, kBlockThreads, 0, stream>>>(TensorListMeta{}, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  C10_CUDA_CHECK(cudaMemsetAsync(p.counter, 0, sizeof(unsigned int), stream));
  multi_tensor_apply(pieces, [&](const TensorListMeta& meta, int n_blocks, int64_t first_block) {
    p.first_block = first_block;
    norm_kernel<K><<<n_blocks, kBlockThreads, 0, stream>>>(meta, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

template <NormKind K>
void launch_groups(const std::vector<TensorPiece>& pieces, const std::vector<int32_t>& groups, GroupParams p,
                   cudaStream_t stream) {
  if (p.total_blocks == 0) {  // no element: finalize_groups alone (zeros)
    group_partials_kernel<K><<<1, kBlockThreads, 0, stream>>>(TensorListMeta{}, GroupRuns{}, p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  C10_CUDA_CHECK(cudaMemsetAsync(p.counter, 0, sizeof(unsigned int), stream));
  multi_tensor_apply_grouped(pieces, groups,
                             [&](const TensorListMeta& meta, const GroupRuns& runs, int n_blocks, int64_t first_block) {
                               p.first_block = first_block;
                               group_partials_kernel<K><<<n_blocks, kBlockThreads, 0, stream>>>(meta, runs, p);
                               C10_CUDA_KERNEL_LAUNCH_CHECK();
                             });
}

}  // namespace

int kernel_param_bytes() { return kKernelParamBytes; }

void launch_multi_tensor_group_partials(NormKind kind, const std::vector<TensorPiece>& pieces,
                                        const std::vector<int32_t>& groups, int32_t num_groups, void* scratch,
                                        double* out, cudaStream_t stream) {
  TORCH_CHECK(groups.size() == pieces.size(), "segclip: one group per piece");
  GroupParams p{};
  p.total_blocks = count_blocks(pieces);
  TORCH_CHECK(p.total_blocks < int64_t{0xffffffff}, "segclip: too many chunks (", p.total_blocks, ")");
  TORCH_CHECK(p.total_blocks == 0 || scratch != nullptr, "segclip: group scratch missing");
  char* base = static_cast<char*>(scratch);
  p.counter = reinterpret_cast<unsigned int*>(base);
  p.partials = reinterpret_cast<double*>(base + kScratchHeaderBytes);
  p.slot_group = reinterpret_cast<int32_t*>(base + norm_scratch_bytes(p.total_blocks));
  p.out = out;
  p.num_groups = num_groups;
  switch (kind) {
    case NormKind::kL1: launch_groups<NormKind::kL1>(pieces, groups, p, stream); break;
    case NormKind::kL2: launch_groups<NormKind::kL2>(pieces, groups, p, stream); break;
    case NormKind::kLinf: launch_groups<NormKind::kLinf>(pieces, groups, p, stream); break;
  }
}

void launch_multi_tensor_norm(NormKind kind, const std::vector<TensorPiece>& pieces, void* scratch,
                              void* norm_out, void* coef_out, double max_norm, bool out_double,
                              cudaStream_t stream) {
  NormParams p{};
  p.total_blocks = count_blocks(pieces);
  TORCH_CHECK(p.total_blocks < int64_t{0xffffffff}, "segclip: too many chunks (", p.total_blocks, ")");
  TORCH_CHECK(p.total_blocks == 0 || scratch != nullptr, "segclip: norm scratch missing");
  p.counter = static_cast<unsigned int*>(scratch);
  p.partials = reinterpret_cast<double*>(static_cast<char*>(scratch) + kScratchHeaderBytes);
  p.norm_out = norm_out;
  p.coef_out = coef_out;
  p.max_norm = max_norm;
  p.out_double = out_double;
  switch (kind) {
    case NormKind::kL1: launch_norm<NormKind::kL1>(pieces, p, stream); break;
    case NormKind::kL2: launch_norm<NormKind::kL2>(pieces, p, stream); break;
    case NormKind::kLinf: launch_norm<NormKind::kLinf>(pieces, p, stream); break;
  }
}

template <NormKind K>
cudaError_t launch_persistent(const TensorListMeta& meta, int grid, const PersistentParams& p, cudaStream_t stream) {
  void* args[] = {const_cast<TensorListMeta*>(&meta), const_cast<PersistentParams*>(&p)};
  return cudaLaunchCooperativeKernel(reinterpret_cast<const void*>(&persistent_clip_kernel<K>), dim3(grid),
                                     dim3(kBlockThreads), args, 0, stream);
}

int persistent_grid(const std::vector<TensorPiece>& pieces, int device) {
  int sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // the three kernels have the same launch bounds and shared memory; the L2 one stands for all
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &per_sm, reinterpret_cast<const void*>(&persistent_clip_kernel<NormKind::kL2>), kBlockThreads, 0));
  const int64_t units = count_blocks(pieces) * kSlicesPerChunk;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(units, int64_t{std::min(per_sm, 2)} * sms)));
}

void launch_persistent_clip(NormKind kind, const std::vector<TensorPiece>& pieces, int grid, void* scratch,
                            void* norm_out, void* coef_out, double max_norm, bool out_double, cudaStream_t stream) {
  int launches = 0;
  TensorListMeta table{};
  int n_blocks = 0;
  multi_tensor_apply(pieces, [&](const TensorListMeta& meta, int n, int64_t) {
    ++launches;
    table = meta;
    n_blocks = n;
  });
  TORCH_CHECK(launches == 1, "segclip: the persistent clip takes a list that fits one table");
  PersistentParams p{};
  p.counter = static_cast<unsigned int*>(scratch);
  p.partials = reinterpret_cast<double*>(static_cast<char*>(scratch) + kScratchHeaderBytes);
  p.norm_out = norm_out;
  p.coef_out = coef_out;
  p.max_norm = max_norm;
  p.total_units = int64_t{n_blocks} * kSlicesPerChunk;
  p.out_double = out_double;
  C10_CUDA_CHECK(cudaMemsetAsync(p.counter, 0, sizeof(unsigned int), stream));
  cudaError_t err = cudaSuccess;
  switch (kind) {
    case NormKind::kL1: err = launch_persistent<NormKind::kL1>(table, grid, p, stream); break;
    case NormKind::kL2: err = launch_persistent<NormKind::kL2>(table, grid, p, stream); break;
    case NormKind::kLinf: err = launch_persistent<NormKind::kLinf>(table, grid, p, stream); break;
  }
  C10_CUDA_CHECK(err);
}

void launch_multi_tensor_scale(const std::vector<TensorPiece>& pieces, const void* coef, DType coef_dtype,
                               cudaStream_t stream) {
  multi_tensor_apply_reversed(pieces, [&](const TensorListMeta& meta, int n_blocks, int64_t /*first_block*/) {
    scale_kernel<<<n_blocks, kBlockThreads, 0, stream>>>(meta, coef, coef_dtype);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void launch_strided_scale(const StridedView& v, const void* coef, DType coef_dtype, cudaStream_t stream) {
  if (v.numel == 0) return;
  constexpr int64_t kMaxStridedBlocks = 4096;  // a grid-stride loop covers the rest
  const int64_t blocks = std::min<int64_t>((v.numel + kBlockThreads - 1) / kBlockThreads, kMaxStridedBlocks);
  strided_scale_kernel<<<static_cast<unsigned int>(blocks), kBlockThreads, 0, stream>>>(v, coef, coef_dtype);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace segclip
