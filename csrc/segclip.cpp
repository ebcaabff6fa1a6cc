// The one place where segclip's operator schemas are declared.
//
// Each dispatch key registers its kernels in its own file:
//   csrc/cpu/multi_tensor_cpu.cpp    TORCH_LIBRARY_IMPL(segclip, CPU, m)
//   csrc/cuda/*.cu                   TORCH_LIBRARY_IMPL(segclip, CUDA, m)  (separate library, _C_cuda)
// Fake (meta) kernels for torch.compile are registered from Python (segclip/_ops.py), and only when
// this library loaded.
//
// NOTE: [op contract]
// Every op takes a list of tensors that all live on one device. The list may mix floating dtypes
// (float16, bfloat16, float32, float64). Tensors may be empty, non-contiguous or misaligned (by whole
// elements: the CUDA kernels refuse a data pointer that is not a multiple of the element size).
// Sparse tensors are refused with an error naming the tensor.
//  * multi_tensor_norm(tensors, norm_type) -> Tensor
//      The norm of the concatenation of all tensors, as a 0-dim tensor on the tensors' device,
//      float64 when any input is float64, float32 otherwise. norm_type is 1, 2 or inf.
//      Deterministic: the same inputs give a bitwise-identical result on every call.
//  * multi_tensor_norm_coef(tensors, norm_type, max_norm) -> (Tensor norm, Tensor coef)
//      The norm as above plus the clip coefficient min(1, max_norm / (norm + 1e-6)) computed on the
//      device (same dtype as norm), rounded as torch rounds it (csrc/clip_coefficient.h). NaN norm
//      gives a NaN coefficient, as in torch.
//  * multi_tensor_scale_(tensors, coef) -> ()
//      tensors *= coef, in place. coef is a 0-dim floating tensor on the same device. When
//      coef >= 1 nothing is written at all (NaN is not >= 1, so NaN scales, as torch does).
//      Products are computed in float32 (float64 for float64 tensors) and rounded once.
//  * multi_tensor_clip_value_(tensors, clip_value) -> ()
//      tensors = clamp(tensors, -c, c) in place, where c is clip_value (>= 0, not NaN) rounded to each
//      tensor's dtype (through float32 for half/bfloat16, as torch rounds the bound). NaN stays NaN,
//      +-inf become +-c. Only elements beyond the bound are written (an element equal to the bound
//      or inside it is never stored to). Bitwise what torch.nn.utils.clip_grad_value_ gives.
//  * multi_tensor_adaptive_clip_(weights, grads, clip_factor, eps, norm_type) -> ()
//      Unit-wise adaptive clipping (timm's adaptive_clip_grad): weights[i] and grads[i] have one shape;
//      a unit is a slice along dim 0 (the whole tensor when it has at most one dimension). Per unit,
//      with norms of order norm_type (1, 2 or inf) in the op-math type (float; double for double):
//      m = max(||w||, eps) * clip_factor, and the unit's gradient is scaled by m / max(||g||, 1e-6)
//      unless ||g|| < m (then nothing is written). NaN in a unit's weight or gradient makes that
//      unit's gradient NaN, as in timm. Units are computed as rows of a contiguous layout: tensors
//      that are not contiguous go through a packed copy (and are written back when a unit clips).
//      Kernels: cpu/adaptive_cpu.cpp, cuda/adaptive_cuda.cpp; shared checks: adaptive_checks.h.
//  * multi_tensor_clip_(tensors, norm_type, max_norm) -> (Tensor norm, Tensor coef)
//      multi_tensor_norm_coef followed by multi_tensor_scale_ with its coefficient, in one call: the
//      list is converted and checked once, and every refusal of either op is made before anything
//      is written. The same norm, coefficient and scaled values as the two calls, bitwise, on each
//      device (the CUDA kernel queues the memset, the norm launches and the scale launches, which
//      read the coefficient on the device; nothing is written when it is >= 1). Returns the norm
//      and the coefficient (new tensors, aliasing no input).
//  * multi_tensor_group_partials(tensors, groups, num_groups, norm_type) -> Tensor
//      Per-group norms from one pass: groups[i] in [0, num_groups) is tensors[i]'s group. Returns a
//      float64 tensor of shape (num_groups + 1,) on the tensors' device: per group, then over all
//      tensors, the sum of |x|^p for norm_type p = 1 or 2, or max |x| for inf (0 for an empty group;
//      NaN propagates). No root is taken, so partials from several processes add up (segclip/
//      distributed.py); the last entry is what multi_tensor_norm reduces before its root, bitwise.
//      Kernels: cpu/group_norms_cpu.cpp, cuda/group_cuda.cpp (a device without one goes through
//      segclip/partials.py); the argument checks both share: group_checks.h.
//  * multi_tensor_group_norms(tensors, groups, num_groups, norm_type) -> (Tensor norms, Tensor total)
//      The norms themselves, for segclip.group_norms' one-call fast path: tensors may hold None
//      (a parameter without a gradient: skipped, though its group index is still checked);
//      multi_tensor_group_partials of the rest, then the root (sqrt for p = 2), in float64 when any
//      tensor is float64, float32 otherwise (multi_tensor_norm's rule): norms of shape (num_groups,)
//      and the 0-dim total, bitwise what multi_tensor_norm returns for the same tensors (two new
//      tensors, aliasing no input and not each other). Refuses a list with no tensor. One kernel
//      for every dispatch key (CompositeImplicitAutograd, below): the partials op's kernels, checks
//      and fake kernel do the work, so the list is walked once in C++ instead of once per entry in
//      Python (see note: [group fast path] in segclip/groups.py).
//  * multi_tensor_group_clip_(tensors, groups, num_groups, norm_type, max_norm) -> (norms, total)
//      multi_tensor_group_norms, then the present tensors scaled by the total's clip coefficient
//      (multi_tensor_norm_coef's, bitwise: clip_coefficient.h) through multi_tensor_scale_ (nothing
//      written when the coefficient is >= 1). Returns the norms before clipping. Composite as above.
#include <Python.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <torch/library.h>

