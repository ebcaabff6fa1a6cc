"""Models: built without downloads, aux loss weight 0.5, --weights loading, BatchNorm momentum."""

from __future__ import annotations

import pytest
import torch

from segclip.train.models import AUX_WEIGHT, MODELS, build_model, load_weights, segmentation_loss


def test_the_six_torchvision_models_are_offered():
    assert set(MODELS) == {"fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
                           "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"}
    with pytest.raises(ValueError, match="unknown model"):
        build_model("unet", 21)


def test_aux_head_loss_has_weight_one_half():
    torch.manual_seed(0)
    model = build_model("deeplabv3_mobilenet_v3_large", 4, aux_loss=True).eval()
    x = torch.randn(1, 3, 32, 32)
    y = torch.randint(0, 4, (1, 32, 32))
    out = model(x)
    assert "aux" in out and AUX_WEIGHT == 0.5
    ce = torch.nn.functional.cross_entropy
    expected = ce(out["out"], y) + 0.5 * ce(out["aux"], y)
    assert torch.allclose(segmentation_loss(out, y), expected)
    lraspp = build_model("lraspp_mobilenet_v3_large", 4, aux_loss=True)  # no aux head there: ignored
    assert "aux" not in lraspp.eval()(x)


def test_bn_momentum_is_set_everywhere():
    model = build_model("lraspp_mobilenet_v3_large", 3, bn_momentum=0.1)
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and all(m.momentum == 0.1 for m in bns)
    own = [m.momentum for m in build_model("lraspp_mobilenet_v3_large", 3).modules()
           if isinstance(m, torch.nn.BatchNorm2d)]
    assert own.count(0.01) > len(own) // 2  # torchvision's own: 0.01 in the MobileNetV3 backbone


def test_weights_from_a_checkpoint_a_ddp_state_and_another_head(tmp_path):
    torch.manual_seed(1)
    src = build_model("lraspp_mobilenet_v3_large", 21)
    state = src.state_dict()
    torch.save({"model": state, "epoch": 3}, tmp_path / "ck.pt")
    torch.save({f"module.{k}": v for k, v in state.items()}, tmp_path / "ddp.pt")
    for name in ("ck.pt", "ddp.pt"):
        dst = build_model("lraspp_mobilenet_v3_large", 21)
        load_weights(dst, tmp_path / name, log=lambda *a: None)
        assert all(torch.equal(a, b) for a, b in zip(dst.state_dict().values(), state.values()))
    notes = []
    five = build_model("lraspp_mobilenet_v3_large", 5)
    load_weights(five, tmp_path / "ck.pt", log=notes.append)
    assert "skipped 4 tensors of another shape" in notes[0]  # the two classifier convs, weight + bias
    assert torch.equal(five.state_dict()["backbone.0.0.weight"], state["backbone.0.0.weight"])


def test_weights_that_do_not_fit_are_an_error(tmp_path):
    torch.save(build_model("deeplabv3_mobilenet_v3_large", 21).state_dict(), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="does not fit this model"):
        load_weights(build_model("lraspp_mobilenet_v3_large", 21), tmp_path / "other.pt")
    with pytest.raises(FileNotFoundError, match="--weights: file not found"):
        load_weights(build_model("lraspp_mobilenet_v3_large", 21), tmp_path / "missing.pt")


def test_weights_with_and_without_the_aux_head_load_into_each_other(tmp_path):
    torch.manual_seed(2)
    with_aux = build_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=True)
    without = build_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=False)
    torch.save({"model": with_aux.state_dict()}, tmp_path / "aux.pt")
    torch.save({"model": without.state_dict()}, tmp_path / "noaux.pt")
    notes = []
    dst = build_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=False)
    load_weights(dst, tmp_path / "aux.pt", log=notes.append)
    assert "ignored the file's auxiliary head" in notes[-1]
    assert torch.equal(dst.state_dict()["classifier.4.weight"], with_aux.state_dict()["classifier.4.weight"])
    dst = build_model("deeplabv3_mobilenet_v3_large", 3, aux_loss=True)
    load_weights(dst, tmp_path / "noaux.pt", log=notes.append)
    assert "the file has no auxiliary head" in notes[-1] and "keep their random initialisation" in notes[-1]
    assert torch.equal(dst.state_dict()["backbone.0.0.weight"], without.state_dict()["backbone.0.0.weight"])
