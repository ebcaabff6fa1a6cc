// The device-independent kernels of the value and adaptive clip ops (schemas: segclip.cpp): Autograd
// and ADInplaceOrView, as for the scale op (see note: [version counter] in segclip.cpp), and the
// refusal of sparse inputs. Compiled into segclip._C. The CPU kernels: cpu/value_cpu.cpp and
// cpu/adaptive_cpu.cpp; the CUDA kernels: cuda/value_cuda.cpp, cuda/adaptive_cuda.cpp.
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

namespace {

using ClipValueFn = void(at::TensorList, double);
using AdaptiveFn = void(at::TensorList, at::TensorList, double, double, double);

const c10::TypedOperatorHandle<ClipValueFn>& clip_value_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("segclip::multi_tensor_clip_value_", "")
                             .typed<ClipValueFn>();
  return op;
}

const c10::TypedOperatorHandle<AdaptiveFn>& adaptive_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("segclip::multi_tensor_adaptive_clip_", "")
                             .typed<AdaptiveFn>();
  return op;
}

// The op writes `tensors` and has no derivative: a tensor that requires grad while grad mode is on is
// refused, as torch refuses an in-place op on a leaf that requires grad.
void refuse_requires_grad(at::TensorList tensors, const char* op, const char* name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!(c10::GradMode::is_enabled() && tensors[i].defined() && tensors[i].requires_grad()), op, ": ",
                name, "[", i, "] requires grad and grad mode is on; the op is not differentiable: call it under "
                "torch.no_grad()");
  }
}

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

void clip_value_autograd(c10::DispatchKeySet ks, at::TensorList tensors, double clip_value) {
  refuse_requires_grad(tensors, "segclip::multi_tensor_clip_value_", "tensors");
  at::AutoDispatchBelowAutograd guard;
  clip_value_op().redispatch(ks & c10::after_autograd_keyset, tensors, clip_value);
}

void clip_value_inplace(c10::DispatchKeySet ks, at::TensorList tensors, double clip_value) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    clip_value_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, clip_value);
  }
  bump_versions(tensors);  // written or not, as clamp_ bumps it
}

// The weights are only read: they may require grad (they are parameters).
void adaptive_autograd(c10::DispatchKeySet ks, at::TensorList weights, at::TensorList grads, double clip_factor,
                       double eps, double norm_type) {
  refuse_requires_grad(grads, "segclip::multi_tensor_adaptive_clip_", "grads");
  at::AutoDispatchBelowAutograd guard;
  adaptive_op().redispatch(ks & c10::after_autograd_keyset, weights, grads, clip_factor, eps, norm_type);
}

void adaptive_inplace(c10::DispatchKeySet ks, at::TensorList weights, at::TensorList grads, double clip_factor,
                      double eps, double norm_type) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    adaptive_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, weights, grads, clip_factor, eps, norm_type);
  }
  bump_versions(grads);
}

void refuse_sparse(at::TensorList tensors, const char* op, const char* name) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].defined() || tensors[i].layout() == at::kStrided, op, ": ", name, "[", i,
                "] has layout ", tensors[i].layout(), "; the kernels take strided (dense) tensors only");
  }
}

void clip_value_sparse(at::TensorList tensors, double) {
  refuse_sparse(tensors, "segclip::multi_tensor_clip_value_", "tensors");
  TORCH_CHECK(false, "segclip::multi_tensor_clip_value_: got a sparse argument; the kernels take strided tensors only");
}

void adaptive_sparse(at::TensorList weights, at::TensorList grads, double, double, double) {
  refuse_sparse(weights, "segclip::multi_tensor_adaptive_clip_", "weights");
  refuse_sparse(grads, "segclip::multi_tensor_adaptive_clip_", "grads");
  TORCH_CHECK(false, "segclip::multi_tensor_adaptive_clip_: got a sparse argument; the kernels take strided tensors only");
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, Autograd, m) {
  m.impl("multi_tensor_clip_value_", &clip_value_autograd);
  m.impl("multi_tensor_adaptive_clip_", &adaptive_autograd);
}
TORCH_LIBRARY_IMPL(segclip, ADInplaceOrView, m) {
  m.impl("multi_tensor_clip_value_", &clip_value_inplace);
  m.impl("multi_tensor_adaptive_clip_", &adaptive_inplace);
}

#define SEGCLIP_ADAPT_REFUSE_SPARSE(key)                         \
  TORCH_LIBRARY_IMPL(segclip, key, m) {                          \
    m.impl("multi_tensor_clip_value_", &clip_value_sparse);      \
    m.impl("multi_tensor_adaptive_clip_", &adaptive_sparse);     \
  }
SEGCLIP_ADAPT_REFUSE_SPARSE(SparseCPU)
SEGCLIP_ADAPT_REFUSE_SPARSE(SparseCUDA)
SEGCLIP_ADAPT_REFUSE_SPARSE(SparseCsrCPU)
SEGCLIP_ADAPT_REFUSE_SPARSE(SparseCsrCUDA)
#undef SEGCLIP_ADAPT_REFUSE_SPARSE
