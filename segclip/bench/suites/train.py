"""The ``train`` suite: training throughput with clip_optimizer_, fused_clip_, torch and no clipping (images/s and the
clip's share of a step); ``benchmarks/bench_train.py`` runs it.

For each model and each clip mode (``--clips``), trains ``--steps`` timed steps (after ``--warmup``
untimed ones) through the trainer's own step (segclip.train.engine: forward, backward, clip,
optimizer step), from the same initial weights, on in-memory batches of the synthetic dataset (so
loading is not measured). The modes are interleaved round by round (fused, torch, none, fused,
...), so a change in machine load hits every mode alike.

A record per (model, clip mode): ``median_s`` is the median step (forward + backward + clip +
optimizer step) and ``images_per_s`` = batch / step; ``phase_ms`` the median of each phase;
``clip_share`` clip / step; ``clipped_share`` the share of steps whose norm exceeded max_norm. On
CUDA the engine synchronises at every phase boundary, so phase times are the GPU's.
"""

from __future__ import annotations

import statistics
import time

from ..cases import Case
from ..schema import Record
from . import Suite

DEFAULT_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large")
# mode -> label. "fused" is the trainer's --clip fused: clip_optimizer_, folded into the fused SGD
# step; "fused_clip" is fused_clip_ and then the step (what --clip fused was before 2026-12-01).
CLIPS = {"fused": "clip_optimizer_", "fused_clip": "fused_clip_", "torch": "clip torch", "none": "no clip"}
MIN_SIZE = 16  # the synthetic dataset's smallest image side
PHASES = ("forward", "backward", "clip", "step")