#include "clip_coefficient.h"
#include "group_checks.h"

#include <cmath>
#include <optional>
#include <tuple>
#include <vector>

TORCH_LIBRARY(segclip, m) {
  m.def("multi_tensor_norm(Tensor[] tensors, float norm_type) -> Tensor");
  m.def("multi_tensor_norm_coef(Tensor[] tensors, float norm_type, float max_norm) -> (Tensor, Tensor)");
  m.def("multi_tensor_scale_(Tensor(a!)[] tensors, Tensor coef) -> ()");
  // Value and adaptive clipping (kernels: cpu/value_cpu.cpp, cpu/adaptive_cpu.cpp, cuda/value_*,
  // cuda/adaptive_*; the Autograd and ADInplaceOrView kernels: adapt_ops.cpp).
  m.def("multi_tensor_clip_value_(Tensor(a!)[] tensors, float clip_value) -> ()");
  m.def("multi_tensor_adaptive_clip_(Tensor[] weights, Tensor(a!)[] grads, float clip_factor, float eps, "
        "float norm_type) -> ()");
  m.def("multi_tensor_clip_(Tensor(a!)[] tensors, float norm_type, float max_norm) -> (Tensor, Tensor)");
  m.def("multi_tensor_group_partials(Tensor[] tensors, int[] groups, int num_groups, float norm_type) -> Tensor");
  m.def("multi_tensor_group_norms(Tensor?[] tensors, int[] groups, int num_groups, float norm_type) -> (Tensor, Tensor)");
  m.def("multi_tensor_group_clip_(Tensor(a!)?[] tensors, int[] groups, int num_groups, float norm_type, "
        "float max_norm) -> (Tensor, Tensor)");
}

// NOTE: [version counter]
// An in-place op must bump the version counter of what it mutates, as mul_ does: autograd then
// refuses a saved tensor that was changed since (a gradient kept by create_graph=True and scaled
// afterwards makes backward raise instead of giving a wrong gradient). torch's fallbacks for ops
// without an autograd kernel bump the versions of mutated *returns* only; the in-place ops return
// nothing that aliases their list. So, as for torch's own in-place ops:
//  * Autograd: refuses a tensor that requires grad while grad mode is on (the op has no
//    derivative), then redispatches (the autograd keys are off under torch.inference_mode).
//  * ADInplaceOrView: runs the kernel, then bumps the version of every tensor that has one (not
//    inference tensors), whether or not the kernel wrote (coef >= 1 writes nothing): multiplying by 1
//    bumps it in torch too. This key stays on under torch.inference_mode for normal tensors.
//  * The kernels refuse an inference tensor outside torch.inference_mode (csrc/inplace_checks.h):
//    a list of nothing but inference tensors reaches neither key above.
//
// NOTE: [autograd kernels]
// Every op has an Autograd kernel, so none goes through torch's boxed autograd fallback (a boxed
// call that re-reads the whole argument stack, and which would attach a grad_fn to the norm that
// only warns at backward time). None of the ops has a derivative: each kernel refuses a tensor
// that requires grad while grad mode is on (segclip calls them under torch.no_grad()), then
// redispatches below autograd. The norms are not views and write nothing, so they need no
// ADInplaceOrView kernel (the key falls through).
namespace {

void refuse_requires_grad(at::TensorList tensors, const char* op) {
  if (!c10::GradMode::is_enabled()) return;
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!(tensors[i].defined() && tensors[i].requires_grad()), op, ": tensors[", i,
                "] requires grad and grad mode is on; the op is not differentiable: call it under torch.no_grad()");
  }
}

