"""The ``train_speed`` suite: the trainer's speed options on and off, and its overhead against a
plain training loop (``segclip bench --suite train_speed``; ``benchmarks/bench_train.py --speed``).

Implementations, each training the same model from the same initial weights on the same in-memory
batches of the synthetic dataset (loading is not measured), interleaved round by round so that a
change in machine load hits all of them alike:

  plain          :func:`plain_loop`, the 20-line loop people write: forward, cross-entropy,
                 backward, ``torch.nn.utils.clip_grad_norm_``, ``torch.optim.SGD`` (its default
                 implementation), nothing else
  trainer        the trainer's step (segclip.train.engine) with the plain loop's settings: the same
                 SGD object, ``--clip torch``; what it adds is its overhead (per-phase timing, the
                 per-step host read, the non-finite check, the step record)
  trainer-own    the trainer's defaults: ``--clip fused``, its fused SGD
  channels-last  trainer-own + ``--channels-last``
  compile        trainer-own + ``--compile`` (the compilation is a warmup step, reported apart)
  best           trainer-own + ``--channels-last --compile``

``median_s`` is the median, over rounds, of the wall time per step of a round (the whole step:
data already on the device, forward, backward, clip, optimizer step, and for the trainer its
bookkeeping), ``images_per_s`` = batch / median_s. The table gives each against ``plain``.
"""

from __future__ import annotations

import os
import statistics
import time

from ..cases import Case
from ..schema import Record
from . import Suite, Target
from .train import DEFAULT_MODELS, MIN_SIZE, make_batches
from .train import SUITE as TRAIN

IMPLS = {
    "plain": "plain loop",
    "trainer": "trainer, plain settings",
    "trainer-own": "trainer (fused clip + optimizer)",
    "channels-last": "+ channels_last",
    "compile": "+ compile",
    "best": "+ channels_last + compile",
}
# impl -> (channels_last, compile) on top of the trainer's own settings
OPTIONS = {"trainer-own": (False, False), "channels-last": (True, False), "compile": (False, True),
           "best": (True, True)}


def plain_loop(model, optimizer, batches, max_norm: float) -> None:
    """The baseline: what a plain training loop does per step, and nothing more."""
    import torch

    model.train()
    for images, masks in batches:
        out = model(images)
        loss = torch.nn.functional.cross_entropy(out["out"], masks, ignore_index=255)
        if "aux" in out:
            loss = loss + 0.5 * torch.nn.functional.cross_entropy(out["aux"], masks, ignore_index=255)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()


