"""How far segclip's clipping drifts from torch's over a training run (README, "drop-in").

Two copies of one seeded model train on the same batches, one clipped by
``torch.nn.utils.clip_grad_norm_``, one by ``segclip.fused_clip_``, with clipping active on every
step. Printed: the relative difference of the two runs' norms (and of each against a float64 norm of
the same gradients) at the first step, and the relative difference of their parameters
(``||a - b|| / ||b||``) after each checkpoint step.

    .venv/bin/python benchmarks/drift.py [--steps 1000] [--backend cpu]
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

import torch  # noqa: E402

import segclip  # noqa: E402


def make_model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 32, 3, stride=2, padding=1),
        torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(512, 256),
        torch.nn.ReLU(), torch.nn.Linear(256, 10))


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def f64_norm(model: torch.nn.Module) -> float:
    return torch.linalg.vector_norm(torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])).item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--max-norm", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    # The control: torch against itself with max_norm one float32 ulp larger, i.e. a coefficient that
    # differs in its last bit, as segclip's may. It drifts as far: the divergence is the training's.
    runs = {"torch": make_model(args.seed), "segclip": make_model(args.seed), "torch+1ulp": make_model(args.seed)}
    ulp_norm = float(torch.nextafter(torch.tensor(args.max_norm), torch.tensor(math.inf)))
    opts = {k: torch.optim.SGD(m.parameters(), lr=args.lr, momentum=0.9) for k, m in runs.items()}
    n_params = sum(p.numel() for p in runs["torch"].parameters())
    print(f"model: small CNN, {n_params:,} fp32 parameters; SGD lr {args.lr} momentum 0.9; batch 16 of 3x8x8; "
          f"max_norm {args.max_norm}; segclip backend {args.backend!r}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    gen = torch.Generator().manual_seed(args.seed + 1)
    checkpoints = {1, 10, 100, 300, 1000, 10000, args.steps}
    norm_rel, ref_rel, active = [], {name: [] for name in runs}, 0
    print(f"{'step':>6}  {'params rel. diff, segclip vs torch':>34}  {'torch+1ulp vs torch':>19}")
    for step in range(1, args.steps + 1):
        x = torch.randn(16, 3, 8, 8, generator=gen)
        y = torch.randint(0, 10, (16,), generator=gen)
        norms = {}
        for name, model in runs.items():
            opts[name].zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            ref = f64_norm(model)
            if name == "torch":
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_norm)
            elif name == "torch+1ulp":
                total = torch.nn.utils.clip_grad_norm_(model.parameters(), ulp_norm)
            else:
                total = segclip.fused_clip_(model.parameters(), args.max_norm, backend=args.backend)
            norms[name] = total.item()
            ref_rel[name].append(abs(norms[name] - ref) / ref)
            opts[name].step()
        active += norms["torch"] > args.max_norm
        norm_rel.append(abs(norms["segclip"] - norms["torch"]) / norms["torch"])
        if step == 1:
            print(f"  step 1 norms: torch {norms['torch']!r}, segclip {norms['segclip']!r} "
                  f"(relative difference {norm_rel[0]:.2g})")
        if step in checkpoints:
            a, b, c = flat(runs["segclip"]), flat(runs["torch"]), flat(runs["torch+1ulp"])
            print(f"{step:>6}  {(a - b).norm().item() / b.norm().item():>34.3g}  "
                  f"{(c - b).norm().item() / b.norm().item():>19.3g}")

    def stats(v):
        return f"median {sorted(v)[len(v) // 2]:.2g}, max {max(v):.2g}"

    print(f"clipping active on {active} of {args.steps} steps")
    print(f"norms, segclip vs torch (same weights only at step 1, then each run's own): {stats(norm_rel)}")
    for name in ("torch", "segclip"):
        print(f"norms, {name} vs float64 of its own gradients: {stats(ref_rel[name])}")
    return 0 if all(math.isfinite(v) for v in norm_rel) else 1


if __name__ == "__main__":
    sys.exit(main())
