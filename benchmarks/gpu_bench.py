#!/usr/bin/env python3
"""GPU benchmark of segclip's CUDA kernels against torch.nn.utils.clip_grad_norm_(foreach=True).

Cases (float32 gradients on one GPU, norm_type 2):
  * gradients shaped like the parameters of torchvision's lraspp_mobilenet_v3_large,
    deeplabv3_mobilenet_v3_large and deeplabv3_resnet50 (num_classes=21, no weights), with clipping
    active (every call scales) and not active (max_norm far above the norm: nothing to write);
  * 2 GiB of float32 spread over 200 tensors, against the measured device-to-device copy bandwidth
    (bytes: one read for the norm, one read + one write for the scale).
Implementations side by side in one run: torch (clip_grad_norm_, foreach=True), ops
(torch.ops.segclip.multi_tensor_norm_coef + multi_tensor_scale_) and api (segclip.fused_clip_, when
the Python package is importable).

Timing: CUDA events around `iters` back-to-back calls (so launch and Python overhead count, as in a
training loop), after synchronising; the median over `rounds` rounds. Gradients are restored between
rounds (not timed). With clipping active each call gets a max_norm half the previous one, so every
call really scales (a repeated clip with the same max_norm stops scaling after the first call).

Targets (printed, not asserted): >= 3x vs torch for the two mobilenet models when clipping, >= 1.2x
for resnet50, >= 2.5x when nothing is clipped, >= 90% of the copy bandwidth for 2 GiB.

    python3 benchmarks/gpu_bench.py [--out results.json]
    python3 benchmarks/gpu_bench.py --dry-run     # CPU only: builds every case, runs every code path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # segclip from this checkout (built in place)

MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50")
TARGETS = {  # speedup over torch (ops path), or % of copy bandwidth
    ("lraspp_mobilenet_v3_large", "clip"): 3.0,
    ("deeplabv3_mobilenet_v3_large", "clip"): 3.0,
    ("deeplabv3_resnet50", "clip"): 1.2,
    ("lraspp_mobilenet_v3_large", "noclip"): 2.5,
    ("deeplabv3_mobilenet_v3_large", "noclip"): 2.5,
    ("deeplabv3_resnet50", "noclip"): 2.5,
    "copy_bandwidth_pct": 90.0,
}

PROG = "gpu_bench.py"


def _positive(kind: type):
    """argparse type: a number of ``kind`` above 0 (NaN and inf refused)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def check_out(out: Path) -> str | None:
    """Why ``--out`` cannot be written (None when it can); its folder is created. Checked before the
    run, so that a bad path costs no GPU time and no results are lost at the end."""
    if out.is_dir():
        return f"--out {out}: is a folder; give a file name, e.g. {out / 'gpu_bench.json'}"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return f"--out {out}: cannot create its folder {out.parent} ({exc.strerror or exc})"
    if not os.access(out.parent, os.W_OK | os.X_OK) or (out.exists() and not os.access(out, os.W_OK)):
        return f"--out {out}: cannot write there (permission denied)"
    return None


