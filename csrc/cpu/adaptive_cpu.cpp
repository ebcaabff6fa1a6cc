// CPU kernel of segclip::multi_tensor_adaptive_clip_ (schema and contract: csrc/segclip.cpp, see note:
// [op contract]): unit-wise adaptive gradient clipping over all (weight, grad) pairs in one parallel
// pass, instead of about eight ATen ops per parameter.
#include "vec_capability.h"  // first: it selects at::vec's implementation, see note: [CPU vector width]

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "../adaptive_checks.h"
#include "../inplace_checks.h"
#include "../shared_memory.h"
#include "balanced_parallel.h"
#include "tensor_checks.h"

namespace segclip {
namespace {

using at::vec::Vectorized;

// NOTE: [adaptive clip work split]
// A unit is a row of a contiguous tensor: rows = size(0) and row length numel / size(0) for two or
// more dimensions, one row of numel elements otherwise. The work items are runs of whole rows of one
// (weight, grad) pair of about kItemElems elements (at least one row); one parallel region runs over
// the items of all pairs. Per row, both norms are taken, then the row is scaled while it is still in
// cache. Each row's arithmetic is sequential in a fixed order: bitwise reproducible for every
// thread count.
constexpr int64_t kItemElems = int64_t{1} << 14;
constexpr int64_t kParallelMinElems = int64_t{1} << 17;
// Vector loads summed in op-math before the block's sum is added in double, see note: [CPU
// accumulation precision] in multi_tensor_cpu.cpp.
constexpr int64_t kBlockLoads = 32;
constexpr double kGradNormFloor = 1e-6;  // timm: grad_norm.clamp(min=1e-6)

enum class NormKind { kL1, kL2, kLinf };

// norm_type is one of the three (check_adaptive_arguments).
NormKind norm_kind(double norm_type) {
  if (norm_type == 2.0) return NormKind::kL2;
  return norm_type == 1.0 ? NormKind::kL1 : NormKind::kLinf;
}

template <NormKind K, typename T>
inline T combine(T a, T b) {
  if constexpr (K == NormKind::kLinf) {
    return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<T>::quiet_NaN() : std::max(a, b);
  } else {
    return a + b;
  }
}

template <NormKind K, typename V>
inline V accumulate(const V& acc, const V& x) {
  if constexpr (K == NormKind::kL2) {
    return at::vec::fmadd(x, x, acc);
  } else if constexpr (K == NormKind::kL1) {
    return acc + x.abs();
  } else {
    return at::vec::maximum(acc, x.abs());  // propagates NaN
  }
}

template <NormKind K>
inline double scalar_term(double x) {
  return K == NormKind::kL2 ? x * x : std::abs(x);
}

// The norm of one row of n elements, accumulated as described above; returned in double.
template <NormKind K, typename scalar_t>
double row_norm(const scalar_t* data, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using VecS = Vectorized<scalar_t>;
  using VecA = Vectorized<acc_t>;
  constexpr int64_t kStep = VecS::size();
  double total = 0.0;
  int64_t i = 0;
  while (i + kStep <= n) {
    VecA acc0(acc_t(0));
    VecA acc1(acc_t(0));
    const int64_t block_end = std::min(n, i + kStep * kBlockLoads);
    for (; i + kStep <= block_end; i += kStep) {
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        acc0 = accumulate<K>(acc0, VecA::loadu(data + i));
      } else {
        auto [a, b] = at::vec::convert_to_float<scalar_t>(VecS::loadu(data + i));
        acc0 = accumulate<K>(acc0, a);
        acc1 = accumulate<K>(acc1, b);
      }
    }
    const VecA acc = K == NormKind::kLinf ? at::vec::maximum(acc0, acc1) : acc0 + acc1;
    acc_t lanes[VecA::size()];
    acc.store(lanes);
    for (int64_t l = 0; l < VecA::size(); ++l) total = combine<K>(total, static_cast<double>(lanes[l]));
  }
  for (; i < n; ++i) total = combine<K>(total, scalar_term<K>(static_cast<double>(data[i])));
  return K == NormKind::kL2 ? std::sqrt(total) : total;
}

template <typename scalar_t>
void scale_row(scalar_t* data, int64_t n, at::opmath_type<scalar_t> coef) {
  using Vec = Vectorized<at::opmath_type<scalar_t>>;
  at::vec::map([coef](Vec x) { return x * Vec(coef); }, data, data, n);  // half/bf16: rounded once
}

// Clips rows [row_begin, row_end) of one pair; returns whether any row was written.
template <NormKind K, typename scalar_t>
bool clip_rows(const scalar_t* w, scalar_t* g, int64_t len, int64_t row_begin, int64_t row_end, double clip_factor,
               double eps) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t cf = static_cast<acc_t>(clip_factor);
  const acc_t e = static_cast<acc_t>(eps);
  const acc_t floor = static_cast<acc_t>(kGradNormFloor);
  bool wrote = false;
  for (int64_t r = row_begin; r < row_end; ++r) {
    const acc_t wn = static_cast<acc_t>(row_norm<K>(w + r * len, len));
    const acc_t gn = static_cast<acc_t>(row_norm<K>(g + r * len, len));
    const acc_t max_norm = std::max(wn, e) * cf;  // NaN stays NaN (std::max returns its first argument)
    if (gn < max_norm) continue;                   // NaN compares false: that unit becomes NaN, as in timm
    scale_row(g + r * len, len, max_norm / std::max(gn, floor));
    wrote = true;
  }
  return wrote;
}

