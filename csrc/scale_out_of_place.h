// The scale of a view the fused (or strided) pass cannot take, shared by the CPU kernel (csrc/cpu)
// and the CUDA kernel (csrc/cuda). Host code: ATen ops, queued on the tensor's device.
#pragma once

#include <ATen/core/Tensor.h>

namespace segclip {

// t = round(t * c) out of place: the product in op-math (float; double for double tensors) from a
// copy, rounded once to t's dtype by copy_, as the fused pass rounds (an in-place mul_ would round c
// to half/bfloat16 first). An element that several indices of t share is scaled once, not once per
// index (in-place mul_ on as_strided((3, 3), (1, 1)) compounds). `c`: a number or a 0-dim tensor.
template <typename C>
inline void scale_out_of_place(const at::Tensor& t, const C& c) {
  const auto opmath = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  t.copy_(t.to(opmath, /*non_blocking=*/false, /*copy=*/true).mul_(c));
}

}  // namespace segclip
