// CPU kernels for segclip's ops (schemas and the op contract: csrc/segclip.cpp, see note: [op contract]).
#include "vec_capability.h"  // first: it selects at::vec's implementation, see note: [CPU vector width]

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "../clip_coefficient.h"
#include "../inplace_checks.h"
#include "../scale_out_of_place.h"
#include "../shared_memory.h"
#include "tensor_checks.h"
#include "balanced_parallel.h"
#include "norm_partials.h"

namespace segclip {
namespace {

using at::vec::Vectorized;

// NOTE: [CPU chunking and determinism]
// Every tensor is cut into chunks of kChunkElems elements (its last chunk may be shorter). Chunk
// boundaries depend only on the tensors' sizes, never on the number of threads; one parallel region
// runs over the chunks of all tensors at once, each chunk's partial result goes to its own slot, and
// one thread combines the slots in index order afterwards. The result is therefore bitwise identical
// for every torch.set_num_threads value and every call.
constexpr int64_t kChunkElems = int64_t{1} << 16;
// Below this many elements in all, one thread does everything: waking a second thread costs more
// than it saves (and, when the other core is busy, can stall for milliseconds).
constexpr int64_t kParallelMinElems = int64_t{1} << 17;

// NOTE: [CPU accumulation precision]
// Inside a chunk each vector lane accumulates in the op-math type (float for half/bfloat16/float,
// double for double) over a block of kBlockLoads vector loads per accumulator; each block's sum is then
// added in double. fp32 rounding error thus stays at the scale of one block (a few hundred terms),
// keeping the relative error of an fp32 norm near 1e-7 however many elements there are.
constexpr int kAccumulators = 4;
constexpr int64_t kBlockLoads = 32;

enum class NormKind { kL1, kL2, kLinf };

NormKind norm_kind(double norm_type) {
  if (norm_type == 2.0) return NormKind::kL2;
  if (norm_type == 1.0) return NormKind::kL1;
  if (std::isinf(norm_type) && norm_type > 0) return NormKind::kLinf;
  TORCH_CHECK(false, "segclip kernels support norm_type 1, 2 and inf, got ", norm_type,
              " (segclip.total_norm and segclip.fused_clip_ handle other norm types through PyTorch)");
}

// Combines two partial results; max propagates NaN so a NaN anywhere gives a NaN inf-norm, as torch.
template <NormKind K>
inline double combine(double a, double b) {
  if constexpr (K == NormKind::kLinf) {
    return (std::isnan(a) || std::isnan(b)) ? std::numeric_limits<double>::quiet_NaN() : std::max(a, b);
  } else {
    return a + b;
  }
}

template <NormKind K, typename acc_t>
inline Vectorized<acc_t> accumulate(const Vectorized<acc_t>& acc, const Vectorized<acc_t>& x) {
  if constexpr (K == NormKind::kL2) {
    return at::vec::fmadd(x, x, acc);
  } else if constexpr (K == NormKind::kL1) {
    return acc + x.abs();
  } else {
    return at::vec::maximum(acc, x.abs());  // at::vec::maximum propagates NaN
  }
}

template <NormKind K, typename acc_t>
inline double scalar_term(acc_t x) {
  if constexpr (K == NormKind::kL2) {
    return static_cast<double>(x) * static_cast<double>(x);
  } else {
    return std::abs(static_cast<double>(x));
  }
}

// Loads one Vectorized<scalar_t> worth of elements as op-math vectors (two of them for half/bfloat16).
template <typename scalar_t>
struct Loader {
  using acc_t = at::opmath_type<scalar_t>;
  static constexpr int kOut = 1;
  static void load(const scalar_t* p, Vectorized<acc_t>* out) { out[0] = Vectorized<acc_t>::loadu(p); }
};

template <typename scalar_t>
struct ReducedLoader {
  static constexpr int kOut = 2;
  static void load(const scalar_t* p, Vectorized<float>* out) {
    std::tie(out[0], out[1]) = at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p));
  }
};
template <>
struct Loader<at::Half> : ReducedLoader<at::Half> {};
template <>
struct Loader<at::BFloat16> : ReducedLoader<at::BFloat16> {};

