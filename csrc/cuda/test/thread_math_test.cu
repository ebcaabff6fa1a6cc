// Host-only test of what each thread of a block does with its chunk (csrc/cuda/multi_tensor_math.cuh):
// thread_partial and scale_chunk are called on the host for every thread index 0..kBlockThreads-1,
// on real buffers with every misalignment, so a GPU is not needed to check that each element of a
// chunk is read (norm) or written (scale) exactly once through the head / vector / tail paths.
// Built with nvcc (the conversions come from cuda_fp16.h / cuda_bf16.h) and run by tests/test_cuda.py:
//   nvcc -std=c++17 -O1 -I csrc/cuda csrc/cuda/test/thread_math_test.cu -o thread_math_test
// Prints "OK <cases>" on success.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
#include <vector>

#include "multi_tensor_math.cuh"

#include "expect.h"

using namespace segclip::cuda;
using segclip::clip_coefficient;
using segclip_test::g_failures;

namespace {

int g_cases = 0;

// Values exactly representable in every dtype, never 0, so that a skipped or repeated element
// changes the integer-valued (hence exact) sums.
double value_at(int i) { return (1 + i % 5) * (i % 3 == 0 ? -1.0 : 1.0); }

template <typename Tr>
struct Buffer {
  using S = typename Tr::storage;
  static constexpr int kGuard = 16;
  std::vector<Pack<S>> storage;  // 16-byte aligned
  S* data;                       // the chunk: misalign elements past a 16-byte boundary
  int len;
  Buffer(int misalign, int n) : len(n) {
    const int per = Pack<S>::kSize;
    storage.resize((n + 2 * kGuard + misalign) / per + 2);
    S* base = reinterpret_cast<S*>(storage.data());
    for (size_t i = 0; i < storage.size() * per; ++i) base[i] = Tr::store(typename Tr::acc(99));
    data = base + kGuard + misalign;
    for (int i = 0; i < n; ++i) data[i] = Tr::store(static_cast<typename Tr::acc>(value_at(i)));
  }
  double at(int i) const { return static_cast<double>(Tr::load(data[i])); }
};

template <NormKind K, typename Tr>
double block_norm(const Buffer<Tr>& b) {  // what the block computes, before the final sqrt
  double total = 0.0;
  for (int tid = 0; tid < kBlockThreads; ++tid) {
    total = combine<K>(total, static_cast<double>(thread_partial<K, Tr>(b.data, b.len, tid)));
  }
  return total;
}

template <typename Tr>
void check_chunk(int misalign, int len, const char* name) {
  ++g_cases;
  Buffer<Tr> b(misalign, len);
  double l1 = 0, l2 = 0, linf = 0;
  for (int i = 0; i < len; ++i) {
    l1 += std::fabs(value_at(i));
    l2 += value_at(i) * value_at(i);
    linf = std::fmax(linf, std::fabs(value_at(i)));
  }
  EXPECT(block_norm<NormKind::kL1>(b) == l1, "%s misalign %d len %d: L1 %g, expected %g", name, misalign, len,
         block_norm<NormKind::kL1>(b), l1);
  EXPECT(block_norm<NormKind::kL2>(b) == l2, "%s misalign %d len %d: L2^2 %g, expected %g", name, misalign, len,
         block_norm<NormKind::kL2>(b), l2);
  EXPECT(block_norm<NormKind::kLinf>(b) == linf, "%s misalign %d len %d: Linf", name, misalign, len);

  // The max (and a NaN) at a few positions: the first, the last, the first after the head, middle.
  const int positions[] = {0, len - 1, len / 2, std::min(len - 1, Pack<typename Tr::storage>::kSize)};
  for (int pos : positions) {
    const auto saved = b.data[pos];
    b.data[pos] = Tr::store(typename Tr::acc(-7));
    EXPECT(block_norm<NormKind::kLinf>(b) == 7.0, "%s misalign %d len %d: max at %d missed", name, misalign, len, pos);
    b.data[pos] = Tr::store(std::numeric_limits<typename Tr::acc>::quiet_NaN());
    EXPECT(std::isnan(block_norm<NormKind::kLinf>(b)), "%s misalign %d len %d: NaN at %d lost (inf)", name,
           misalign, len, pos);
    EXPECT(std::isnan(block_norm<NormKind::kL2>(b)), "%s misalign %d len %d: NaN at %d lost (2)", name, misalign,
           len, pos);
    EXPECT(std::isnan(block_norm<NormKind::kL1>(b)), "%s misalign %d len %d: NaN at %d lost (1)", name, misalign,
           len, pos);
    b.data[pos] = saved;
  }

  // Scale by 0.5 (exact): an element scaled twice or never shows. Guards must stay 99.
  for (int tid = 0; tid < kBlockThreads; ++tid) scale_chunk<Tr>(b.data, len, typename Tr::acc(0.5), tid);
  for (int i = 0; i < len; ++i) {
    if (b.at(i) != value_at(i) * 0.5) {
      EXPECT(false, "%s misalign %d len %d: element %d is %g after scale, expected %g", name, misalign, len, i,
             b.at(i), value_at(i) * 0.5);
      break;
    }
  }
  for (int g = 1; g <= Buffer<Tr>::kGuard; ++g) {
    EXPECT(static_cast<double>(Tr::load(b.data[-g])) == 99.0, "%s: guard before the chunk written", name);
    EXPECT(static_cast<double>(Tr::load(b.data[len + g - 1])) == 99.0, "%s: guard after the chunk written", name);
  }
  // Scale by 1/3: the product in the op-math type, rounded once.
  const typename Tr::acc third = typename Tr::acc(1) / typename Tr::acc(3);
  std::vector<typename Tr::storage> expected(len);
  for (int i = 0; i < len; ++i) expected[i] = Tr::store(Tr::load(b.data[i]) * third);
  for (int tid = 0; tid < kBlockThreads; ++tid) scale_chunk<Tr>(b.data, len, third, tid);
  EXPECT(std::memcmp(expected.data(), b.data, sizeof(expected[0]) * len) == 0, "%s misalign %d len %d: x * 1/3",
         name, misalign, len);
}

template <typename Tr>
void check_dtype(const char* name) {
  const int per = Pack<typename Tr::storage>::kSize;
  const int round = kBlockThreads * kILP * per;  // elements in one full round of the block
  const int lens[] = {1, 2, per - 1, per, per + 1, 2 * per + 3, 100, kBlockThreads * per - 1,
                      kBlockThreads * per + 1, round - 1, round, round + 1, round + per + 5, 3 * round - 7,
                      static_cast<int>(kChunkElems) - 1, static_cast<int>(kChunkElems)};
  for (int misalign = 0; misalign < per; ++misalign) {
    for (int len : lens) check_chunk<Tr>(misalign, len, name);
  }
}

}  // namespace

