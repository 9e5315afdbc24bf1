"""Tests for brpg.models: shapes, dilations, deep stem, parameter groups, weight loading (spec §2).

Machine: exact, bound. Shapes, dilations, parameter groups and weight loading (the same tensors
after a round trip) are exact; that a few SGD steps lower the loss by 10 % and that the decoder's
gradients are non-zero is bound.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from brpg.config import ModelConfig
from brpg.models import SegModel, build_model
from brpg.models.resnet import ResNetEncoder
from brpg.models.weights import load_backbone_weights

SMALL = ModelConfig(backbone="small", width=8, decoder_channels=16, rep_dim=8, aspp_rates=(1, 2, 3))
R50 = ModelConfig(backbone="resnet50", decoder_channels=32, rep_dim=16)


def _forward(model: SegModel, size: int, batch: int = 1) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def _perturbed(state: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A copy of ``state`` with every float tensor shifted by noise, so loading is visible."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
        for k, v in state.items()
    }


# ---------------------------------------------------------------- shapes (spec §2.3)


@pytest.mark.parametrize(
    ("cfg", "size", "stride4"),
    [
        (SMALL, 64, 16),
        (SMALL, 129, 33),  # ceil: 129 → 65 → 33
        (dataclasses.replace(SMALL, output_stride=16), 65, 17),
        (R50, 65, 17),
        (dataclasses.replace(R50, output_stride=16, deep_stem=False), 65, 17),
        (R50, 129, 33),  # the 513 → 129 rule at a smaller size
    ],
    ids=["small-64", "small-129", "small-os16", "r50-os8", "r50-os16-tvstem", "r50-129"],
)
def test_output_shapes(cfg: ModelConfig, size: int, stride4: int) -> None:
    model = build_model(cfg, num_classes=5)
    out = _forward(model, size, batch=2)
    assert set(out) == {"logits", "rep"}
    assert out["logits"].shape == (2, 5, stride4, stride4)
    assert out["rep"].shape == (2, cfg.rep_dim, stride4, stride4)
    assert model.output_stride == cfg.output_stride and model.num_classes == 5
    with torch.no_grad():
        low, high = model.backbone(torch.randn(1, 3, size, size))
    assert low.shape[-1] == stride4 and high.shape[-1] == -(-size // cfg.output_stride)  # ceil
    assert low.shape[1] == model.backbone.low_channels
    assert high.shape[1] == model.backbone.high_channels


def test_resnet_channels_and_no_rep_head() -> None:
    model = build_model(dataclasses.replace(R50, rep_head=False), num_classes=3)
    assert (model.backbone.low_channels, model.backbone.high_channels) == (256, 2048)
    out = _forward(model, 33)
    assert set(out) == {"logits"} and out["logits"].shape == (1, 3, 9, 9)
    assert model.decoder.rep_head is None and not model.has_rep


def test_decoder_width_follows_config() -> None:
    model = build_model(SMALL, num_classes=4)
    dec = model.decoder
    assert dec.low_conv[0].out_channels == SMALL.decoder_channels
    assert dec.aspp.out_channels == 5 * SMALL.decoder_channels
    assert dec.classifier[0].in_channels == 2 * SMALL.decoder_channels
    assert [b[0].dilation[0] for b in dec.aspp.branches] == [1, *SMALL.aspp_rates]
    assert dec.classifier[-1].out_channels == 4 and dec.rep_head[-1].out_channels == SMALL.rep_dim


def test_small_model_trains() -> None:
    torch.manual_seed(0)
    model = build_model(SMALL, num_classes=4).train()
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 8, 8))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)

    def loss_fn() -> torch.Tensor:
        out = model(x)
        return F.cross_entropy(out["logits"], y) + out["rep"].square().mean()

    first = loss_fn()
    first.backward()
    # every parameter is in the graph (the residual branches start at zero, so some gradients
    # are zero at init); the decoder and both heads get non-zero gradients
    assert all(p.grad is not None for p in model.parameters())
    assert all(p.grad.abs().sum() > 0 for p in model.decoder.parameters())
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        loss = loss_fn()
        loss.backward()
    assert loss.item() < 0.9 * first.item()  # a few SGD steps fit the fixed batch


def test_unknown_backbone() -> None:
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="resnet18"), num_classes=2)


# ---------------------------------------------------------------- encoder details (spec §2.1)


@pytest.mark.parametrize(
    ("output_stride", "multi_grid", "expected"),
    [(8, True, (4, 8, 16)), (16, True, (2, 4, 8)), (8, False, (2, 4, 4))],
)
def test_layer4_dilations(output_stride: int, multi_grid: bool, expected: tuple[int, ...]) -> None:
    enc = ResNetEncoder(50, output_stride=output_stride, multi_grid=multi_grid)
    assert enc.layer4_dilations() == expected
    for block in enc.layer4:  # padding keeps the size; dilated stages have no stride
        assert block.conv2.padding == block.conv2.dilation
        assert block.conv2.stride == (1, 1)
    assert enc.layer3[-1].conv2.dilation == ((2, 2) if output_stride == 8 else (1, 1))


def test_deep_stem() -> None:
    enc = ResNetEncoder(50, deep_stem=True)
    convs = [m for m in enc.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0]) for c in convs] == [
        (3, 64, 2),
        (64, 64, 1),
        (64, 128, 1),
    ]
    assert enc.bn1.num_features == 128 and enc.maxpool.ceil_mode
    assert enc.layer1[0].conv1.in_channels == 128
    assert enc.layer1[0].downsample[0].in_channels == 128
    plain = ResNetEncoder(50, deep_stem=False)
    assert plain.conv1.kernel_size == (7, 7) and plain.layer1[0].conv1.in_channels == 64


def test_zero_init_residual() -> None:
    enc = ResNetEncoder(50, zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for layer in (enc.layer1, enc.layer4) for b in layer)


@pytest.mark.parametrize("cfg", [SMALL, R50], ids=["small", "resnet50"])
def test_parameter_groups_partition(cfg: ModelConfig) -> None:
    model = build_model(cfg, num_classes=3)
    enc = {id(p) for p in model.backbone.parameters()}
    dec = {id(p) for p in model.decoder.parameters()}
    assert enc and dec and not enc & dec
    assert enc | dec == {id(p) for p in model.parameters()}


# ---------------------------------------------------------------- weight loading


def test_load_torchvision_layout(tmp_path) -> None:
    saved = _perturbed(torchvision.models.resnet50().state_dict(), seed=1)
    path = tmp_path / "tv_r50.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in saved.items()}}, path)

    enc = ResNetEncoder(50, deep_stem=False)
    assert not torch.equal(enc.layer3[2].conv2.weight, saved["layer3.2.conv2.weight"])
    report = load_backbone_weights(enc, str(path), "resnet50")

    assert report["layout"] == "torchvision"
    assert report["missing"] == [] and report["unexpected"] == [] and report["mismatched"] == []
    for k, v in enc.state_dict().items():
        assert torch.equal(v, saved[k]), k


def test_load_community_deep_stem_layout(tmp_path) -> None:
    source = ResNetEncoder(50, deep_stem=True).state_dict()
    # The community resnet101.pth names: conv1 = Sequential(conv, bn, relu, conv, bn, relu, conv)
    # then bn1; our encoder uses these names, so the "renaming" is the identity.
    community = ["conv1.0.weight", "conv1.1.running_var", "conv1.3.weight", "conv1.4.bias"]
    community += ["conv1.6.weight", "bn1.running_mean", "layer1.0.conv1.weight"]
    assert set(community) <= set(source)
    assert source["conv1.6.weight"].shape == (128, 64, 3, 3)
    assert source["bn1.weight"].shape == (128,)
    saved = _perturbed(source, seed=2)
    path = tmp_path / "resnet50_deepstem.pth"
    torch.save({"model": {f"module.{k}": v for k, v in saved.items()}}, path)

    model = build_model(dataclasses.replace(R50, pretrained=str(path)), num_classes=2)
    for k, v in model.backbone.state_dict().items():  # build_model loaded cfg.pretrained
        assert torch.equal(v, saved[k]), k

    report = load_backbone_weights(ResNetEncoder(50, deep_stem=True), str(path), "resnet50")
    assert report["layout"] == "deep-stem" and report["missing"] == []
    assert len(report["loaded"]) == len(source)


def test_torchvision_weights_into_deep_stem_model(tmp_path) -> None:
    saved = _perturbed(torchvision.models.resnet50().state_dict(), seed=3)
    path = tmp_path / "tv.pth"
    torch.save(saved, path)
    enc = ResNetEncoder(50, deep_stem=True)
    report = load_backbone_weights(enc, str(path), "resnet50")
    mismatched = {k for k, _, _ in report["mismatched"]}
    assert {"bn1.weight", "layer1.0.conv1.weight", "layer1.0.downsample.0.weight"} <= mismatched
    assert "conv1.weight" in report["unexpected"] and "conv1.0.weight" in report["missing"]
    assert torch.equal(enc.layer4[2].conv3.weight, saved["layer4.2.conv3.weight"])


def test_missing_weights_file(tmp_path) -> None:
    path = tmp_path / "nowhere" / "resnet101.pth"
    cfg = dataclasses.replace(R50, backbone="resnet101", pretrained=str(path))
    with pytest.raises(FileNotFoundError, match="resnet101.pth") as err:
        build_model(cfg, num_classes=2)
    assert "U2PL" in str(err.value) and "model.pretrained" in str(err.value)


def test_wrong_weights_file(tmp_path) -> None:
    path = tmp_path / "other.pth"
    torch.save({"encoder.weight": torch.zeros(3), "head.fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="None of the"):
        load_backbone_weights(ResNetEncoder(50), str(path), "resnet50")


# ---------------------------------------------------------------- Xception-65 (spec §2.2)


@pytest.mark.parametrize(("output_stride", "high"), [(8, 9), (16, 5)])
def test_xception_shapes(output_stride: int, high: int) -> None:
    pytest.importorskip("timm")
    cfg = dataclasses.replace(R50, backbone="xception65", output_stride=output_stride)
    model = build_model(cfg, num_classes=4)
    out = _forward(model, 65)
    assert out["logits"].shape == (1, 4, 17, 17) and out["rep"].shape == (1, 16, 17, 17)
    with torch.no_grad():
        low, x = model.backbone(torch.randn(1, 3, 65, 65))
    assert low.shape == (1, 256, 17, 17) and x.shape == (1, 2048, high, high)


def test_xception_loads_timm_state_dict(tmp_path) -> None:
    timm = pytest.importorskip("timm")
    saved = _perturbed(timm.create_model("xception65", pretrained=False).state_dict(), seed=4)
    path = tmp_path / "xception65.pth"
    torch.save(saved, path)
    model = build_model(dataclasses.replace(R50, backbone="xception65"), num_classes=2)
    report = load_backbone_weights(model.backbone, str(path), "xception65")
    assert report["layout"] == "timm" and report["missing"] == [] and report["unexpected"] == []
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, saved[k]), k
