"""SegFormer (MiT encoder from transformers + all-MLP decoder + rep head): contract and weights.

Machine: exact, fp32-tolerance, bound. Shapes, parameter counts and groups, and weight loading are
exact; the clean half of the feature-perturbation pass matches the plain forward within atol 1e-5
(fp32-tolerance), and its perturbed half differs by more than 1e-3 (bound).
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from brpg.config import ModelConfig, OptimConfig  # noqa: E402
from brpg.engine.optim import build_optimizer  # noqa: E402
from brpg.models import BACKBONES, build_backbone, build_model  # noqa: E402
from brpg.models.segformer import (  # noqa: E402
    MIT_VARIANTS,
    AllMLPDecoder,
    MiTEncoder,
    MiTSpec,
    SegFormer,
    load_mit_weights,
    mit_config,
)

ROOT = Path(__file__).resolve().parents[1]
B0 = ModelConfig(backbone="mit_b0", decoder_channels=32, rep_dim=16)
SLIM = MiTSpec((16, 32, 80, 128), (2, 2, 2, 2))  # not a published variant: other shapes


def _forward(model: torch.nn.Module, size: int, batch: int = 2) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(torch.randn(batch, 3, size, size))


def _assert_same(state_a: dict[str, torch.Tensor], state_b: dict[str, torch.Tensor]) -> None:
    assert state_a.keys() == state_b.keys()
    for k, v in state_a.items():
        assert torch.equal(v, state_b[k]), k


# ---------------------------------------------------------------- contract


@pytest.mark.parametrize(("size", "stride4"), [(64, 16), (65, 17)])
def test_output_contract_and_stride4(size: int, stride4: int) -> None:
    model = build_model(B0, num_classes=5)
    assert isinstance(model, SegFormer) and isinstance(model.backbone, MiTEncoder)
    out = _forward(model, size)
    assert set(out) == {"logits", "rep"}
    assert out["logits"].shape == (2, 5, stride4, stride4)
    assert out["rep"].shape == (2, B0.rep_dim, stride4, stride4)
    assert model.num_classes == 5 and model.output_stride == 32 and model.has_rep
    with torch.no_grad():
        feats = model.backbone(torch.randn(1, 3, size, size))
    sizes = [-(-size // s) for s in (4, 8, 16, 32)]  # ceil rule, like the other encoders
    assert [tuple(f.shape[1:]) for f in feats] == [
        (c, s, s) for c, s in zip(MIT_VARIANTS["mit_b0"].hidden_sizes, sizes, strict=True)
    ]


def test_no_rep_head() -> None:
    model = build_model(dataclasses.replace(B0, rep_head=False), num_classes=3)
    out = _forward(model, 32)
    assert set(out) == {"logits"} and out["logits"].shape == (2, 3, 8, 8)
    assert model.decoder.rep_head is None and not model.has_rep


def test_decoder_width_follows_config() -> None:
    dec = build_model(B0, num_classes=4).decoder
    assert isinstance(dec, AllMLPDecoder)
    assert [p.out_channels for p in dec.proj] == [B0.decoder_channels] * 4
    assert [p.in_channels for p in dec.proj] == list(MIT_VARIANTS["mit_b0"].hidden_sizes)
    assert dec.fuse[0].in_channels == 4 * B0.decoder_channels
    assert dec.classifier.out_channels == 4 and dec.rep_head[-1].out_channels == B0.rep_dim


def test_every_parameter_gets_a_gradient() -> None:
    model = build_model(B0, num_classes=4).train()
    out = model(torch.randn(2, 3, 32, 32))
    (out["logits"].sum() + out["rep"].sum()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad == []  # DDP needs every parameter in the graph


def test_build_model_dispatch() -> None:
    assert set(MIT_VARIANTS) == {f"mit_b{i}" for i in range(6)}
    assert set(MIT_VARIANTS) <= set(BACKBONES)
    assert isinstance(build_backbone(B0), MiTEncoder)
    assert not isinstance(build_model(ModelConfig(backbone="small", width=8), 2), SegFormer)
    with pytest.raises(ValueError, match="unknown backbone"):
        build_model(ModelConfig(backbone="mit_b9"), num_classes=2)


def test_optimizer_groups_head_lr_on_decoder_only() -> None:
    model = build_model(B0, num_classes=3)
    opt = build_optimizer(model, OptimConfig(name="sgd", lr=0.01, head_lr_mult=10.0))
    enc, head = opt.param_groups
    assert {id(p) for p in enc["params"]} == {id(p) for p in model.backbone.parameters()}
    assert {id(p) for p in head["params"]} == {id(p) for p in model.decoder.parameters()}
    rep_ids = {id(p) for p in model.decoder.rep_head.parameters()}
    assert rep_ids and rep_ids <= {id(p) for p in head["params"]}
    assert enc["lr"] == pytest.approx(0.01) and head["lr"] == pytest.approx(0.1)


# ---------------------------------------------------------------- variants


def test_mit_b0_encoder_parameter_count() -> None:
    n = sum(p.numel() for p in MiTEncoder("mit_b0").parameters())
    assert n == pytest.approx(3.32e6, rel=0.01)  # published MiT-B0 encoder: ~3.3 M


@pytest.mark.parametrize(
    ("variant", "millions"),
    [("mit_b1", 13.1), ("mit_b2", 24.2), ("mit_b3", 44.0), ("mit_b4", 60.8), ("mit_b5", 81.4)],
)
def test_larger_variant_sizes(variant: str, millions: float) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        enc = MiTEncoder(variant)
    assert sum(p.numel() for p in enc.parameters()) / 1e6 == pytest.approx(millions, rel=0.01)
    config = mit_config(variant)
    assert list(config.hidden_sizes) == list(MIT_VARIANTS[variant].hidden_sizes)
    assert list(config.num_attention_heads) == [1, 2, 5, 8]
    assert list(config.sr_ratios) == [8, 4, 2, 1] and list(config.mlp_ratios) == [4, 4, 4, 4]
    assert MIT_VARIANTS[variant].decoder_channels == (256 if variant == "mit_b1" else 768)


# ---------------------------------------------------------------- pretrained weights


def test_load_save_pretrained_folder(tmp_path) -> None:
    source = MiTEncoder("mit_b0")
    source.mit.save_pretrained(tmp_path / "mit_b0")
    model = build_model(dataclasses.replace(B0, pretrained=str(tmp_path / "mit_b0")), 2)
    _assert_same(model.backbone.mit.state_dict(), source.mit.state_dict())


def test_load_image_classification_folder(tmp_path) -> None:
    """The nvidia/mit-b* hub checkpoints are SegformerForImageClassification: head dropped."""
    import transformers

    source = transformers.SegformerForImageClassification(mit_config("mit_b0"))
    source.save_pretrained(tmp_path / "cls")
    target = MiTEncoder("mit_b0")
    assert load_mit_weights(target, str(tmp_path / "cls"))["layout"] == "folder"
    _assert_same(target.mit.state_dict(), source.segformer.state_dict())


@pytest.mark.parametrize("fmt", ["safetensors", "pth-backbone", "pth-task-model"])
def test_load_state_dict_files(tmp_path, fmt: str) -> None:
    source = MiTEncoder("mit_b0")
    expected = source.mit.state_dict()
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "mit_b0.safetensors"
        save_file({k: v.contiguous() for k, v in expected.items()}, str(path))
    elif fmt == "pth-backbone":  # model.backbone.state_dict() inside a checkpoint wrapper
        path = tmp_path / "backbone.pth"
        torch.save({"state_dict": source.state_dict()}, path)
    else:  # a SegformerFor* state dict: "segformer." prefix plus a head that is dropped
        path = tmp_path / "task.pth"
        state = {f"segformer.{k}": v for k, v in expected.items()}
        torch.save({**state, "classifier.weight": torch.zeros(10, 256)}, path)
    target = MiTEncoder("mit_b0")
    report = load_mit_weights(target, str(path))
    assert report == {"layout": "state-dict", "loaded": len(expected)}
    _assert_same(target.mit.state_dict(), expected)


def test_wrong_variant_state_dict(tmp_path) -> None:
    path = tmp_path / "slim.pth"
    torch.save(MiTEncoder(SLIM).mit.state_dict(), path)
    with pytest.raises(ValueError, match="other shapes") as err:
        load_mit_weights(MiTEncoder("mit_b0"), str(path))
    assert "slim.pth" in str(err.value) and "mit_b0" in str(err.value)


def test_missing_and_unexpected_keys(tmp_path) -> None:
    state = MiTEncoder("mit_b0").mit.state_dict()
    dropped = next(iter(state))
    state = {k: v for k, v in state.items() if k != dropped} | {"extra.weight": torch.zeros(1)}
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="1 missing") as err:
        load_mit_weights(MiTEncoder("mit_b0"), str(path))
    assert dropped in str(err.value) and "1 unexpected" in str(err.value)
    assert "partial.pth" in str(err.value)


def test_wrong_variant_folder(tmp_path) -> None:
    MiTEncoder(SLIM).mit.save_pretrained(tmp_path / "slim")
    with pytest.raises(ValueError, match="does not fit the 'mit_b0' backbone") as err:
        load_mit_weights(MiTEncoder("mit_b0"), str(tmp_path / "slim"))
    assert "hidden_sizes" in str(err.value) and "slim" in str(err.value)


def test_missing_weights_path(tmp_path) -> None:
    cfg = dataclasses.replace(B0, pretrained=str(tmp_path / "nowhere" / "mit_b0.pth"))
    with pytest.raises(FileNotFoundError, match="not found") as err:
        build_model(cfg, num_classes=2)
    assert "nvidia/mit-b0" in str(err.value) and "model.pretrained" in str(err.value)


def test_hub_id_never_downloads(monkeypatch) -> None:
    attempts: list[object] = []

    def refuse(self, address, *args, **kwargs):  # any network use would land here
        attempts.append(address)
        raise OSError("network disabled in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    with pytest.raises(FileNotFoundError, match="huggingface-cli download") as err:
        load_mit_weights(MiTEncoder("mit_b0"), "brpg-tests/no-such-mit-b0")
    assert "local cache" in str(err.value) and "model.pretrained" in str(err.value)
    assert attempts == []


# ---------------------------------------------------------------- transformers is optional


def test_missing_transformers_error(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # makes `import transformers` fail
    with pytest.raises(ImportError, match=r"pip install 'brpg\[segformer\]'"):
        build_model(B0, num_classes=2)


@pytest.mark.slow  # a fresh interpreter (imports torch): several seconds on a small CPU
def test_package_imports_without_transformers() -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from brpg.config import ModelConfig\n"
        "from brpg.models import build_model\n"
        "build_model(ModelConfig(backbone='small', width=8), 2)\n"
        "try:\n"
        "    build_model(ModelConfig(backbone='mit_b0'), 2)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert "brpg[segformer]" in done.stdout


def test_feature_perturbation_pass():
    """``need_fp`` (UniMatch): the clean half equals the plain forward, the perturbed half
    differs, and both heads and the classifier keep their shapes."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone="mit_b0", decoder_channels=32, rep_dim=16), 5)
    model.eval()  # dropout in the decoder off: the clean half is deterministic
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model(x)
        fp = model(x, need_fp=True)
    assert set(fp) == {"logits", "logits_fp", "rep"}
    assert fp["logits_fp"].shape == plain["logits"].shape == (2, 5, 16, 16)
    # BN in eval mode normalises each image alone, so the clean half matches the plain pass
    assert torch.allclose(fp["logits"], plain["logits"], atol=1e-5)
    assert torch.allclose(fp["rep"], plain["rep"], atol=1e-5)
    assert not torch.allclose(fp["logits_fp"], plain["logits"], atol=1e-3)
