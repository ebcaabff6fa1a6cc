// The interface between the ATen side (multi_tensor_cuda.cpp, compiled by the host compiler) and the
// kernels (multi_tensor_kernels.cu, compiled by nvcc). Plain C++: no ATen in the .cu file keeps its
// compile time short.
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>
#include <vector>

#include "multi_tensor_apply.cuh"

namespace segclip {
namespace cuda {

enum class NormKind { kL1, kL2, kLinf };

// kKernelParamBytes as nvcc saw it when compiling the kernels, see note: [kernel argument space].
int kernel_param_bytes();

// Bytes of device scratch launch_multi_tensor_norm needs for total_blocks blocks: a counter, then
// one double per block. See note: [last-block reduction].
constexpr int64_t kScratchHeaderBytes = 16;
inline int64_t norm_scratch_bytes(int64_t total_blocks) {
  return total_blocks == 0 ? 0 : kScratchHeaderBytes + total_blocks * static_cast<int64_t>(sizeof(double));
}

// Queues the norm of all pieces on `stream`: writes the norm to *norm_out and, when coef_out is not
// null, min(1, max_norm / (norm + 1e-6)) to *coef_out, both as double when out_double, else float.
// scratch: norm_scratch_bytes(count_blocks(pieces)) bytes of device memory, 16-byte aligned, only
// used by this call. Never synchronises with the host.
void launch_multi_tensor_norm(NormKind kind, const std::vector<TensorPiece>& pieces, void* scratch,
                              void* norm_out, void* coef_out, double max_norm, bool out_double,
                              cudaStream_t stream);

// Bytes of device scratch launch_multi_tensor_group_partials needs: the norm's, then one int32 (the
// slot's group) per block. See note: [group partials on CUDA] (multi_tensor_kernels.cu).
inline int64_t group_scratch_bytes(int64_t total_blocks) {
  if (total_blocks == 0) return 0;
  return norm_scratch_bytes(total_blocks) + total_blocks * static_cast<int64_t>(sizeof(int32_t));
}

// Queues the per-group partials of all pieces on `stream` (pieces[i] in group groups[i], 0 <= groups[i]
// < num_groups): out[g] the sum of |x|^p (max |x| for inf) over group g's pieces, out[num_groups]
// over all of them, as double; the last entry is bitwise what launch_multi_tensor_norm takes the root
// of. scratch: group_scratch_bytes(count_blocks(pieces)) bytes, 16-byte aligned, only used by this
// call. Never synchronises with the host.
void launch_multi_tensor_group_partials(NormKind kind, const std::vector<TensorPiece>& pieces,
                                        const std::vector<int32_t>& groups, int32_t num_groups, void* scratch,
                                        double* out, cudaStream_t stream);

// The persistent clip (see note: [persistent clip] in multi_tensor_kernels.cu): the grid it would
// use on `device` for these pieces (about 2 blocks per SM, never more than can be co-resident), and
// the launch itself, for pieces that fit one table, all flat and sharing no memory. Queues a memset
// and one cooperative launch that writes norm and coefficient (both non-null) and scales in place
// when the coefficient is < 1. scratch: norm_scratch_bytes(grid) bytes. Never synchronises.
int persistent_grid(const std::vector<TensorPiece>& pieces, int device);
void launch_persistent_clip(NormKind kind, const std::vector<TensorPiece>& pieces, int grid, void* scratch,
                            void* norm_out, void* coef_out, double max_norm, bool out_double, cudaStream_t stream);

// Queues pieces *= *coef on `stream` (coef: one device value of coef_dtype); writes nothing when
// *coef >= 1. Never synchronises with the host.
void launch_multi_tensor_scale(const std::vector<TensorPiece>& pieces, const void* coef, DType coef_dtype,
                               cudaStream_t stream);

// Queues v *= *coef on `stream` for one tensor with gaps in memory (see note: [CUDA strided scale]),
// with the rounding and the early exit of launch_multi_tensor_scale. Never synchronises.
void launch_strided_scale(const StridedView& v, const void* coef, DType coef_dtype, cudaStream_t stream);

}  // namespace cuda
}  // namespace segclip
