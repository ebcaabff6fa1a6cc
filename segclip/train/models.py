"""The six torchvision segmentation models, built without downloading anything.

``torchvision.models.get_model(name, weights=None, weights_backbone=None, ...)``: random
initialisation; ``--weights PATH`` then loads a local state dict or a segclip checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

MODELS = (
    "lraspp_mobilenet_v3_large", "deeplabv3_mobilenet_v3_large", "fcn_resnet50", "fcn_resnet101",
    "deeplabv3_resnet50", "deeplabv3_resnet101",
)
NO_AUX = ("lraspp_mobilenet_v3_large",)  # torchvision raises NotImplementedError for aux_loss there
AUX_WEIGHT = 0.5


def has_aux(name: str) -> bool:
    return name not in NO_AUX


def build_model(name: str, num_classes: int, aux_loss: bool = True,
                bn_momentum: float | None = None) -> torch.nn.Module:
    """A randomly initialised model; ``aux_loss`` is honoured where the model has an aux head.

    ``bn_momentum``: when given, set on every BatchNorm layer. The MobileNetV3 models use 0.01,
    tuned for long ImageNet runs; in a short run from scratch their running statistics then lag
    the weights by ~100 steps and evaluation looks much worse than training until the LR decays.
    """
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODELS)}")
    kwargs = {"aux_loss": bool(aux_loss)} if has_aux(name) else {}
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                         num_classes=num_classes, **kwargs)
    if bn_momentum is not None:
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.momentum = bn_momentum
    return model


def extract_state_dict(obj) -> dict[str, torch.Tensor]:
    """The model weights in a loaded file: a segclip checkpoint (``model`` key), a ``state_dict`` /
    ``model_state_dict`` wrapper, or a plain state dict; DDP's ``module.`` prefixes are removed."""
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError("not a state dict: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def load_weights(model: torch.nn.Module, path: str | Path, log=print) -> None:
    """Loads a local state dict or checkpoint into ``model`` (``weights_only=True``, on the CPU).

    Heads whose shapes differ (another ``num_classes``) are skipped with a note, and so are the
    auxiliary head's tensors (``aux_classifier.*``) when only one side has that head (weights of a
    ``--no-aux-loss`` run into an ``--aux-loss`` one, or the reverse: the head is trained from its
    random initialisation, or dropped). Every other missing or unexpected key is an error, so a
    wrong file is not silently half-loaded.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--weights: file not found: {path}")
    try:
        state = extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:
        raise ValueError(f"--weights: cannot load {path}: {exc}") from None
    own = model.state_dict()
    skipped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in skipped:
        del state[k]
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in skipped]
    aux = "aux_classifier."
    aux_missing = [k for k in missing if k.startswith(aux)]
    aux_extra = [k for k in unexpected if k.startswith(aux)]
    missing = [k for k in missing if not k.startswith(aux)]
    unexpected = [k for k in unexpected if not k.startswith(aux)]
    if unexpected or missing:
        raise ValueError(f"--weights: {path} does not fit this model: {len(missing)} missing keys "
                         f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    note = f", skipped {len(skipped)} tensors of another shape ({', '.join(skipped[:4])})" if skipped else ""
    if aux_missing:
        note += (f"; the file has no auxiliary head ({len(aux_missing)} aux_classifier tensors keep their "
                 f"random initialisation)")
    if aux_extra:
        note += f"; ignored the file's auxiliary head ({len(aux_extra)} aux_classifier tensors; this model has none)"
    log(f"loaded weights from {path}{note}")


def segmentation_loss(outputs: dict[str, torch.Tensor], target: torch.Tensor,
                      ignore_index: int = 255) -> torch.Tensor:
    """Cross-entropy of ``out`` plus ``AUX_WEIGHT`` x that of ``aux`` when the model returns one."""
    loss = torch.nn.functional.cross_entropy(outputs["out"].float(), target, ignore_index=ignore_index)
    if "aux" in outputs:
        loss = loss + AUX_WEIGHT * torch.nn.functional.cross_entropy(
            outputs["aux"].float(), target, ignore_index=ignore_index)
    return loss
