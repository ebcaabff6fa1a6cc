"""segclip: fused multi-tensor gradient clipping for PyTorch.

    import segclip
    loss.backward()
    total = segclip.fused_clip_(model.parameters(), max_norm=1.0)  # drop-in for clip_grad_norm_
    optimizer.step()

See ``segclip.backends()`` for which kernels were compiled and loaded here.
"""

from ._ext import BackendInfo, backends
from .adaptive import AutoClip, ZClip, adaptive_clip_
from .clip import clip_grad_norm_, clip_with_norm_, fused_clip_, total_norm
from .fold import clip_optimizer_
from .groups import GroupNorms, clip_groups_, group_norms
from .patch import TorchPatch, patch_torch
from .value import clip_grad_value_

__all__ = ["fused_clip_", "clip_grad_norm_", "total_norm", "clip_with_norm_", "clip_optimizer_", "backends", "BackendInfo",
           "clip_grad_value_", "adaptive_clip_", "AutoClip", "ZClip", "patch_torch", "TorchPatch",
           "group_norms", "clip_groups_", "GroupNorms"]
__version__ = "0.1.0"
