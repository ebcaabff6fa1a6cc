"""``segclip demo``: clips the gradients of a real torchvision segmentation model with every
available backend and with torch, and prints the norms and times side by side."""

from __future__ import annotations

import argparse
import time

import torch

SEGMENTATION_MODELS = (
    "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "fcn_resnet101",
    "deeplabv3_resnet50", "deeplabv3_resnet101",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="clip a segmentation model's gradients with each backend",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lraspp_mobilenet_v3_large", choices=SEGMENTATION_MODELS)
    p.add_argument("--max-norm", type=float, default=1.0)
    p.add_argument("--size", type=int, default=128, help="input image side, pixels")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per implementation")
    p.set_defaults(func=run)


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def run(args: argparse.Namespace) -> int:
    import torchvision

    import segclip

    torch.manual_seed(0)
    model = torchvision.models.get_model(args.model, weights=None, weights_backbone=None, num_classes=21)
    image = torch.randn(2, 3, args.size, args.size)
    target = torch.randint(0, 21, (2, args.size, args.size))
    loss = torch.nn.functional.cross_entropy(model(image)["out"], target)
    loss.backward()
    params = [p for p in model.parameters() if p.grad is not None]
    saved = [p.grad.clone() for p in params]
    n_elems = sum(g.numel() for g in saved)
    print(f"{args.model}: {len(params)} gradient tensors, {n_elems:,} elements, loss {loss.item():.4f}")
    for name, info in segclip.backends().items():
        print(f"  backend {info}")

    def restore():
        for p, g in zip(params, saved):
            p.grad.copy_(g)

    impls = {"torch.nn.utils.clip_grad_norm_": lambda: torch.nn.utils.clip_grad_norm_(params, args.max_norm)}
    for name, info in segclip.backends().items():
        if info.available and name != "cuda":
            impls[f"segclip.fused_clip_ [{name}]"] = (
                lambda b=name: segclip.fused_clip_(params, args.max_norm, backend=b))
    print(f"{'implementation':<36} {'total norm':>12} {'ms/call':>9}")
    for name, fn in impls.items():
        restore()
        norm = float(fn())
        clipped = torch.cat([p.grad.double().flatten() for p in params]).norm().item()
        ms = _median_ms(lambda: (restore(), fn()), args.repeats) - _median_ms(restore, args.repeats)
        print(f"{name:<36} {norm:>12.6f} {max(ms, 0.0):>9.3f}   (norm after clipping {clipped:.6f})")
    return 0
