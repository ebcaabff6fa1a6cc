"""Shared helpers: float64 oracles and gradient factories. Every test draws fresh random inputs."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

import segclip

# Subprocesses started by the tests import segclip from this checkout, whether it is installed or
# only built in place (benchmarks/gpu_check.sh builds in place and installs nothing).
ROOT = Path(__file__).resolve().parents[1]
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

# Relative tolerances on the total norm against the float64 oracle (the specification).
NORM_RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 1e-3, torch.bfloat16: 1e-3}
ALL_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
KERNEL_NORM_TYPES = (2.0, 1.0, math.inf)
# Every kind of norm_type torch accepts: the kernel ones and the ones PyTorch computes for us.
OTHER_NORM_TYPES = (0.0, 0.5, 3.0, -math.inf, -1.0)

HAS_CPU_KERNEL = segclip.backends()["cpu"].available
needs_cpu_kernel = pytest.mark.skipif(not HAS_CPU_KERNEL, reason="segclip._C (CPU kernels) not built")
# The backends that can handle CPU gradients here.
CPU_BACKENDS = ("cpu", "torch") if HAS_CPU_KERNEL else ("torch",)


def oracle_norm(tensors, norm_type: float) -> float:
    """torch.nn.utils.get_total_norm's definition, in float64 on the CPU: the norm of the per-tensor
    norms (for norm_type 0 that counts tensors, not elements, as torch does). Empty tensors are
    skipped (torch raises for the inf norm of an empty tensor; segclip documents that it skips them)."""
    norms = []
    for t in tensors:
        if t.numel() == 0:
            continue
        t = t.detach().to("cpu")
        if t.layout == torch.sparse_coo:
            t = t.coalesce().values()
        norms.append(torch.linalg.vector_norm(t.to(torch.complex128 if t.is_complex() else torch.float64),
                                              norm_type))
    if not norms:
        return 0.0
    return torch.linalg.vector_norm(torch.stack(norms), norm_type).item()


def oracle_coef(total: float, max_norm: float) -> float:
    coef = max_norm / (total + 1e-6)
    return coef if math.isnan(coef) else min(coef, 1.0)


def rel_err(value: float, ref: float) -> float:
    if math.isnan(ref) or math.isnan(value):
        return 0.0 if (math.isnan(ref) and math.isnan(value)) else math.inf
    if math.isinf(ref) or math.isinf(value):
        return 0.0 if value == ref else math.inf
    return abs(value - ref) / max(abs(ref), 1e-300)


def assert_norm_close(value, ref: float, rtol: float) -> None:
    value = float(value)
    err = rel_err(value, ref)
    assert err <= rtol, f"norm {value!r} vs float64 reference {ref!r}: relative error {err:.3g} > {rtol:g}"


def assert_clipped_close(clipped: torch.Tensor, original: torch.Tensor, coef: float, rtol: float) -> None:
    """Clipped values against the exact float64 product ``original * coef``, element by element.

    ``rtol`` is the error allowed in the coefficient (it comes from the computed norm); on top of
    that each element may be off by one rounding to its dtype: one ulp at its magnitude
    (``eps * |x|``, or the subnormal spacing ``tiny * eps`` near zero). Comparing with the product
    rounded to the dtype instead would fail now and then on a legitimate one-ulp flip (bf16: 0.4%).
    Non-finite products must match exactly (NaN for NaN)."""
    assert clipped.shape == original.shape
    exact = original.detach().double().cpu() * coef
    got = clipped.detach().double().cpu()
    finite = torch.isfinite(exact)
    assert torch.equal(torch.isnan(got), torch.isnan(exact)), "NaN where the product has none, or the reverse"
    assert torch.equal(got[~finite & ~torch.isnan(exact)], exact[~finite & ~torch.isnan(exact)]), "inf mismatch"
    fi = torch.finfo(original.dtype)
    allowed = exact[finite].abs() * (rtol + fi.eps) + fi.tiny * fi.eps
    excess = (got[finite] - exact[finite]).abs() - allowed
    if excess.numel() and excess.max().item() > 0:
        i = int(excess.argmax())
        g, e = got[finite][i].item(), exact[finite][i].item()
        raise AssertionError(f"clipped gradient {g!r} vs float64 product {e!r}: off by {abs(g - e):.3g} "
                             f"(> {allowed[i].item():.3g}, rtol {rtol:g} + one {original.dtype} rounding)")


def make_params(shapes, dtype=torch.float32, scale=1.0, generator=None):
    """Parameters with random gradients (fresh each call), returned with copies of the gradients."""
    params = []
    for shape in shapes:
        p = torch.nn.Parameter(torch.zeros(shape, dtype=dtype))
        p.grad = (torch.randn(shape, dtype=torch.float64, generator=generator) * scale).to(dtype)
        params.append(p)
    return params, [p.grad.clone() for p in params]


# torch's clipping functions as the session found them: no test may leave segclip.patch_torch()
# applied (a leaked patch would make every later "against torch" comparison compare segclip with itself).
_TORCH_CLIP_NAMES = ("clip_grad_norm_", "get_total_norm", "clip_grads_with_norm_", "clip_grad_value_")
_TORCH_CLIP_ORIGINALS = {(m.__name__, n): getattr(m, n) for m in (torch.nn.utils, torch.nn.utils.clip_grad)
                         for n in _TORCH_CLIP_NAMES if hasattr(m, n)}


@pytest.fixture(autouse=True)
def _no_torch_patch_left():
    yield
    import sys

    leaked = [key for key, fn in _TORCH_CLIP_ORIGINALS.items() if getattr(sys.modules[key[0]], key[1]) is not fn]
    if leaked:
        from segclip import patch

        for handle in list(patch._stack):
            handle.undo()
        pytest.fail(f"the test left torch's clipping functions patched: {leaked}")