// The partial result of one chunk: sum of |x|^p for p = 1, 2, or max |x| for p = inf.
template <typename scalar_t, NormKind K>
double chunk_partial(const scalar_t* data, int64_t n) {
  using acc_t = at::opmath_type<scalar_t>;
  using L = Loader<scalar_t>;
  constexpr int64_t kStep = Vectorized<scalar_t>::size();  // elements per load
  constexpr int kAcc = kAccumulators * L::kOut;
  constexpr int64_t kPerIter = kStep * kAccumulators;
  double total = 0.0;
  int64_t i = 0;
  while (i + kPerIter <= n) {
    Vectorized<acc_t> acc[kAcc];
    for (int a = 0; a < kAcc; ++a) acc[a] = Vectorized<acc_t>(acc_t(0));
    const int64_t block_end = std::min(n, i + kPerIter * kBlockLoads);
    for (; i + kPerIter <= block_end; i += kPerIter) {
      for (int a = 0; a < kAccumulators; ++a) {
        Vectorized<acc_t> x[L::kOut];
        L::load(data + i + a * kStep, x);
        for (int o = 0; o < L::kOut; ++o) acc[a * L::kOut + o] = accumulate<K>(acc[a * L::kOut + o], x[o]);
      }
    }
    // Fixed-shape tree over the accumulators, then over the lanes.
    for (int width = kAcc / 2; width >= 1; width /= 2) {
      for (int a = 0; a < width; ++a) {
        acc[a] = (K == NormKind::kLinf) ? at::vec::maximum(acc[a], acc[a + width]) : acc[a] + acc[a + width];
      }
    }
    acc_t lanes[Vectorized<acc_t>::size()];
    acc[0].store(lanes);
    for (int64_t l = 0; l < Vectorized<acc_t>::size(); ++l) total = combine<K>(total, static_cast<double>(lanes[l]));
  }
  for (; i < n; ++i) total = combine<K>(total, scalar_term<K>(static_cast<acc_t>(data[i])));
  return total;
}

struct Chunk {
  int64_t tensor;
  int64_t begin;
  int64_t end;
};

// Runs fn(c) for every chunk index c, in parallel when there is enough work, the threads' shares
// cut by elements (see note: [balanced split] in balanced_parallel.h); small inputs run inline on the
// calling thread.
template <typename Fn>
void for_each_chunk(const std::vector<at::Tensor>& tensors, const std::vector<Chunk>& chunks, const Fn& fn) {
  int64_t total = 0;
  for (const at::Tensor& t : tensors) total += t.numel();
  std::vector<int64_t> sizes(chunks.size());
  for (size_t c = 0; c < chunks.size(); ++c) sizes[c] = chunks[c].end - chunks[c].begin;
  parallel_for_weighted(sizes, total >= kParallelMinElems, kChunkElems, fn);
}

// Chunks of all tensors in list order; see note: [CPU chunking and determinism].
std::vector<Chunk> make_chunks(const std::vector<at::Tensor>& tensors) {
  std::vector<Chunk> chunks;
  for (int64_t t = 0; t < static_cast<int64_t>(tensors.size()); ++t) {
    const int64_t n = tensors[t].numel();
    for (int64_t b = 0; b < n; b += kChunkElems) chunks.push_back({t, b, std::min(n, b + kChunkElems)});
  }
  return chunks;
}

void check_tensors(at::TensorList tensors, const char* op) {
  for (size_t i = 0; i < tensors.size(); ++i) check_cpu_tensor(tensors[i], op, "tensors", i);
}

template <NormKind K>
std::vector<double> reduce_chunks(const std::vector<at::Tensor>& flat, const std::vector<Chunk>& chunks) {
  std::vector<double> partials(chunks.size());
  for_each_chunk(flat, chunks, [&](int64_t c) {
    const Chunk& ch = chunks[c];
    const at::Tensor& t = flat[ch.tensor];
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "segclip_norm_cpu", [&] {
      partials[c] = chunk_partial<scalar_t, K>(t.const_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin);
    });
  });
  return partials;
}

