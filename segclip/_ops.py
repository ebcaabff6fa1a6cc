"""Fake (meta) kernels for segclip's custom ops, so ``torch.compile`` can trace through them.

Registered only when the op library loaded (see note: [op contract] in csrc/segclip.cpp): a fake
kernel for an op that does not exist would turn every import into an error.
"""

from __future__ import annotations

import torch

from . import _ext


def _check_devices(tensors, op: str) -> None:
    torch._check(len(tensors) > 0, lambda: f"{op}: expected a non-empty list of tensors")
    device = tensors[0].device
    for i, t in enumerate(tensors):
        torch._check(t.device == device, lambda: f"{op}: tensors[{i}] is on {t.device}, tensors[0] on {device}")


def _norm_dtype(tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


if _ext.CPU_LOADED:

    @torch.library.register_fake("segclip::multi_tensor_norm")
    def _multi_tensor_norm_fake(tensors, norm_type):
        _check_devices(tensors, "segclip::multi_tensor_norm")
        return tensors[0].new_empty((), dtype=_norm_dtype(tensors))

    @torch.library.register_fake("segclip::multi_tensor_norm_coef")
    def _multi_tensor_norm_coef_fake(tensors, norm_type, max_norm):
        _check_devices(tensors, "segclip::multi_tensor_norm_coef")
        dtype = _norm_dtype(tensors)
        return tensors[0].new_empty((), dtype=dtype), tensors[0].new_empty((), dtype=dtype)

    @torch.library.register_fake("segclip::multi_tensor_scale_")
    def _multi_tensor_scale_fake(tensors, coef):
        if tensors:
            _check_devices(list(tensors) + [coef], "segclip::multi_tensor_scale_")
        return None

    @torch.library.register_fake("segclip::multi_tensor_clip_value_")
    def _multi_tensor_clip_value_fake(tensors, clip_value):
        if tensors:
            _check_devices(tensors, "segclip::multi_tensor_clip_value_")
        return None

    @torch.library.register_fake("segclip::multi_tensor_adaptive_clip_")
    def _multi_tensor_adaptive_clip_fake(weights, grads, clip_factor, eps, norm_type):
        torch._check(len(weights) == len(grads), lambda: "segclip::multi_tensor_adaptive_clip_: one weight per grad")
        if grads:
            _check_devices(list(weights) + list(grads), "segclip::multi_tensor_adaptive_clip_")
        return None

    @torch.library.register_fake("segclip::multi_tensor_clip_")
    def _multi_tensor_clip_fake(tensors, norm_type, max_norm):
        _check_devices(tensors, "segclip::multi_tensor_clip_")
        dtype = _norm_dtype(tensors)
        return tensors[0].new_empty((), dtype=dtype), tensors[0].new_empty((), dtype=dtype)

    @torch.library.register_fake("segclip::multi_tensor_group_partials")
    def _multi_tensor_group_partials_fake(tensors, groups, num_groups, norm_type):
        _check_devices(tensors, "segclip::multi_tensor_group_partials")
        torch._check(len(groups) == len(tensors), lambda: "segclip::multi_tensor_group_partials: one group per tensor")
        return tensors[0].new_empty((num_groups + 1,), dtype=torch.float64)