struct Pair {
  at::Tensor w;     // contiguous (a packed copy when the weight is not)
  at::Tensor g;     // contiguous: the gradient itself, or a packed copy written back afterwards
  at::Tensor orig;  // the gradient when g is a packed copy, else undefined
  int64_t rows;
  int64_t len;
};

struct Item {
  int64_t pair;
  int64_t row_begin;
  int64_t row_end;
};

template <NormKind K>
void clip_pairs(const std::vector<Pair>& pairs, double clip_factor, double eps) {
  std::vector<Item> items;
  int64_t total = 0;
  for (int64_t p = 0; p < static_cast<int64_t>(pairs.size()); ++p) {
    const Pair& pr = pairs[p];
    total += pr.rows * pr.len;
    const int64_t per_item = std::max<int64_t>(1, kItemElems / std::max<int64_t>(pr.len, 1));
    for (int64_t r = 0; r < pr.rows; r += per_item) items.push_back({p, r, std::min(pr.rows, r + per_item)});
  }
  std::vector<uint8_t> wrote(items.size(), 0);  // one slot per item: each written by one thread
  std::vector<int64_t> sizes(items.size());
  for (size_t k = 0; k < items.size(); ++k) sizes[k] = (items[k].row_end - items[k].row_begin) * pairs[items[k].pair].len;
  // the threads' shares cut by elements: see note: [balanced split] in balanced_parallel.h
  parallel_for_weighted(sizes, total >= kParallelMinElems, kItemElems, [&](int64_t k) {
    const Item& it = items[k];
    const Pair& pr = pairs[it.pair];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pr.g.scalar_type(), "segclip_adaptive_clip_cpu", [&] {
      wrote[k] = clip_rows<K, scalar_t>(pr.w.const_data_ptr<scalar_t>(), pr.g.mutable_data_ptr<scalar_t>(), pr.len,
                                        it.row_begin, it.row_end, clip_factor, eps);
    });
  });
  std::vector<uint8_t> pair_wrote(pairs.size(), 0);
  for (size_t k = 0; k < items.size(); ++k) pair_wrote[items[k].pair] |= wrote[k];
  for (size_t p = 0; p < pairs.size(); ++p) {
    if (pairs[p].orig.defined() && pair_wrote[p]) pairs[p].orig.copy_(pairs[p].g);
  }
}

void multi_tensor_adaptive_clip_cpu(at::TensorList weights, at::TensorList grads, double clip_factor, double eps,
                                    double norm_type) {
  const char* op = "segclip::multi_tensor_adaptive_clip_";
  check_adaptive_arguments(weights, grads, clip_factor, eps, norm_type, op);  // shared with the CUDA kernel
  const NormKind kind = norm_kind(norm_type);
  std::vector<Pair> pairs;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // see note: [tensors that share memory]
  for (size_t i = 0; i < grads.size(); ++i) {  // every check before the first write
    const at::Tensor& w = weights[i];
    const at::Tensor& g = grads[i];
    check_cpu_tensor(w, op, "weights", i);
    check_cpu_tensor(g, op, "grads", i);
    check_adaptive_pair(w, g, i, op);
    if (g.numel() == 0) continue;
    const int64_t rows = adaptive_rows(g);
    Pair pr{w.contiguous(), g, at::Tensor(), rows, g.numel() / rows};
    if (g.is_contiguous()) {
      ranges.push_back(byte_range(g));
    } else {  // rows of the contiguous layout: a packed copy, written back if a unit clips
      pr.orig = g;
      pr.g = g.contiguous();
    }
    pairs.push_back(std::move(pr));
  }
  const auto run = [&](const std::vector<Pair>& ps) {
    switch (kind) {
      case NormKind::kL2: clip_pairs<NormKind::kL2>(ps, clip_factor, eps); break;
      case NormKind::kL1: clip_pairs<NormKind::kL1>(ps, clip_factor, eps); break;
      case NormKind::kLinf: clip_pairs<NormKind::kLinf>(ps, clip_factor, eps); break;
    }
  };
  if (any_ranges_intersect(std::move(ranges))) {  // a gradient listed twice: one pair after another
    for (const Pair& pr : pairs) run({pr});
  } else {
    run(pairs);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CPU, m) { m.impl("multi_tensor_adaptive_clip_", &multi_tensor_adaptive_clip_cpu); }

}  // namespace segclip