// The chunks' partial results of a list that passed check_tensors.
ChunkPartials chunk_partials(at::TensorList tensors, NormKind kind) {
  ChunkPartials out;
  out.out_dtype = at::kFloat;
  out.is_max = kind == NormKind::kLinf;
  std::vector<at::Tensor> flat;
  flat.reserve(tensors.size());
  for (const at::Tensor& t : tensors) {
    if (t.scalar_type() == at::kDouble) out.out_dtype = at::kDouble;
    flat.push_back(is_flat(t) ? t : t.contiguous());  // a strided view: read a packed copy
  }
  const std::vector<Chunk> chunks = make_chunks(flat);
  switch (kind) {
    case NormKind::kL2: out.partials = reduce_chunks<NormKind::kL2>(flat, chunks); break;
    case NormKind::kL1: out.partials = reduce_chunks<NormKind::kL1>(flat, chunks); break;
    case NormKind::kLinf: out.partials = reduce_chunks<NormKind::kLinf>(flat, chunks); break;
  }
  out.tensor_of.reserve(chunks.size());
  for (const Chunk& ch : chunks) out.tensor_of.push_back(ch.tensor);
  return out;
}

// The norm in double and the output dtype (float64 if any input is float64, else float32) of a
// list that passed check_tensors: the chunks' partials combined in chunk order.
std::tuple<double, at::ScalarType> compute_norm(at::TensorList tensors, NormKind kind) {
  const ChunkPartials p = chunk_partials(tensors, kind);
  double total = 0.0;
  for (double x : p.partials) total = combine_partial(total, x, p.is_max);
  if (kind == NormKind::kL2) total = std::sqrt(total);
  return {total, p.out_dtype};
}

}  // namespace

// Declared in norm_partials.h (the per-group norms of cpu/group_norms_cpu.cpp read the same partials).
ChunkPartials norm_chunk_partials(at::TensorList tensors, double norm_type, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": expected a non-empty list of tensors");
  check_tensors(tensors, op);
  return chunk_partials(tensors, norm_kind(norm_type));
}

