"""Parameter sets: the gradient shapes a benchmark times, and the gradients built from them.

* the six torchvision segmentation models, built on the meta device with
  ``get_model(name, weights=None, weights_backbone=None, num_classes=21)``; aux_loss is left at its
  default (None: no auxiliary classifier for weights=None). Every one of these parameters gets a
  gradient in a training step (tests/test_bench.py checks it with a real backward pass).
* ``synthetic_tiny``: 2,000 1-D tensors of 64 to 4,096 elements (log-uniform, seeded): bias/BN-like.
* ``synthetic_huge``: 8 tensors of 8Mi elements on CPU (256 MiB in fp32), 32Mi on CUDA (1 GiB).
* ``synthetic_smoke`` (not in the default set): 16 small tensors, for tests.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import random

import torch

MODEL_CASES = (
    "fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
    "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
)
SYNTHETIC_CASES = ("synthetic_tiny", "synthetic_huge")
ALL_CASES = MODEL_CASES + SYNTHETIC_CASES  # the default set
EXTRA_CASES = ("synthetic_smoke",)  # accepted, not in the default set
TARGET_MODELS = ("lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "deeplabv3_resnet50")
QUICK_CASES = TARGET_MODELS + SYNTHETIC_CASES
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HUGE_ELEMS = {"cpu": 8 * 2**20, "cuda": 32 * 2**20}  # per tensor; x8 tensors


@dataclasses.dataclass(frozen=True)
class Case:
    """A list of gradient shapes with a name."""

    name: str
    shapes: tuple[tuple[int, ...], ...]
    description: str

    @property
    def n_tensors(self) -> int:
        return len(self.shapes)

    @property
    def n_elements(self) -> int:
        return sum(math.prod(s) for s in self.shapes)

    def as_json(self) -> dict:
        return {"n_tensors": self.n_tensors, "n_elements": self.n_elements, "description": self.description}


@functools.cache
def model_grad_shapes(name: str) -> tuple[tuple[int, ...], ...]:
    """The shapes of a segmentation model's parameter gradients, in ``model.parameters()`` order
    (built on the meta device: no memory, no initialisation cost)."""
    import torchvision

    with torch.device("meta"):
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=21)
    return tuple(tuple(p.shape) for p in model.parameters() if p.requires_grad)


def make_case(name: str, device: str = "cpu") -> Case:
    """The case ``name`` (one of ALL_CASES + EXTRA_CASES) as it runs on ``device``."""
    if name in MODEL_CASES:
        return Case(name, model_grad_shapes(name), f"torchvision {name}, num_classes=21, aux_loss default (none)")
    if name == "synthetic_tiny":
        rng = random.Random(0)
        shapes = tuple((int(round(64 * 64 ** rng.random())),) for _ in range(2000))
        return Case(name, shapes, "2,000 tensors of 64 to 4,096 elements (log-uniform)")
    if name == "synthetic_huge":
        n = HUGE_ELEMS["cuda" if device.startswith("cuda") else "cpu"]
        return Case(name, ((n // 2048, 2048),) * 8, f"8 tensors of {n // 2**20}Mi elements ({n // 2**15} MiB in fp32)")
    if name == "synthetic_smoke":
        rng = random.Random(1)
        return Case(name, tuple((rng.randint(256, 4096),) for _ in range(16)), "16 tensors of 256 to 4,096 elements (for tests)")
    raise ValueError(f"unknown case {name!r}; choose from {', '.join(ALL_CASES + EXTRA_CASES)}")


def make_grads(case: Case, dtype: torch.dtype, device: str, seed: int) -> list[torch.Tensor]:
    """Parameters (zero-stride views holding no memory) whose ``.grad`` are separate ``randn``
    tensors, each its own allocation like autograd's."""
    torch.manual_seed(seed)
    zero = torch.zeros((), dtype=dtype, device=device)
    params = []
    for shape in case.shapes:
        p = zero.expand(shape)
        p.grad = torch.randn(shape, dtype=dtype, device=device)
        params.append(p)
    return params