int main() {
  check_dtype<HalfT>("float16");
  check_dtype<BFloat16T>("bfloat16");
  check_dtype<FloatT>("float32");
  check_dtype<DoubleT>("float64");
  // The clip coefficient, as the CPU kernel and torch: min(1, max / (norm + 1e-6)), NaN kept.
  ++g_cases;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT(clip_coefficient(2.0f, 1.0f) == (1.0f / (2.0f + 1e-6f)) * 1.0f, "coef for norm 2");
  // reciprocal, then times max_norm (as torch); max_norm / (norm + 1e-6) rounds differently here
  EXPECT(clip_coefficient(459.96793f, 0.7f) == (1.0f / (459.96793f + 1e-6f)) * 0.7f, "coef as torch");
  EXPECT(clip_coefficient(459.96793f, 0.7f) != 0.7f / (459.96793f + 1e-6f), "coef: the two formulas differ");
  EXPECT(clip_coefficient(0.5f, 1.0f) == 1.0f, "coef for norm 0.5");
  EXPECT(clip_coefficient(0.0f, 1.0f) == 1.0f, "coef for norm 0");
  EXPECT(std::isnan(clip_coefficient(nan, 1.0f)), "coef for a NaN norm");
  EXPECT(clip_coefficient(inf, 1.0f) == 0.0f, "coef for an inf norm");
  EXPECT(clip_coefficient(55.73845533763853, 0.7) == (1.0 / (55.73845533763853 + 1e-6)) * 0.7, "coef in double");
  EXPECT(clip_coefficient(55.73845533763853, 0.7) != 0.7 / (55.73845533763853 + 1e-6), "coef in double: formulas differ");
  if (g_failures > 0) {
    std::fprintf(stderr, "FAILED: %d checks\n", g_failures);
    return 1;
  }
  std::printf("OK %d\n", g_cases);
  return 0;
}