template <typename Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

using NormFn = at::Tensor(at::TensorList, double);
using NormCoefFn = std::tuple<at::Tensor, at::Tensor>(at::TensorList, double, double);
using ScaleFn = void(at::TensorList, const at::Tensor&);
using ClipFn = std::tuple<at::Tensor, at::Tensor>(at::TensorList, double, double);
using GroupPartialsFn = at::Tensor(at::TensorList, at::IntArrayRef, int64_t, double);

// One cached handle per op (looked up on first use, after the TORCH_LIBRARY block has run).
const c10::TypedOperatorHandle<NormFn>& norm_op() {
  static const auto op = find_op<NormFn>("segclip::multi_tensor_norm");
  return op;
}
const c10::TypedOperatorHandle<NormCoefFn>& norm_coef_op() {
  static const auto op = find_op<NormCoefFn>("segclip::multi_tensor_norm_coef");
  return op;
}
const c10::TypedOperatorHandle<ScaleFn>& scale_op() {
  static const auto op = find_op<ScaleFn>("segclip::multi_tensor_scale_");
  return op;
}
const c10::TypedOperatorHandle<ClipFn>& clip_op() {
  static const auto op = find_op<ClipFn>("segclip::multi_tensor_clip_");
  return op;
}

const c10::TypedOperatorHandle<GroupPartialsFn>& group_partials_op() {
  static const auto op = find_op<GroupPartialsFn>("segclip::multi_tensor_group_partials");
  return op;
}

at::Tensor multi_tensor_norm_autograd(c10::DispatchKeySet ks, at::TensorList tensors, double norm_type) {
  refuse_requires_grad(tensors, "segclip::multi_tensor_norm");
  at::AutoDispatchBelowAutograd guard;
  return norm_op().redispatch(ks & c10::after_autograd_keyset, tensors, norm_type);
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_norm_coef_autograd(c10::DispatchKeySet ks, at::TensorList tensors,
                                                                   double norm_type, double max_norm) {
  refuse_requires_grad(tensors, "segclip::multi_tensor_norm_coef");
  at::AutoDispatchBelowAutograd guard;
  return norm_coef_op().redispatch(ks & c10::after_autograd_keyset, tensors, norm_type, max_norm);
}

void multi_tensor_scale_autograd(c10::DispatchKeySet ks, at::TensorList tensors, const at::Tensor& coef) {
  refuse_requires_grad(tensors, "segclip::multi_tensor_scale_");
  at::AutoDispatchBelowAutograd guard;
  scale_op().redispatch(ks & c10::after_autograd_keyset, tensors, coef);
}

at::Tensor multi_tensor_group_partials_autograd(c10::DispatchKeySet ks, at::TensorList tensors,
                                                at::IntArrayRef groups, int64_t num_groups, double norm_type) {
  refuse_requires_grad(tensors, "segclip::multi_tensor_group_partials");
  at::AutoDispatchBelowAutograd guard;
  return group_partials_op().redispatch(ks & c10::after_autograd_keyset, tensors, groups, num_groups, norm_type);
}

void bump_versions(at::TensorList tensors) {
  for (const at::Tensor& t : tensors) {
    if (t.defined() && !t.is_inference()) t.unsafeGetTensorImpl()->bump_version();
  }
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_clip_autograd(c10::DispatchKeySet ks, at::TensorList tensors,
                                                              double norm_type, double max_norm) {
  refuse_requires_grad(tensors, "segclip::multi_tensor_clip_");
  at::AutoDispatchBelowAutograd guard;
  return clip_op().redispatch(ks & c10::after_autograd_keyset, tensors, norm_type, max_norm);
}

void multi_tensor_scale_inplace(c10::DispatchKeySet ks, at::TensorList tensors, const at::Tensor& coef) {
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    scale_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, coef);
  }
  bump_versions(tensors);
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_clip_inplace(c10::DispatchKeySet ks, at::TensorList tensors,
                                                             double norm_type, double max_norm) {
  std::tuple<at::Tensor, at::Tensor> out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = clip_op().redispatch(ks & c10::after_ADInplaceOrView_keyset, tensors, norm_type, max_norm);
  }
  bump_versions(tensors);
  return out;
}