class TrainSpeedSuite(Suite):
    name = "train_speed"
    help = "the trainer's --channels-last / --compile on and off, and its overhead against a plain loop"
    default_cases = quick_cases = DEFAULT_MODELS
    baseline = "plain"
    presets = {"full": {"rounds": 5, "steps": None}, "quick": {"rounds": 1, "steps": 2}}
    targets = tuple(Target("cpu", m, "-", impl, "speedup", op, value)
                    for m in DEFAULT_MODELS for impl, op, value in (("trainer", ">=", 1 / 1.05), ("best", ">=", 1.0)))

    @property
    def cases(self) -> tuple[str, ...]:
        return TRAIN.cases  # the same models and parameter shapes as the train suite

    def impls(self, device: str) -> dict[str, tuple[str, str | None]]:
        return {k: (label, None) for k, label in IMPLS.items()}

    def make_case(self, name: str, device: str) -> Case:
        return TRAIN.make_case(name, device)

    def add_arguments(self, g) -> None:
        from ..cli import names

        g.add_argument("--speed-impls", type=names, nargs="+", action="extend", metavar="IMPL",
                       help=f"train_speed: implementations to run, from {', '.join(IMPLS)} (plain always "
                            f"runs: it is the baseline) [default: all]")

    # --size, --batch-size, --steps, --warmup, --max-norm and --amp are the train suite's flags.
    def check(self, s, fail) -> None:
        chosen = [i for group in (s.speed_impls or [list(IMPLS)]) for i in group]
        for i in chosen:
            if i not in IMPLS:
                raise fail(f"--speed-impls: unknown implementation {i!r}; choose from {', '.join(IMPLS)}")
        s.speed_impls = [i for i in IMPLS if i == "plain" or i in chosen]
        cuda = s.devices == ["cuda"]
        s.size = s.size or (320 if cuda else 96)
        s.batch_size = s.batch_size or (16 if cuda else 8)
        s.steps = s.steps or (10 if cuda else 6)  # per round
        if s.size < MIN_SIZE:
            raise fail(f"--size must be at least {MIN_SIZE} (the synthetic images' smallest side), got {s.size}")
        for m in s.models:
            if m.startswith("deeplabv3_") and s.batch_size < 2:
                raise fail(f"--models {m} needs --batch-size 2 or more (BatchNorm of its ASPP pooling branch)")

    def count_timings(self, s) -> int:
        return len(s.devices) * len(s.models) * len(s.speed_impls) * s.rounds

    def run(self, s, result: dict, progress) -> list[Record]:
        import torch

        from segclip.train.engine import StepConfig, TrainState, train_one_epoch
        from segclip.train.models import build_model
        from segclip.train.optim import build_optimizer, build_scheduler

        warmup = max(1, s.warmup)
        batches = make_batches(s.steps + warmup, s.size, s.batch_size)
        result.setdefault("extra", {})["load_average_start"] = os.getloadavg()
        records = []
        for device in map(torch.device, s.devices):
            for name in s.models:
                result["cases"].setdefault(device.type, {})[name] = self.make_case(name, device.type).as_json()
                torch.manual_seed(0)
                init = build_model(name, 21).state_dict()
                runners, compile_s = {}, {}
                for impl in s.speed_impls:
                    channels_last, compiled = OPTIONS.get(impl, (False, False))
                    fmt = torch.channels_last if channels_last else torch.contiguous_format
                    model = build_model(name, 21).to(device, memory_format=fmt)
                    model.load_state_dict(init)
                    data = [(x.to(device, memory_format=fmt), y.to(device)) for x, y in batches]
                    if impl in ("plain", "trainer"):
                        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
                    else:
                        opt, _ = build_optimizer(model, "sgd", 0.01, 0.9, 1e-4, device, log=lambda *a: None)
                    # SEGCLIP_COMPILE_BACKEND: as for segclip train (tests use aot_eager)
                    net = torch.compile(model, backend=os.environ.get("SEGCLIP_COMPILE_BACKEND") or "inductor") \
                        if compiled else model
                    if impl == "plain":
                        def step(d, model=net, opt=opt):
                            plain_loop(model, opt, d, s.max_norm)
                    else:
                        cfg = StepConfig(device=device, clip="torch" if impl == "trainer" else "fused",
                                         max_norm=s.max_norm, amp=s.amp, channels_last=channels_last)
                        kw = dict(model=net, optimizer=opt, scheduler=build_scheduler(opt, 10 ** 6, 0),
                                  scaler=torch.amp.GradScaler(device.type, enabled=False), cfg=cfg,
                                  state=TrainState())

                        def step(d, kw=kw):
                            train_one_epoch(loader=d, epoch=0, **kw)
                    t0 = time.perf_counter()
                    step(data[:1])  # the first step: compilation, allocations
                    compile_s[impl] = time.perf_counter() - t0
                    step(data[1:warmup])
                    runners[impl] = (step, data[warmup:])
                per_step = {impl: [] for impl in s.speed_impls}
                for _ in range(s.rounds):
                    for impl, (step, data) in runners.items():
                        t0 = time.perf_counter()
                        step(data)
                        per_step[impl].append((time.perf_counter() - t0) / len(data))
                        progress.update(1)
                progress.write(f"  {device.type} {name}: done")
                for impl, times in per_step.items():
                    med = statistics.median(times)
                    records.append(Record(device.type, name, impl, mode="-", median_s=med, min_s=min(times),
                                          n_samples=len(times), timer="train-wall", extra={
                                              "images_per_s": s.batch_size / med, "first_step_s": compile_s[impl],
                                              "steps_per_round": len(runners[impl][1])}))
                del runners
                torch._dynamo.reset()
        result["extra"]["load_average_end"] = os.getloadavg()
        result["extra"].update(batch_size=s.batch_size, size=s.size, threads=torch.get_num_threads())
        return records

    def tables(self, result: dict, markdown: bool) -> str:
        from ..report import NOT_MEASURED, markdown_table, text_table

        by = {(r.device, r.case, r.impl): r for r in result["records"]}
        out = []
        for device in dict.fromkeys(r.device for r in result["records"]):
            header = ["model", *(f"img/s {k}" for k in IMPLS), "trainer vs plain", "fastest option set vs plain",
                      "first step s (compile)"]
            rows = []
            for model in dict.fromkeys(r.case for r in result["records"] if r.device == device):
                recs = {k: by.get((device, model, k)) for k in IMPLS}
                ips = [f"{r.extra['images_per_s']:.3g}" if r else NOT_MEASURED for r in recs.values()]
                best_key = next((k for k in ("best", "compile", "channels-last", "trainer-own") if recs[k]), None)
                p = recs["plain"]

                def rel(k):
                    r = recs[k]
                    return f"{100 * (r.extra['images_per_s'] / p.extra['images_per_s'] - 1):+.1f}%" if r and p else NOT_MEASURED
                first = next((recs[k].extra["first_step_s"] for k in ("compile", "best") if recs[k]), None)
                rows.append([model, *ips, rel("trainer"), rel(best_key) if best_key else NOT_MEASURED,
                             f"{first:.1f}" if first is not None else NOT_MEASURED])
            load = result.get("extra", {})
            note = (f"load average {load.get('load_average_start', ['?'])[0]:.2f} at the start, "
                    f"{load.get('load_average_end', ['?'])[0]:.2f} at the end"
                    if load.get("load_average_start") else "")
            out.append(f"### {device}\n\n{markdown_table(header, rows)}\n\n{note}\n" if markdown
                       else f"== train_speed, {device} ==\n{text_table(header, rows)}\n{note}\n")
        return "\n".join(out)


SUITE = TrainSpeedSuite()
