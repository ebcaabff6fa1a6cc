#!/usr/bin/env python3
"""Training throughput with fused, torch and no clipping: images/s and the clip's share of a step.

For each model and each ``--clip`` mode, trains ``--steps`` timed steps (after ``--warmup`` untimed
ones) through the trainer's own step (segclip.train.engine: forward, backward, clip, optimizer
step), from the same initial weights, on in-memory batches of the synthetic dataset (so loading
is not measured). The modes are interleaved round by round (fused, torch, none, fused, ...), so a
change in machine load hits every mode alike.

Figures per (model, clip mode), from the engine's per-step timings (median over the timed steps):
  img/s       images / (forward + backward + clip + optimizer step)
  clip ms     the clip phase: fused_clip_, clip_grad_norm_, or (none) only the norm for the log
  clip share  clip / the whole step
  clipped     share of steps whose norm exceeded max_norm (the scaling pass then writes)

On CUDA the engine synchronises at every phase boundary (--sync-timing), so phase times are the
GPU's; on CPU ops are synchronous and timings exact. Results: a table, and JSON in --out.

    python benchmarks/bench_train.py                       # a small CPU set, about 2 minutes
    python benchmarks/bench_train.py --models fcn_resnet50 --size 256 --batch-size 8 --out results/
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import segclip  # noqa: E402
from segclip.bench import (  # noqa: E402
    non_negative_float, non_negative_int, positive_int, prepare_out_folder, usage_error,
)
from segclip.train.distributed import pick_device  # noqa: E402
from segclip.train.data import locate_voc, open_split, pad_collate  # noqa: E402
from segclip.train.engine import CLIP_MODES, StepConfig, TrainState, train_one_epoch  # noqa: E402
from segclip.train.models import MODELS, build_model  # noqa: E402
from segclip.train.optim import build_optimizer, build_scheduler  # noqa: E402
from segclip.train.synthetic import SyntheticSpec, ensure_synthetic  # noqa: E402
from segclip.train.transforms import train_transforms  # noqa: E402

DEFAULT_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
MIN_SIZE = 16  # the synthetic dataset's smallest image side
PROG = "bench_train.py"


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", default=",".join(DEFAULT_MODELS),
                   help=f"comma-separated models, from: {', '.join(MODELS)}")
    p.add_argument("--clips", default=",".join(CLIP_MODES), help="comma-separated clip modes")
    p.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu, cuda, cuda:N")
    p.add_argument("--size", type=positive_int, default=None,
                   help=f"crop side, at least {MIN_SIZE} (None: 96 on CPU, 320 on CUDA)")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="images per step; 2 or more for deeplabv3 models (None: 8 on CPU, 16 on CUDA)")
    p.add_argument("--steps", type=positive_int, default=None, help="timed steps per mode (None: 30 on CPU, 60 on CUDA)")
    p.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps per mode before the first round")
    p.add_argument("--rounds", type=positive_int, default=3, help="the timed steps are split into this many rounds")
    p.add_argument("--max-norm", type=non_negative_float, default=1.0,
                   help="clip threshold (low enough that clipping is active: the costlier case)")
    p.add_argument("--amp", action="store_true", help="fp16 (CUDA) / bf16 (CPU) autocast")
    p.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (None: torch's default)")
    p.add_argument("--out", default=None, help="folder for bench_train.json (None: print only)")
    return p.parse_args(argv)


def make_batches(n: int, size: int, batch: int, cache: Path | None = None) -> list:
    """``n`` augmented batches of the synthetic dataset, in memory."""
    root = ensure_synthetic(SyntheticSpec(num_train=max(batch * 4, 32), num_val=4, size=size), cache,
                            log=lambda *a: None)
    ds = open_split(locate_voc(root), "train", train_transforms(size), 21, seed=0)
    batches = []
    i = 0
    for _ in range(n):
        items = []
        for _ in range(batch):
            ds.set_epoch(i // len(ds))
            items.append(ds[i % len(ds)])
            i += 1
        batches.append(pad_collate(items))
    return batches


def resolve(args) -> tuple[torch.device, int, int, int, list[str], list[str]]:
    """(device, size, batch, steps, models, clips) from the arguments; a one-line error (exit 2)
    for any value that would fail later, before anything is built or timed."""
    try:
        device = pick_device(args.device)
    except ValueError as exc:
        raise usage_error(PROG, str(exc)) from None
    cuda = device.type == "cuda"
    size = args.size if args.size is not None else (320 if cuda else 96)
    batch = args.batch_size if args.batch_size is not None else (16 if cuda else 8)
    steps = args.steps if args.steps is not None else (60 if cuda else 30)
    if size < MIN_SIZE:
        raise usage_error(PROG, f"--size must be at least {MIN_SIZE} (the synthetic images' smallest side), got {size}")
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    clips = [c.strip() for c in args.clips.split(",") if c.strip()]
    if not models or not clips:
        raise usage_error(PROG, f"--{'models' if not models else 'clips'}: no name given")
    for m in models:
        if m not in MODELS:
            raise usage_error(PROG, f"unknown model {m!r}; choose from {', '.join(MODELS)}")
        if m.startswith("deeplabv3_") and batch < 2:
            raise usage_error(PROG, f"--models {m} needs --batch-size 2 or more: the image-pooling branch of "
                                    f"its ASPP head applies BatchNorm to a 1x1 map, and BatchNorm in training "
                                    f"needs more than one value per channel")
    for c in clips:
        if c not in CLIP_MODES:
            raise usage_error(PROG, f"unknown clip mode {c!r}; choose from {', '.join(CLIP_MODES)}")
    return device, size, batch, steps, models, clips


def run(args) -> dict:
    device, size, batch, steps, models, clips = resolve(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = device.type == "cuda"
    rounds = max(1, min(args.rounds, steps))
    per_round = [steps // rounds + (1 if r < steps % rounds else 0) for r in range(rounds)]
    batches = make_batches(max(per_round) + args.warmup, size, batch)
    print(f"bench_train: {device}, {torch.get_num_threads()} threads, batch {batch} x {size}px, {steps} timed "
          f"steps per mode in {rounds} rounds, max_norm {args.max_norm}, amp {args.amp}, "
          f"torch {torch.__version__}, segclip backends: "
          + ", ".join(str(b) for b in segclip.backends().values()), flush=True)
    results = []
    for name in models:
        torch.manual_seed(0)
        init = build_model(name, 21).state_dict()
        runs = {}
        for clip in clips:
            model = build_model(name, 21).to(device)
            model.load_state_dict(init)
            opt, impl = build_optimizer(model, "sgd", 0.01, 0.9, 1e-4, device, log=lambda *a: None)
            sched = build_scheduler(opt, 10 ** 6, 0)
            scaler = torch.amp.GradScaler(device.type, enabled=args.amp and cuda)
            cfg = StepConfig(device=device, clip=clip, max_norm=args.max_norm, amp=args.amp, sync_timing=True)
            state = TrainState()
            train_one_epoch(model, [(x.to(device), y.to(device)) for x, y in batches[:args.warmup]], opt,
                            sched, scaler, cfg, 0, state)
            runs[clip] = dict(model=model, opt=opt, sched=sched, scaler=scaler, cfg=cfg, state=state,
                              records=[], impl=impl)
        t0 = time.perf_counter()
        for r, n in enumerate(per_round):
            for clip in clips:
                s = runs[clip]
                data = [(x.to(device), y.to(device)) for x, y in batches[args.warmup:args.warmup + n]]
                train_one_epoch(s["model"], data, s["opt"], s["sched"], s["scaler"], s["cfg"], 1 + r,
                                s["state"], on_step=s["records"].append)
        wall = time.perf_counter() - t0
        for clip in clips:
            recs = runs[clip]["records"]
            phase = {p: statistics.median(rec[f"t_{p}"] for rec in recs) * 1e3
                     for p in ("forward", "backward", "clip", "step")}
            step_ms = statistics.median(sum(rec[f"t_{p}"] for p in ("forward", "backward", "clip", "step"))
                                        for rec in recs) * 1e3
            results.append({
                "model": name, "clip": clip, "images_per_s": batch / (step_ms / 1e3), "step_ms": step_ms,
                "phase_ms": phase, "clip_ms": phase["clip"], "clip_share": phase["clip"] / step_ms,
                "clipped_share": sum(rec["clipped"] for rec in recs) / len(recs),
                "grad_norm_median": statistics.median(rec["grad_norm"] for rec in recs if rec["grad_norm"] is not None),
                "steps": len(recs), "optimizer": runs[clip]["impl"],
            })
        print(f"  {name}: {wall:.1f} s", flush=True)
        del runs
    return {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "device": str(device), "device_name": torch.cuda.get_device_name(device) if cuda else platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "batch_size": batch, "size": size, "steps": steps, "max_norm": args.max_norm, "amp": args.amp,
            "results": results}


def table(report: dict) -> str:
    lines = [f"{'model':<30} {'clip':<6} {'img/s':>8} {'step ms':>9} {'clip ms':>8} {'clip share':>10} "
             f"{'clipped':>8} {'vs none':>8}"]
    base = {r["model"]: r["step_ms"] for r in report["results"] if r["clip"] == "none"}
    for r in report["results"]:
        over = f"{100 * (r['step_ms'] / base[r['model']] - 1):+7.1f}%" if r["model"] in base else ""
        lines.append(f"{r['model']:<30} {r['clip']:<6} {r['images_per_s']:>8.1f} {r['step_ms']:>9.1f} "
                     f"{r['clip_ms']:>8.2f} {100 * r['clip_share']:>9.2f}% {100 * r['clipped_share']:>7.0f}% {over:>8}")
    fused = {r["model"]: r["clip_ms"] for r in report["results"] if r["clip"] == "fused"}
    torch_ = {r["model"]: r["clip_ms"] for r in report["results"] if r["clip"] == "torch"}
    for m in fused:
        if m in torch_ and fused[m] > 0:
            lines.append(f"{m}: clip phase fused {fused[m]:.2f} ms vs torch {torch_[m]:.2f} ms "
                         f"({torch_[m] / fused[m]:.1f}x)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    resolve(args)  # every argument checked before the (minutes long) run
    out = prepare_out_folder(args.out, PROG) if args.out else None  # likewise the output folder
    report = run(args)
    print(table(report))
    if out is not None:
        (out / "bench_train.json").write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {out / 'bench_train.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