namespace {

// Checks the list, then returns its norm (see compute_norm).
std::tuple<double, at::ScalarType> norm_impl(at::TensorList tensors, double norm_type, const char* op) {
  TORCH_CHECK(!tensors.empty(), op, ": expected a non-empty list of tensors");
  check_tensors(tensors, op);
  return compute_norm(tensors, norm_kind(norm_type));
}

// The norm and coefficient outputs; *coef_value gets the coefficient as the scale reads it.
std::tuple<at::Tensor, at::Tensor> norm_coef_outputs(double total, at::ScalarType out_dtype,
                                                     const at::TensorOptions& options, double max_norm,
                                                     double* coef_value) {
  const auto out = options.dtype(out_dtype);
  if (out_dtype == at::kDouble) {
    const double coef = clip_coefficient(total, max_norm);
    *coef_value = coef;
    return {at::scalar_tensor(total, out), at::scalar_tensor(coef, out)};
  }
  const float norm32 = static_cast<float>(total);
  const float coef = clip_coefficient(norm32, static_cast<float>(max_norm));
  *coef_value = coef;
  return {at::scalar_tensor(norm32, out), at::scalar_tensor(coef, out)};
}

at::Tensor multi_tensor_norm_cpu(at::TensorList tensors, double norm_type) {
  auto [total, out_dtype] = norm_impl(tensors, norm_type, "segclip::multi_tensor_norm");
  return at::scalar_tensor(total, tensors[0].options().dtype(out_dtype));
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_coef_cpu(at::TensorList tensors, double norm_type,
                                                              double max_norm) {
  auto [total, out_dtype] = norm_impl(tensors, norm_type, "segclip::multi_tensor_norm_coef");
  double coef;
  return norm_coef_outputs(total, out_dtype, tensors[0].options(), max_norm, &coef);
}

template <typename scalar_t>
void scale_chunk(scalar_t* data, int64_t n, double coef) {
  using acc_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<acc_t>;
  const acc_t c = static_cast<acc_t>(coef);
  // For half/bfloat16 at::vec::map converts to float, applies the lambda and rounds once.
  at::vec::map([c](Vec x) { return x * Vec(c); }, data, data, n);
}

// What the scale does with each tensor of a list, decided (and every refusal made) before the
// first write.
struct ScalePlan {
  std::vector<at::Tensor> flat;     // the fused pass
  std::vector<at::Tensor> strided;  // views with gaps: scaled after the fused pass (scale_out_of_place)
  bool shared = false;              // flat entries share memory: one tensor at a time, in list order
};

ScalePlan plan_scale(at::TensorList tensors, const char* op) {
  ScalePlan plan;
  std::vector<std::pair<uintptr_t, uintptr_t>> ranges;  // of flat; see note: [tensors that share memory]
  for (size_t i = 0; i < tensors.size(); ++i) {
    const at::Tensor& t = tensors[i];
    check_scalable(t, i, op);
    if (t.numel() == 0) continue;
    if (is_flat(t)) {
      plan.flat.push_back(t);
      ranges.push_back(byte_range(t));
    } else {
      plan.strided.push_back(t);
    }
  }
  plan.shared = any_ranges_intersect(std::move(ranges));
  return plan;
}

void run_scale(const ScalePlan& plan, double c) {
  if (c >= 1.0) return;  // nothing to clip: write nothing (NaN is not >= 1: it scales)
  const auto scale_all = [c](const std::vector<at::Tensor>& ts) {  // one parallel region over their chunks
    const std::vector<Chunk> chunks = make_chunks(ts);
    for_each_chunk(ts, chunks, [&](int64_t i) {
      const Chunk& ch = chunks[i];
      const at::Tensor& t = ts[ch.tensor];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "segclip_scale_cpu", [&] {
        scale_chunk<scalar_t>(t.mutable_data_ptr<scalar_t>() + ch.begin, ch.end - ch.begin, c);
      });
    });
  };
  if (plan.shared) {
    for (const at::Tensor& t : plan.flat) scale_all({t});  // one at a time, in list order
  } else {
    scale_all(plan.flat);
  }
  for (const at::Tensor& t : plan.strided) scale_out_of_place(t, c);
}

void multi_tensor_scale_cpu(at::TensorList tensors, const at::Tensor& coef) {
  const char* op = "segclip::multi_tensor_scale_";
  TORCH_CHECK(coef.numel() == 1 && coef.dim() == 0, op, ": coef must be a 0-dim tensor, got shape ",
              coef.sizes());
  TORCH_CHECK(coef.device().is_cpu(), op, ": coef is on ", coef.device(), "; expected a CPU tensor");
  TORCH_CHECK(at::isFloatingType(coef.scalar_type()), op, ": coef must be floating point, got ",
              coef.scalar_type());
  check_tensors(tensors, op);
  const double c = coef.item<double>();  // a CPU tensor: no device synchronisation
  run_scale(plan_scale(tensors, op), c);  // every check before the first write
}

// The whole clip in one call: the list is converted and checked once, every refusal (the scale's
// too) is made before anything is written, then the norm, the coefficient and the scale when it is
// below 1. The same norm, coefficient and gradients as multi_tensor_norm_coef + multi_tensor_scale_.
std::tuple<at::Tensor, at::Tensor> multi_tensor_clip_cpu(at::TensorList tensors, double norm_type, double max_norm) {
  const char* op = "segclip::multi_tensor_clip_";
  TORCH_CHECK(!tensors.empty(), op, ": expected a non-empty list of tensors");
  check_tensors(tensors, op);
  const NormKind kind = norm_kind(norm_type);
  const ScalePlan plan = plan_scale(tensors, op);
  auto [total, out_dtype] = compute_norm(tensors, kind);
  double coef;
  auto outputs = norm_coef_outputs(total, out_dtype, tensors[0].options(), max_norm, &coef);
  run_scale(plan, coef);
  return outputs;
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CPU, m) {
  m.impl("multi_tensor_norm", &multi_tensor_norm_cpu);
  m.impl("multi_tensor_norm_coef", &multi_tensor_norm_coef_cpu);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_cpu);
  m.impl("multi_tensor_clip_", &multi_tensor_clip_cpu);
}

}  // namespace segclip
