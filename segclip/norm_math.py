"""The norm arithmetic that every path shares: which dtype a norm accumulates in, how partial norms
combine into one, and the clip coefficient. The dispatcher (``clip.py``), the pure-PyTorch backend
(``reference.py``) and the feature modules beside ``clip.py`` call these; this module calls nothing
of segclip's, so the data still flows one way (public call -> checks -> grouping -> op or backend).
"""

from __future__ import annotations

import torch
from torch import Tensor

_WIDE = (torch.float64, torch.complex128)


def accumulate_dtype(dtypes) -> torch.dtype:
    """float64 when any dtype is float64 or complex128, else float32."""
    return torch.float64 if any(d in _WIDE for d in dtypes) else torch.float32


def combine_norms(norms: list[Tensor], norm_type: float, device: torch.device, dtype: torch.dtype) -> Tensor:
    """The norm of a list of partial norms, on ``device`` in ``dtype``; ``tensor(0.)`` for none."""
    if not norms:
        return torch.zeros((), device=device, dtype=dtype)
    if len(norms) == 1 and norm_type != 0:  # the norm of one norm is itself, except for p = 0
        return norms[0].to(device=device, dtype=dtype)
    stacked = torch.stack([n.to(device=device, dtype=torch.float64) for n in norms])
    return torch.linalg.vector_norm(stacked, norm_type).to(dtype)


def clip_coefficient(total: Tensor, max_norm: float) -> Tensor:
    """``min(1, max_norm / (total + 1e-6))`` on ``total``'s device; NaN stays NaN (torch.clamp)."""
    return torch.clamp(max_norm / (total + 1e-6), max=1.0)