// multi_tensor_group_norms and multi_tensor_group_clip_: the present tensors' partials through the
// dispatcher (every key of the partials op applies: its CPU/CUDA kernels, the Autograd refusal, the
// sparse refusals, its fake kernel under torch.compile), then the roots and the dtype; the clip
// then scales through multi_tensor_scale_ (its refusals, its version bumps).
struct Present {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> groups;
  bool wide = false;  // a float64 tensor: the norms are float64 (multi_tensor_norm's rule)
};

Present present_entries(const c10::List<std::optional<at::Tensor>>& tensors, at::IntArrayRef groups,
                        int64_t num_groups, const char* op) {
  segclip::check_group_arguments(tensors.size(), groups, num_groups, op);  // None entries' indices too
  Present out;
  out.tensors.reserve(tensors.size());
  out.groups.reserve(tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const std::optional<at::Tensor> t = tensors.get(i);
    if (!t.has_value() || !t->defined()) continue;
    out.wide = out.wide || t->scalar_type() == at::kDouble;
    out.tensors.push_back(*t);
    out.groups.push_back(groups[i]);
  }
  TORCH_CHECK(!out.tensors.empty(), op, ": every entry is None; expected at least one tensor");
  return out;
}

// A real CPU tensor (fake and functional tensors hold no data): small results are computed on the host.
bool on_host(const at::Tensor& t) {
  const c10::DispatchKeySet keys = t.key_set();
  return t.device().is_cpu() && !keys.has(c10::DispatchKey::Python) && !keys.has(c10::DispatchKey::Functionalize);
}

// The roots of the partials: (norms of the groups, the 0-dim total), two new tensors in dtype.
std::tuple<at::Tensor, at::Tensor> roots(const at::Tensor& partials, int64_t num_groups, double norm_type,
                                         at::ScalarType dtype) {
  if (on_host(partials) && partials.scalar_type() == at::kDouble && partials.is_contiguous()) {
    // The outputs written in one loop instead of six small ops (each costs microseconds).
    at::Tensor norms = at::empty({num_groups}, partials.options().dtype(dtype));
    at::Tensor total = at::empty({}, partials.options().dtype(dtype));
    const double* in = partials.const_data_ptr<double>();
    AT_DISPATCH_FLOATING_TYPES(dtype, "segclip_group_roots", [&] {
      scalar_t* out = norms.mutable_data_ptr<scalar_t>();
      for (int64_t k = 0; k <= num_groups; ++k) {
        const double root = norm_type == 2.0 ? std::sqrt(in[k]) : in[k];  // 1 and inf: the partial itself
        (k < num_groups ? out[k] : *total.mutable_data_ptr<scalar_t>()) = static_cast<scalar_t>(root);
      }
    });
    return {norms, total};
  }
  const at::Tensor all = (norm_type == 2.0 ? partials.sqrt() : partials).to(dtype);
  return {all.narrow(0, 0, num_groups).clone(), all.select(0, num_groups).clone()};
}

