// CPU kernel of segclip::multi_tensor_clip_value_ (schema and contract: csrc/segclip.cpp, see note:
// [op contract]): clamp every element to [-c, c] in one parallel pass over all tensors.
#include "vec_capability.h"  // first: it selects at::vec's implementation, see note: [CPU vector width]

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <vector>

#include "../inplace_checks.h"
#include "../shared_memory.h"
#include "balanced_parallel.h"
#include "tensor_checks.h"

namespace segclip {
namespace {

using at::vec::Vectorized;

// Chunks as in multi_tensor_cpu.cpp (see note: [CPU chunking and determinism]); a clamp has no
// reduction, so only the work split matters here.
constexpr int64_t kChunkElems = int64_t{1} << 16;
constexpr int64_t kParallelMinElems = int64_t{1} << 17;

// NOTE: [value clip bound]
// torch's clip_grad_value_ clamps with -c and c converted to the tensor's dtype (through float for
// half/bfloat16: Scalar::to<Half> goes double -> float -> half; torch's CUDA foreach path clamps in
// float and rounds the result, which gives the same values). The result of a clamp is the element or
// the rounded bound, so clamping against the rounded bound in the op-math type gives torch's bits.
// A bound beyond the dtype's range rounds to inf: nothing is clamped (torch's CPU kernel raises
// "cannot be converted ... without overflow" there, its CUDA kernel clamps nothing).
template <typename scalar_t>
at::opmath_type<scalar_t> rounded_bound(double c) {
  using acc_t = at::opmath_type<scalar_t>;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return static_cast<acc_t>(c);
  } else {
    return static_cast<acc_t>(static_cast<scalar_t>(static_cast<float>(c)));
  }
}

// NOTE: [value clip writes]
// Only vectors holding an element beyond the bound are stored, and in them only those elements
// change (a blend, not min(max(x, lo), hi): at::vec's max of +0 and -0 may return either, and a
// stored vector must keep its other elements' bits). A gradient inside the bound is read, never
// written: the pass costs a read, and no cache line is dirtied. NaN compares false: never written.
template <typename V>
inline bool clamp_vec(V& x, const V& lo, const V& hi) {
  const V above = x > hi;
  const V below = x < lo;
  const V either = above | below;
  if (either.zero_mask() == (1 << V::size()) - 1) return false;  // every lane inside (or NaN)
  x = V::blendv(V::blendv(x, hi, above), lo, below);
  return true;
}

template <typename scalar_t>
void clamp_chunk(scalar_t* data, int64_t n, at::opmath_type<scalar_t> h) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecS = Vectorized<scalar_t>;
  using VecA = Vectorized<acc_t>;
  const VecA hi(h);
  const VecA lo(-h);
  constexpr int64_t kStep = VecS::size();
  int64_t i = 0;
  for (; i + kStep <= n; i += kStep) {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      VecA x = VecA::loadu(data + i);
      if (clamp_vec(x, lo, hi)) x.store(data + i);
    } else {  // half/bfloat16: two float vectors per load; converting back is exact
      auto [a, b] = at::vec::convert_to_float<scalar_t>(VecS::loadu(data + i));
      const bool wa = clamp_vec(a, lo, hi);
      const bool wb = clamp_vec(b, lo, hi);
      if (wa || wb) at::vec::convert_from_float<scalar_t>(a, b).store(data + i);
    }
  }
  for (; i < n; ++i) {
    const acc_t x = static_cast<acc_t>(data[i]);
    if (x > h) {
      data[i] = static_cast<scalar_t>(h);
    } else if (x < -h) {
      data[i] = static_cast<scalar_t>(-h);
    }
  }
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

void clamp_all(const std::vector<at::Tensor>& ts, double c) {
  std::vector<Chunk> chunks;
  int64_t total = 0;
  for (int64_t t = 0; t < static_cast<int64_t>(ts.size()); ++t) {
    const int64_t n = ts[t].numel();
    total += n;
    for (int64_t b = 0; b < n; b += kChunkElems) chunks.push_back({t, b, std::min(n, b + kChunkElems)});
  }
  std::vector<int64_t> sizes(chunks.size());
  for (size_t k = 0; k < chunks.size(); ++k) sizes[k] = chunks[k].end - chunks[k].begin;
  // the threads' shares cut by elements: see note: [balanced split] in balanced_parallel.h
  parallel_for_weighted(sizes, total >= kParallelMinElems, kChunkElems, [&](int64_t k) {
    const Chunk& ch = chunks[k];
    const at::Tensor& t = ts[ch.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "segclip_clip_value_cpu", [&] {
      clamp_chunk<scalar_t>(t.mutable_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin, rounded_bound<scalar_t>(c));
    });
  });
}

void multi_tensor_clip_value_cpu(at::TensorList tensors, double clip_value) {
  const char* op = "segclip::multi_tensor_clip_value_";
  TORCH_CHECK(clip_value >= 0, op, ": clip_value must be a non-negative number, got ", clip_value);
  const double c = clip_value + 0.0;  // -0.0 -> +0.0: the lower bound is then -0.0, as torch's -clip_value
  std::vector<at::Tensor> flat;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // see note: [tensors that share memory]
  std::vector<at::Tensor> strided;
  for (size_t i = 0; i < tensors.size(); ++i) {  // every check before the first write
    const at::Tensor& t = tensors[i];
    check_cpu_tensor(t, op, "tensors", i);
    check_scalable(t, i, op);
    if (t.numel() == 0) continue;
    if (is_flat(t)) {
      flat.push_back(t);
      ranges.push_back(byte_range(t));
    } else {
      strided.push_back(t);
    }
  }
  // Entries that share memory are clamped one after another (a clamp is idempotent, but two threads
  // writing one element is still a data race).
  if (any_ranges_intersect(std::move(ranges))) {
    for (const at::Tensor& t : flat) clamp_all({t}, c);
  } else {
    clamp_all(flat, c);
  }
  for (const at::Tensor& t : strided) {  // views with gaps: torch's own clamp, with the rounded bound
    const double h = AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "segclip_bound",
                                                     [&] { return static_cast<double>(rounded_bound<scalar_t>(c)); });
    if (std::isinf(h)) continue;  // nothing can exceed it (and converting it would raise)
    t.clamp_min_(-h).clamp_max_(h);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CPU, m) { m.impl("multi_tensor_clip_value_", &multi_tensor_clip_value_cpu); }

}  // namespace segclip
