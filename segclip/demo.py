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


CUDA_DEVICE = "cuda"  # where the cuda backend's copy of the gradients lives (a test points it elsewhere)


def register(sub: argparse._SubParsersAction) -> None:
    from .bench import non_negative_float, positive_int

    p = sub.add_parser("demo", help="clip a segmentation model's gradients with each backend",
                       description="Clips the gradients of a torchvision segmentation model (computed on the "
                                   "CPU) with torch.nn.utils.clip_grad_norm_ and with segclip.fused_clip_ on "
                                   "every available backend (cpu, torch, and cuda on a copy of the gradients "
                                   "on the GPU when one is visible); prints norms and times side by side.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="lraspp_mobilenet_v3_large", choices=SEGMENTATION_MODELS)
    p.add_argument("--max-norm", type=non_negative_float, default=1.0, help="clip threshold, 0 or more")
    p.add_argument("--size", type=positive_int, default=128, help="input image side, pixels")
    p.add_argument("--repeats", type=positive_int, default=20, help="timed calls per implementation")
    p.set_defaults(func=run)


def _median_ms(fn, repeats: int, sync=None) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2] * 1e3


def _grads_on(device: str, saved: list) -> tuple[list, list]:
    """Parameters (zero-stride views holding no memory) on ``device`` whose ``.grad`` are copies of ``saved``."""
    params, grads = [], []
    zero = torch.zeros((), device=device)
    for g in saved:
        p = zero.expand(g.shape)
        p.grad = g.to(device, copy=True)
        params.append(p)
        grads.append(p.grad)
    return params, grads


def implementations(backends: dict, max_norm: float) -> list[tuple[str, str, object]]:
    """(label, device, fn(params)) for torch and every available segclip backend; the cuda backend
    (and torch on CUDA, for comparison) run on a copy of the gradients on the GPU."""
    import segclip

    out = [("torch.nn.utils.clip_grad_norm_", "cpu", lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm))]
    for name, info in backends.items():
        if not info.available:
            continue
        device = CUDA_DEVICE if name == "cuda" else "cpu"
        if name == "cuda":
            out.append(("torch.nn.utils.clip_grad_norm_ [cuda]", device,
                        lambda ps: torch.nn.utils.clip_grad_norm_(ps, max_norm)))
        out.append((f"segclip.fused_clip_ [{name}]", device,
                    lambda ps, b=name: segclip.fused_clip_(ps, max_norm, backend=b)))
    return out


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
    backends = segclip.backends()
    for name, info in backends.items():
        print(f"  backend {info}")

    sets = {"cpu": (params, [p.grad for p in params])}
    print(f"{'implementation':<40} {'total norm':>12} {'ms/call':>9}")
    for name, device, fn in implementations(backends, args.max_norm):
        if device not in sets:
            sets[device] = _grads_on(device, saved)
        ps, grads = sets[device]
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None

        def restore():
            for g, s in zip(grads, saved):
                g.copy_(s)

        restore()
        norm = float(fn(ps))
        clipped = torch.cat([g.double().flatten() for g in grads]).norm().item()
        ms = (_median_ms(lambda: (restore(), fn(ps)), args.repeats, sync)
              - _median_ms(restore, args.repeats, sync))
        print(f"{name:<40} {norm:>12.6f} {max(ms, 0.0):>9.3f}   (norm after clipping {clipped:.6f})")
    return 0