// The total's clip coefficient (same dtype and device), rounded as torch rounds it: clip_coefficient.h
// on the host (multi_tensor_norm_coef's), on a device torch's own ops in torch's order.
at::Tensor coefficient(const at::Tensor& total, double max_norm) {
  if (!on_host(total)) return (total + 1e-6).reciprocal().mul(max_norm).clamp_max(1.0);
  return AT_DISPATCH_FLOATING_TYPES(total.scalar_type(), "segclip_group_coef", [&] {
    const scalar_t t = *total.const_data_ptr<scalar_t>();
    return at::scalar_tensor(segclip::clip_coefficient<scalar_t>(t, static_cast<scalar_t>(max_norm)), total.options());
  });
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_group_norms(const c10::List<std::optional<at::Tensor>>& tensors,
                                                            at::IntArrayRef groups, int64_t num_groups,
                                                            double norm_type) {
  const Present p = present_entries(tensors, groups, num_groups, "segclip::multi_tensor_group_norms");
  const at::Tensor partials = group_partials_op().call(p.tensors, p.groups, num_groups, norm_type);
  return roots(partials, num_groups, norm_type, p.wide ? at::kDouble : at::kFloat);
}

std::tuple<at::Tensor, at::Tensor> multi_tensor_group_clip_(const c10::List<std::optional<at::Tensor>>& tensors,
                                                            at::IntArrayRef groups, int64_t num_groups,
                                                            double norm_type, double max_norm) {
  const char* op = "segclip::multi_tensor_group_clip_";
  TORCH_CHECK(max_norm >= 0, op, ": max_norm must be a non-negative number, got ", max_norm);
  const Present p = present_entries(tensors, groups, num_groups, op);
  const at::Tensor partials = group_partials_op().call(p.tensors, p.groups, num_groups, norm_type);
  auto out = roots(partials, num_groups, norm_type, p.wide ? at::kDouble : at::kFloat);
  // writes nothing when the coefficient is >= 1; its refusals come before any write
  scale_op().call(p.tensors, coefficient(std::get<1>(out), max_norm));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(segclip, CompositeImplicitAutograd, m) {
  m.impl("multi_tensor_group_norms", &multi_tensor_group_norms);
  m.impl("multi_tensor_group_clip_", &multi_tensor_group_clip_);
}
TORCH_LIBRARY_IMPL(segclip, Autograd, m) {
  m.impl("multi_tensor_group_partials", &multi_tensor_group_partials_autograd);
  m.impl("multi_tensor_norm", &multi_tensor_norm_autograd);
  m.impl("multi_tensor_norm_coef", &multi_tensor_norm_coef_autograd);
  m.impl("multi_tensor_scale_", &multi_tensor_scale_autograd);
  m.impl("multi_tensor_clip_", &multi_tensor_clip_autograd);
}
TORCH_LIBRARY_IMPL(segclip, ADInplaceOrView, m) {
  m.impl("multi_tensor_scale_", &multi_tensor_scale_inplace);
  m.impl("multi_tensor_clip_", &multi_tensor_clip_inplace);
}

// Sparse tensors: no kernel takes them (segclip.fused_clip_ sends sparse gradients through PyTorch).
// Without these, a list holding one would get the dispatcher's "Could not run ... with arguments
// from the 'SparseCPU' backend" instead of a message that names the tensor.
namespace {

void refuse_sparse(at::TensorList tensors, const char* op) {
  for (size_t i = 0; i < tensors.size(); ++i) {
    TORCH_CHECK(!tensors[i].defined() || tensors[i].layout() == at::kStrided, op, ": tensors[", i, "] has layout ",
                tensors[i].layout(), "; the kernels take strided (dense) tensors only");
  }
  TORCH_CHECK(false, op, ": got a sparse argument; the kernels take strided (dense) tensors only");
}

at::Tensor norm_sparse(at::TensorList tensors, double) {
  refuse_sparse(tensors, "segclip::multi_tensor_norm");
  return {};
}

std::tuple<at::Tensor, at::Tensor> norm_coef_sparse(at::TensorList tensors, double, double) {
  refuse_sparse(tensors, "segclip::multi_tensor_norm_coef");
  return {};
}

void scale_sparse(at::TensorList tensors, const at::Tensor&) { refuse_sparse(tensors, "segclip::multi_tensor_scale_"); }

std::tuple<at::Tensor, at::Tensor> clip_sparse(at::TensorList tensors, double, double) {
  refuse_sparse(tensors, "segclip::multi_tensor_clip_");
  return {};
}

at::Tensor group_partials_sparse(at::TensorList tensors, at::IntArrayRef, int64_t, double) {
  refuse_sparse(tensors, "segclip::multi_tensor_group_partials");
  return {};
}

}  // namespace

#define SEGCLIP_REFUSE_SPARSE(key)                         \
  TORCH_LIBRARY_IMPL(segclip, key, m) {                    \
    m.impl("multi_tensor_norm", &norm_sparse);             \
    m.impl("multi_tensor_norm_coef", &norm_coef_sparse);   \
    m.impl("multi_tensor_scale_", &scale_sparse);          \
    m.impl("multi_tensor_clip_", &clip_sparse);            \
    m.impl("multi_tensor_group_partials", &group_partials_sparse); \
  }
SEGCLIP_REFUSE_SPARSE(SparseCPU)
SEGCLIP_REFUSE_SPARSE(SparseCUDA)
SEGCLIP_REFUSE_SPARSE(SparseCsrCPU)
SEGCLIP_REFUSE_SPARSE(SparseCsrCUDA)
#undef SEGCLIP_REFUSE_SPARSE

// Importing segclip._C loads this shared library, which runs the registrations above; the module
// itself is empty. (No pybind11: the ops are reached through torch.ops.segclip.*.)
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
