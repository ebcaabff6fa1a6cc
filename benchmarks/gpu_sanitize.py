#!/usr/bin/env python3
"""Every path of segclip's CUDA kernels once, on small inputs, for compute-sanitizer.

benchmarks/gpu_check.sh runs it under `compute-sanitizer --tool memcheck | racecheck | synccheck`
with PYTORCH_NO_CUDA_MEMORY_CACHING=1 (each tensor its own allocation, so memcheck sees its exact
bounds). Paths: the fused norm for norm types 2, 1 and inf over every dtype, misaligned views,
empties first/middle/last, a 0-dim tensor, a transposed and a channels_last tensor, a view with
gaps (packed copy) and more tensors than one launch's table (several launches, the last-block
reduction across them); the norm of an all-empty list; the coefficient; the fused scale with
coef < 1 and coef >= 1 (nothing written); the strided scale; the out-of-place scale of a view that
may overlap itself; the per-group partials over the same list (several launches, group runs); the
adaptive clip's three unit kinds (warp rows, block rows, split rows), packed non-contiguous gradients,
a gradient listed twice. Each result is checked against float64 on the CPU, so a race that changes a
value fails here as well as in the sanitizer's report.

    python3 benchmarks/gpu_sanitize.py             # exit 0: every check passed
    python3 benchmarks/gpu_sanitize.py --dry-run   # on the CPU (the CPU kernels), to test this script
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # segclip from this checkout (built in place)

import segclip  # noqa: E402  (loads the libraries, registers the ops)

ops = torch.ops.segclip
FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(("ok    " if ok else "FAIL  ") + what)
    if not ok:
        FAILURES.append(what)


def ref_norm(tensors, norm_type: float) -> float:
    xs = [t.detach().cpu().double().reshape(-1) for t in tensors if t.numel() > 0]
    if not xs:
        return 0.0
    x = torch.cat(xs)
    return float(x.abs().max()) if math.isinf(norm_type) else float(torch.linalg.vector_norm(x, norm_type))


def close(value: float, ref: float, rtol: float) -> bool:
    return value == ref or abs(value - ref) <= rtol * abs(ref)


def tensors(device: str) -> list[torch.Tensor]:
    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, device=device).to(dtype)
    ts = [r(0), r(70_001)[1:], r(1003, dtype=torch.bfloat16)[3:], r(513, dtype=torch.float16), r(0),
          r(129, dtype=torch.float64), r(()), r(300, 517).t(),
          r(6, 16, 9, 7).contiguous(memory_format=torch.channels_last), r(64, 131)[:, ::2], r(3, 0, 5)]
    dtypes = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    ts += [r(1 + (i * 37) % 300, dtype=dtypes[i % 4]) for i in range(130)]  # > 100 tensors: several launches
    return ts + [r(0)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU")
    args = parser.parse_args()
    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: use --dry-run to exercise the script on the CPU")
        return 2
    device = "cpu" if args.dry_run else "cuda"
    torch.manual_seed(int.from_bytes(os.urandom(4), "little"))

    ts = tensors(device)
    for norm_type in (2.0, 1.0, math.inf):
        got = float(ops.multi_tensor_norm(ts, norm_type))
        check(close(got, ref_norm(ts, norm_type), 1e-3), f"norm {norm_type} over {len(ts)} tensors: {got:.6g}")
    check(float(ops.multi_tensor_norm([torch.randn(0, device=device)], 2.0)) == 0.0, "norm of an all-empty list")

    before = [t.clone() for t in ts]
    ref = ref_norm(ts, 2.0)
    norm, coef = ops.multi_tensor_norm_coef(ts, 2.0, ref * 10)
    ops.multi_tensor_scale_(ts, coef)
    check(float(coef) == 1.0 and all(torch.equal(a, b) for a, b in zip(ts, before)),
          "coef >= 1: nothing written")
    norm, coef = ops.multi_tensor_norm_coef(ts, 2.0, ref / 3)
    c = float(coef)
    check(close(c, (ref / 3) / (ref + 1e-6), 1e-3), f"coefficient {c:.6g}")
    ops.multi_tensor_scale_(ts, coef)
    bad = []
    for i, (t, b) in enumerate(zip(ts, before)):  # the coefficient's error plus one rounding per element
        exact = b.cpu().double() * c
        fi = torch.finfo(b.dtype)
        if bool(((t.cpu().double() - exact).abs() > exact.abs() * (1e-6 + fi.eps) + fi.tiny).any()):
            bad.append(i)
    check(not bad, f"fused scale of {len(ts)} tensors" + (f": wrong in tensors {bad[:10]}" if bad else ""))

    views = []
    b = torch.randn(64, 131, device=device)
    views.append(("strided scale", b, b[:, ::2]))
    b = torch.randn(*[3] * 9, device=device)
    views.append(("9-dimensional view (out of place)", b, b[(slice(None, None, 2),) * 9]))
    b = torch.randn(5, device=device)
    views.append(("self-overlapping view (out of place)", b, b.as_strided((3, 3), (1, 1))))
    for name, base, view in views:
        mask = torch.zeros_like(base, dtype=torch.bool)
        mask.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        old = base.clone()
        ops.multi_tensor_scale_([view], torch.tensor(0.5, device=device))
        check(torch.equal(base[mask], old[mask] * 0.5) and torch.equal(base[~mask], old[~mask]), name)

    # One memory in two entries: scaled by one launch per entry, in turn (no race for racecheck to see).
    b = torch.randn(70_000, device=device)
    old = b.clone()
    ops.multi_tensor_scale_([b[:50_000], b[20_000:]], torch.tensor(0.5, device=device))
    check(torch.equal(b[20_000:50_000], old[20_000:50_000] * 0.25) and torch.equal(b[:20_000], old[:20_000] * 0.5)
          and torch.equal(b[50_000:], old[50_000:] * 0.5), "overlapping entries scaled once per entry")

    # Per-group partials: the norm's list, groups interleaved (more runs than the 4 KiB layout's table).
    ts = tensors(device)
    groups = [(i * 7) % 5 for i in range(len(ts))]
    for norm_type in (2.0, 1.0, math.inf):
        out = ops.multi_tensor_group_partials(ts, groups, 6, norm_type).cpu().tolist()
        ok = True
        for k in range(6):
            members = [t for t, g in zip(ts, groups) if g == k]
            want = ref_norm(members, norm_type)
            want = want if math.isinf(norm_type) else want ** norm_type
            ok &= close(out[k], want, 2e-3)
        want = ref_norm(ts, norm_type)
        ok &= close(out[-1], want if math.isinf(norm_type) else want ** norm_type, 2e-3)
        check(ok, f"group partials {norm_type} over {len(ts)} tensors in 6 groups")

    # Adaptive clip: every kind of unit, packed gradients, one gradient listed twice.
    shapes = [(300, 64, 1, 1), (96, 1, 3, 3), (64,), (), (0,), (5, 1500), (3, 70_000), (140_001,), (40, 33)]
    ws = [torch.randn(s, device=device) for s in shapes]
    gs = [torch.randn(s, device=device) * (0.001 if i % 2 else 1.0) for i, s in enumerate(shapes)]
    wt, gt = torch.randn(70, 9, device=device), torch.randn(70, 9, device=device)
    ws.append(wt.t())
    gs.append(gt.t())  # not contiguous: a packed copy, written back
    want = []
    for w, g in zip(ws, gs):
        w64, g64 = w.cpu().double(), g.cpu().double()
        rows = 1 if g64.ndim <= 1 else g64.shape[0]
        if g64.numel() == 0:
            want.append(g64)
            continue
        wn = w64.reshape(rows, -1).norm(dim=1).clamp(min=1e-3) * 0.01
        gn = g64.reshape(rows, -1).norm(dim=1)
        scale = torch.where(gn < wn, torch.ones_like(gn), wn / gn.clamp(min=1e-6))
        want.append((g64.reshape(rows, -1) * scale[:, None]).reshape(g64.shape))
    ops.multi_tensor_adaptive_clip_(ws, gs, 0.01, 1e-3, 2.0)
    bad = [i for i, (g, w) in enumerate(zip(gs, want))
           if not bool(((g.cpu().double() - w).abs() <= 2e-6 * w.abs() + 1e-30).all())]
    check(not bad, f"adaptive clip of {len(gs)} pairs" + (f": wrong in grads {bad}" if bad else ""))
    g = torch.randn(6, 200, device=device)
    g_cpu = g.cpu()
    w1, w2 = torch.randn(6, 200, device=device), torch.randn(6, 200, device=device) * 0.1
    ops.multi_tensor_adaptive_clip_([w1, w2], [g, g], 0.01, 1e-3, 2.0)
    ops.multi_tensor_adaptive_clip_([w1.cpu(), w2.cpu()], [g_cpu, g_cpu], 0.01, 1e-3, 2.0)
    check(bool(((g.cpu() - g_cpu).abs() <= 4e-6 * g_cpu.abs()).all()), "adaptive clip: a gradient listed twice")

    if device == "cuda":
        torch.cuda.synchronize()
    print(f"{len(FAILURES)} failed" if FAILURES else "all checks passed")
    return 1 if FAILURES else 0


if __name__ == "__main__":
    sys.exit(main())