def spread_shapes(total_elems: int, n: int, seed: int = 0) -> list[tuple[int, ...]]:
    """n 1-d tensors of uneven sizes adding up to total_elems."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.rand(n, generator=gen, dtype=torch.float64) + 0.5
    sizes = (w / w.sum() * total_elems).floor().long()
    sizes[-1] += total_elems - int(sizes.sum())
    return [(int(s),) for s in sizes]


class Impls:
    """The clipping implementations, each a callable (max_norm) -> None over one set of gradients."""

    def __init__(self, grads: list[torch.Tensor], device: torch.device):
        self.grads = grads
        self.params = []
        for g in grads:
            p = torch.nn.Parameter(g.detach())  # shares g's memory: only .grad is ever read
            p.grad = g
            self.params.append(p)
        self.foreach = device.type == "cuda"  # foreach=True refuses CPU tensors (dry run)
        self.fused_clip_ = load_api()

    def available(self) -> list[str]:
        return ["torch", "ops"] + (["api"] if self.fused_clip_ is not None else [])

    def run(self, name: str, max_norm: float) -> None:
        if name == "torch":
            torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=self.foreach)
        elif name == "ops":
            _, coef = torch.ops.segclip.multi_tensor_norm_coef(self.grads, 2.0, max_norm)
            torch.ops.segclip.multi_tensor_scale_(self.grads, coef)
        elif name == "api":
            self.fused_clip_(self.params, max_norm)
        else:
            raise ValueError(name)


def load_ops(device: torch.device) -> None:
    import segclip._C  # noqa: F401
    if device.type == "cuda":
        import segclip._C_cuda  # noqa: F401


def load_api():
    try:
        from segclip import fused_clip_
        return fused_clip_
    except Exception:
        return None


def timed(fn, iters: int, rounds: int, device: torch.device, before_round=None) -> dict:
    """Median and min over rounds of the time per call (us) of `iters` back-to-back calls fn(i)."""
    per_call = []
    for r in range(rounds + 1):  # round 0: warm-up
        if before_round is not None:
            before_round()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(iters):
                fn(i)
            end.record()
            end.synchronize()
            elapsed_us = start.elapsed_time(end) * 1e3
        else:
            t0 = time.perf_counter()
            for i in range(iters):
                fn(i)
            elapsed_us = (time.perf_counter() - t0) * 1e6
        if r > 0:
            per_call.append(elapsed_us / iters)
    return {"median_us": statistics.median(per_call), "min_us": min(per_call), "rounds": rounds, "iters": iters}


def bench_grads(impls: Impls, saved: list[torch.Tensor], scenario: str, iters: int, rounds: int,
                device: torch.device) -> dict:
    """Times every implementation on the same gradients; restores them before each round."""
    total = float(torch.ops.segclip.multi_tensor_norm(saved, 2.0))

    def restore():
        torch._foreach_copy_(impls.grads, saved)

    def max_norm_at(i: int) -> float:
        if scenario == "clip":  # half the previous call's: every call scales (see the module docstring)
            return 0.5 * total * 0.5 ** i
        return 1e6 * total + 1.0  # far above the norm: nothing to clip

    results = {}
    for name in impls.available():
        results[name] = timed(lambda i: impls.run(name, max_norm_at(i)), iters, rounds, device, restore)
    # Sanity: every implementation gives the same norm after its first call.
    results["norm_before"] = total
    results["norm_after_first_call"] = {}
    for name in impls.available():
        restore()
        impls.run(name, max_norm_at(0))
        results["norm_after_first_call"][name] = float(torch.ops.segclip.multi_tensor_norm(impls.grads, 2.0))
    restore()
    return results


def copy_bandwidth(nbytes: int, device: torch.device, rounds: int) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = timed(lambda i: dst.copy_(src), 5, rounds, device)
    del src, dst
    gbps = 2 * nbytes / (t["median_us"] * 1e-6) / 1e9  # one read + one write
    return {"bytes": nbytes, "median_us": t["median_us"], "GBps": gbps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    ap.add_argument("--dry-run", action="store_true",
                    help="CPU only, tiny sizes: builds every case and runs every code path (no GPU needed)")
    ap.add_argument("--iters", type=_positive(int), default=30, help="calls per timed round (model cases)")
    ap.add_argument("--rounds", type=_positive(int), default=7, help="timed rounds (median reported)")
    ap.add_argument("--big-gib", type=_positive(float), default=2.0, help="size of the bandwidth case in GiB")
    args = ap.parse_args(argv)
    if args.out is not None and (problem := check_out(args.out)):
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 2

    if args.dry_run:
        device = torch.device("cpu")
        args.iters, args.rounds, big_bytes = 3, 2, 8 << 20
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: use --dry-run to exercise the script on the CPU", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        big_bytes = int(args.big_gib * (1 << 30)) // 16 * 16
    load_ops(device)
    torch.manual_seed(0)

    env = {
        "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (dry run)",
        "segclip_api": load_api() is not None, "dry_run": args.dry_run,
    }
    print("env:", json.dumps(env))
    report = {"env": env, "targets": {f"{k[0]}/{k[1]}" if isinstance(k, tuple) else k: v for k, v in TARGETS.items()},
              "models": {}, "bandwidth": {}}

    # --- model-shaped gradients
    from segclip.bench import model_grad_shapes

    for model in MODELS:
        shapes = model_grad_shapes(model)  # torchvision on the meta device (the GPU image ships it)
        if args.dry_run:
            shapes = shapes[:40]
        saved = [torch.randn(s, device=device) for s in shapes]
        grads = [s.clone() for s in saved]
        impls = Impls(grads, device)
        entry = {"tensors": len(shapes), "elements": sum(math.prod(s) for s in shapes), "shapes_from": "torchvision"}
        for scenario in ("clip", "noclip"):
            entry[scenario] = bench_grads(impls, saved, scenario, args.iters, args.rounds, device)
            r = entry[scenario]
            line = "  ".join(f"{n} {r[n]['median_us']:8.1f} us" for n in impls.available())
            print(f"{model:<30} {scenario:<7} {line}", flush=True)
        report["models"][model] = entry
        del saved, grads, impls

    # --- bandwidth: 2 GiB over 200 tensors
    copy = copy_bandwidth(big_bytes, device, args.rounds)
    shapes = spread_shapes(big_bytes // 4, 200)
    saved = [torch.randn(s, device=device) for s in shapes]
    grads = [s.clone() for s in saved]
    impls = Impls(grads, device)
    big = {"bytes": big_bytes, "tensors": len(shapes), "copy": copy}
    iters = 5 if not args.dry_run else 2
    big["clip"] = bench_grads(impls, saved, "clip", iters, args.rounds, device)
    big["noclip"] = bench_grads(impls, saved, "noclip", iters, args.rounds, device)
    norm_only = timed(lambda i: torch.ops.segclip.multi_tensor_norm(grads, 2.0), iters, args.rounds, device)
    coef = torch.tensor(0.999, device=device)
    scale_only = timed(lambda i: torch.ops.segclip.multi_tensor_scale_(grads, coef), iters, args.rounds, device,
                       lambda: torch._foreach_copy_(grads, saved))
    big["norm_only"], big["scale_only"] = norm_only, scale_only
    to_gbps = lambda nbytes, us: nbytes / (us * 1e-6) / 1e9  # noqa: E731
    big["GBps"] = {
        "norm (1 read)": to_gbps(big_bytes, norm_only["median_us"]),
        "scale (1 read + 1 write)": to_gbps(2 * big_bytes, scale_only["median_us"]),
        **{f"clip {n} (3 x bytes)": to_gbps(3 * big_bytes, big["clip"][n]["median_us"]) for n in impls.available()},
    }
    big["pct_of_copy"] = {k: 100.0 * v / copy["GBps"] for k, v in big["GBps"].items()}
    report["bandwidth"] = big
    del saved, grads, impls

    # --- summary
    rows = []
    for model in MODELS:
        for scenario in ("clip", "noclip"):
            r = report["models"][model][scenario]
            t_torch, t_ops = r["torch"]["median_us"], r["ops"]["median_us"]
            speedup = t_torch / t_ops
            api = f"{t_torch / r['api']['median_us']:6.2f}x" if "api" in r else "     -"
            target = TARGETS[(model, scenario)]
            verdict = "-" if args.dry_run else "ok" if speedup >= target else "MISS"  # CPU figures judge nothing
            rows.append((f"{model} {scenario}", f"{t_torch:9.1f}", f"{t_ops:9.1f}", f"{speedup:6.2f}x", api,
                         f">={target}x", verdict))
            report["models"][model][scenario]["speedup_ops"] = speedup
    pct = big["pct_of_copy"]["clip ops (3 x bytes)"]
    rows.append((f"{big_bytes / 2**30:.2f} GiB/200 clip", f"{big['clip']['torch']['median_us']:9.1f}",
                 f"{big['clip']['ops']['median_us']:9.1f}",
                 f"{big['clip']['torch']['median_us'] / big['clip']['ops']['median_us']:6.2f}x",
                 f"{big['clip']['torch']['median_us'] / big['clip']['api']['median_us']:6.2f}x" if "api" in big["clip"] else "     -",
                 f">={TARGETS['copy_bandwidth_pct']:.0f}%bw",
                 f"{pct:5.1f}%" + ("" if args.dry_run else " ok" if pct >= TARGETS["copy_bandwidth_pct"] else " MISS")))
    header = ("case", "torch us", "ops us", "ops", "api", "target", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    lines = ["  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header] + rows]
    lines.append(f"copy bandwidth {copy['GBps']:.0f} GB/s; norm {big['GBps']['norm (1 read)']:.0f} GB/s "
                 f"({big['pct_of_copy']['norm (1 read)']:.0f}%), scale {big['GBps']['scale (1 read + 1 write)']:.0f} GB/s "
                 f"({big['pct_of_copy']['scale (1 read + 1 write)']:.0f}%)")
    if args.dry_run:
        lines.append("dry run: targets not evaluated (CPU figures, tiny sizes: they say nothing about the GPU)")
    report["summary_table"] = lines
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2))
    print()
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