class TrainSuite(Suite):
    name = "train"
    help = "training steps/s with fused, torch and no clipping (benchmarks/bench_train.py)"
    default_cases = quick_cases = DEFAULT_MODELS
    baseline = "torch"
    presets = {"full": {"rounds": 3, "steps": None}, "quick": {"rounds": 1, "steps": 6}}

    @property
    def cases(self) -> tuple[str, ...]:
        from segclip.train.models import MODELS

        return tuple(MODELS)

    def impls(self, device: str) -> dict[str, tuple[str, str | None]]:
        return {k: (label, None) for k, label in CLIPS.items()}

    def make_case(self, name: str, device: str) -> Case:
        from segclip.train.models import build_model

        import torch

        with torch.device("meta"):
            shapes = tuple(tuple(p.shape) for p in build_model(name, 21).parameters())
        return Case(name, shapes, f"segclip.train.models.build_model({name!r}, 21)")

    def add_arguments(self, g) -> None:
        from ..cli import names, non_negative_float, non_negative_int, positive_int

        g.add_argument("--clips", type=names, nargs="+", action="extend", metavar="CLIP",
                       help=f"clip modes, space or comma separated: {', '.join(CLIPS)} [default: all]")
        g.add_argument("--size", type=positive_int, help=f"crop side, at least {MIN_SIZE} [default: 96 on CPU, 320 on CUDA]")
        g.add_argument("--batch-size", type=positive_int,
                       help="images per step; 2 or more for deeplabv3 models [default: 8 on CPU, 16 on CUDA]")
        g.add_argument("--steps", type=positive_int, help="timed steps per mode [default: 30 on CPU, 60 on CUDA; --quick 6]")
        g.add_argument("--warmup", type=non_negative_int, default=3, help="untimed steps per mode first [default: 3]")
        g.add_argument("--max-norm", type=non_negative_float, default=1.0,
                       help="clip threshold (low enough that clipping is active: the costlier case) [default: 1.0]")
        g.add_argument("--amp", action="store_true", help="fp16 (CUDA) / bf16 (CPU) autocast")

    def check(self, s, fail) -> None:
        s.clips = [c for cs in s.clips for c in cs] if s.clips is not None else list(CLIPS)
        if not s.clips:
            raise fail("--clips: no name given")
        for c in s.clips:
            if c not in CLIPS:
                raise fail(f"unknown clip mode {c!r}; choose from {', '.join(CLIPS)}")
        cuda = s.devices == ["cuda"]
        s.size = s.size or (320 if cuda else 96)
        s.batch_size = s.batch_size or (16 if cuda else 8)
        s.steps = s.steps or (60 if cuda else 30)
        if s.size < MIN_SIZE:
            raise fail(f"--size must be at least {MIN_SIZE} (the synthetic images' smallest side), got {s.size}")
        for m in s.models:
            if m.startswith("deeplabv3_") and s.batch_size < 2:
                raise fail(f"--models {m} needs --batch-size 2 or more: the image-pooling branch of its ASPP head "
                           "applies BatchNorm to a 1x1 map, and BatchNorm in training needs more than one value per channel")

    def count_timings(self, s) -> int:
        return len(s.devices) * len(s.models) * len(s.clips) * s.rounds

    def run(self, s, result: dict, progress) -> list[Record]:
        import torch

        from segclip.train.engine import StepConfig, TrainState, train_one_epoch
        from segclip.train.models import build_model
        from segclip.train.optim import build_optimizer, build_scheduler

        rounds = max(1, min(s.rounds, s.steps))
        per_round = [s.steps // rounds + (r < s.steps % rounds) for r in range(rounds)]
        batches = make_batches(max(per_round) + s.warmup, s.size, s.batch_size)
        records = []
        for device in map(torch.device, s.devices):
            for name in s.models:
                result["cases"].setdefault(device.type, {})[name] = self.make_case(name, device.type).as_json()
                torch.manual_seed(0)
                init = build_model(name, 21).state_dict()
                runs = {}
                for clip in s.clips:
                    model = build_model(name, 21).to(device)
                    model.load_state_dict(init)
                    opt, impl = build_optimizer(model, "sgd", 0.01, 0.9, 1e-4, device, log=lambda *a: None)
                    run = dict(model=model, optimizer=opt, scheduler=build_scheduler(opt, 10 ** 6, 0),
                               scaler=torch.amp.GradScaler(device.type, enabled=s.amp and device.type == "cuda"),
                               cfg=StepConfig(device=device, clip="fused" if clip == "fused_clip" else clip,
                                              optimizer_clip=clip != "fused_clip", max_norm=s.max_norm,
                                              amp=s.amp, sync_timing=True),
                               state=TrainState())
                    train_one_epoch(loader=[(x.to(device), y.to(device)) for x, y in batches[:s.warmup]], epoch=0, **run)
                    runs[clip] = (run, [], impl)
                t0 = time.perf_counter()
                for r, n in enumerate(per_round):
                    for clip in s.clips:
                        run, steps, _ = runs[clip]
                        data = [(x.to(device), y.to(device)) for x, y in batches[s.warmup:s.warmup + n]]
                        train_one_epoch(loader=data, epoch=1 + r, on_step=steps.append, **run)
                        progress.update(1)
                progress.write(f"  {device.type} {name}: {time.perf_counter() - t0:.1f} s")
                for clip in s.clips:
                    _, steps, impl = runs[clip]
                    step_s = statistics.median(sum(st[f"t_{p}"] for p in PHASES) for st in steps)
                    phase = {p: statistics.median(st[f"t_{p}"] for st in steps) * 1e3 for p in PHASES}
                    norms = [st["grad_norm"] for st in steps if st["grad_norm"] is not None]
                    records.append(Record(device.type, name, clip, mode="-", median_s=step_s, n_samples=len(steps),
                                          timer="train-phases", extra={
                                              "images_per_s": s.batch_size / step_s, "phase_ms": phase,
                                              "clip_share": phase["clip"] / 1e3 / step_s,
                                              "clipped_share": sum(st["clipped"] for st in steps) / len(steps),
                                              "grad_norm_median": statistics.median(norms) if norms else None,
                                              "optimizer": impl}))
                del runs
        return records

    def tables(self, result: dict, markdown: bool) -> str:
        from ..report import NOT_MEASURED, markdown_table, text_table

        by = {(r.device, r.case, r.impl): r for r in result["records"]}
        modes = [c for c in CLIPS if any(r.impl == c for r in result["records"])]
        clipping = [c for c in modes if c in ("fused", "fused_clip")]
        out = []
        for device in dict.fromkeys(r.device for r in result["records"]):
            rows = []
            for model in dict.fromkeys(r.case for r in result["records"] if r.device == device):
                rec = {c: by.get((device, model, c)) for c in modes}
                torch_rec = rec.get("torch")
                ips = [f"{r.extra['images_per_s']:.3g}" if r else NOT_MEASURED for r in rec.values()]
                ratios = [f"{rec[c].extra['images_per_s'] / torch_rec.extra['images_per_s']:.2f}x"
                          if rec[c] and torch_rec else NOT_MEASURED for c in clipping]
                share = [f"{100 * rec[c].extra['clip_share']:.1f}%" if rec[c] else NOT_MEASURED
                         for c in modes if c != "none"]
                rows.append([model, *ips, *ratios, *share])
            header = (["model"] + [f"images/s {CLIPS[c]}" for c in modes]
                      + [f"{CLIPS[c]} vs torch" for c in clipping]
                      + [f"clip share ({CLIPS[c]})" for c in modes if c != "none"])
            out.append(f"### {device}\n\n{markdown_table(header, rows)}\n" if markdown
                       else f"== train, {device} ==\n{text_table(header, rows)}\n")
        return "\n".join(out)


def make_batches(n: int, size: int, batch: int) -> list:
    """``n`` augmented batches of the synthetic dataset, in memory."""
    from segclip.train.data import locate_voc, open_split, pad_collate
    from segclip.train.synthetic import SyntheticSpec, ensure_synthetic
    from segclip.train.transforms import train_transforms

    root = ensure_synthetic(SyntheticSpec(num_train=max(batch * 4, 32), num_val=4, size=size), None, log=lambda *a: None)
    ds = open_split(locate_voc(root), "train", train_transforms(size), 21, seed=0)
    batches = []
    for b in range(n):
        items = []
        for i in range(b * batch, (b + 1) * batch):
            ds.set_epoch(i // len(ds))
            items.append(ds[i % len(ds)])
        batches.append(pad_collate(items))
    return batches


SUITE = TrainSuite()
