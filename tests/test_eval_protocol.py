"""Evaluation against its rules (spec §10) and defaults that carry meaning, pinned by behaviour.

- sliding windows placed as the authors' offline evaluation does (windows every ``stride``
  pixels, the last one moved back to the border, zero padding up to the crop), checked with a
  model whose output encodes where each window lies, on sizes where the stride matters;
- the confusion matrix drops ``ignore_index`` also when it is a class id in ``[0, C)``;
- an evaluation during training equals a separate ``brpg eval`` of the same checkpoint;
- every DigitScenes preset pads labels with the ignore value, and ignores 255.

Machine: exact, same-machine, fp32-tolerance. Sliding-window placement against a loop written from
the authors' rule is fp32-tolerance (assert_close's float32 defaults); the confusion matrix and the
presets' label padding are exact; the evaluation during training equals a later brpg eval of its
checkpoint in the same process (same-machine, abs 1e-9).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from torch import Tensor, nn

from brpg.config import list_presets, load_config
from brpg.data.transforms import build_eval_transform, build_train_transform
from brpg.engine.evaluate_run import evaluate_run
from brpg.engine.inference import predict_logits
from brpg.engine.trainer import CKPT_NAME, Trainer
from brpg.metrics import ConfusionMatrix


class WhereModel(nn.Module):
    """Logits that say where a pixel sits in its window and what the input held: channel 0 =
    row inside the window, 1 = column inside the window, 2 = input channel 0 at the pixel,
    3 = mean of input channel 0 over the whole window (sees the padding)."""

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        n, _, h, w = x.shape
        rows = torch.arange(h, dtype=x.dtype).view(1, 1, h, 1).expand(n, 1, h, w)
        cols = torch.arange(w, dtype=x.dtype).view(1, 1, 1, w).expand(n, 1, h, w)
        mean = x[:, :1].mean(dim=(2, 3), keepdim=True).expand(n, 1, h, w)
        return {"logits": torch.cat([rows, cols, x[:, :1], mean], dim=1)}


def reference_sliding(image_hw: Tensor, crop: int, stride: int) -> Tensor:
    """The authors' rule written out: pad with zeros to at least ``crop`` (half before),
    windows at ``i·stride`` for ``i < ceil((L − crop)/stride) + 1``, each clipped to end at the
    border; per pixel, the mean over the windows that cover it of the WhereModel logits."""
    h, w = image_hw.shape
    pad_h, pad_w = max(crop - h, 0), max(crop - w, 0)
    top, left = pad_h // 2, pad_w // 2
    hp, wp = h + pad_h, w + pad_w
    padded = torch.zeros(hp, wp)
    padded[top : top + h, left : left + w] = image_hw

    def starts(length: int) -> list[int]:
        n = -(-(length - crop) // stride) + 1
        out = []
        for i in range(n):
            end = min(i * stride + crop, length)
            out.append(end - crop)
        return out

    out = torch.zeros(4, h, w)
    for y in range(h):
        for x in range(w):
            py, px = y + top, x + left
            vals = [
                (
                    py - sy,
                    px - sx,
                    float(padded[py, px]),
                    float(padded[sy : sy + crop, sx : sx + crop].mean()),
                )
                for sy in starts(hp)
                for sx in starts(wp)
                if sy <= py < sy + crop and sx <= px < sx + crop
            ]
            for ch in range(4):
                out[ch, y, x] = sum(v[ch] for v in vals) / len(vals)
    return out


@pytest.mark.parametrize(
    ("h", "w", "crop", "stride"),
    [
        (23, 17, 8, 5),  # rows 0,5,10,15; stride 6 would give 0,6,12,15
        (23, 17, 8, 6),
        (20, 9, 7, 4),  # the last window moved back: 0,4,8,12,13
        (6, 13, 8, 3),  # padded rows (6 → 8, one row above), windows along the columns
        (11, 4, 8, 3),  # padded columns (4 → 8, two on the left), windows along the rows
    ],
)
def test_sliding_windows_are_placed_as_the_authors_offline_eval(h, w, crop, stride):
    image = torch.arange(1, h * w + 1, dtype=torch.float32).view(h, w)  # 0 only in the padding
    batch = image.expand(2, 3, h, w).clone()
    got = predict_logits(WhereModel(), batch, "sliding", crop_size=crop, stride=stride)
    want = reference_sliding(image, crop, stride)
    torch.testing.assert_close(got[0], want)
    torch.testing.assert_close(got[1], want)


def test_sliding_placement_depends_on_the_stride():
    """The sizes above tell strides apart: the test would see a wrong stride."""
    a = reference_sliding(torch.ones(23, 17), 8, 5)
    b = reference_sliding(torch.ones(23, 17), 8, 6)
    assert not torch.allclose(a, b)


def test_confusion_matrix_drops_an_ignore_index_inside_the_classes():
    # C = 3, ignore 1: the four pixels labeled 1 are not counted, whatever was predicted;
    # a prediction of 1 on a counted pixel is an error
    target = torch.tensor([[0, 0, 1, 1, 2, 2, 1, 1]])
    pred = torch.tensor([[0, 1, 1, 0, 2, 2, 2, 1]])
    cm = ConfusionMatrix(3, ignore_index=1)
    cm.update(pred, target)
    want = torch.tensor([[1, 1, 0], [0, 0, 0], [0, 0, 2]])
    torch.testing.assert_close(cm.mat, want)
    # IoU: class 0 = 1/2, class 1 = 0/1, class 2 = 2/2
    torch.testing.assert_close(cm.iou().float(), torch.tensor([0.5, 0.0, 1.0]))
    assert cm.pixel_acc() == pytest.approx(75.0)


DIGITS_PRESETS = [p for p in list_presets() if p.startswith("digits_")]


@pytest.mark.parametrize("preset", DIGITS_PRESETS)
def test_every_digits_preset_pads_labels_with_the_ignore_value(preset):
    cfg = load_config(preset)
    assert cfg.data.ignore_index == 255
    image = torch.full((3, 20, 30), 128, dtype=torch.uint8)
    mask = torch.full((20, 30), 3, dtype=torch.uint8)
    torch.manual_seed(0)
    _, m = build_train_transform(cfg.data)(image, mask)
    crop = cfg.data.crop_size
    assert tuple(m.shape) == (crop, crop)
    # a 20 x 30 image scaled by at most 1.25 is smaller than the crop: the rest is padding
    assert set(m.unique().tolist()) == {3, 255}
    assert (m == 255).sum() >= crop * crop - 25 * 38
    _, m_val = build_eval_transform(cfg.data, crop_size=crop)(image, mask)
    assert (m_val == 255).sum() == crop * crop - 20 * 30
    assert set(m_val.unique().tolist()) == {3, 255}


def test_digits_presets_exist():
    assert len(DIGITS_PRESETS) >= 10


def test_evaluation_during_training_equals_brpg_eval_of_its_checkpoint(tmp_path, monkeypatch):
    """Mean teacher: the step-2 evaluation (of the teacher, after the warm-up) and the best
    mIoU equal an evaluation of the step-2 checkpoint done afterwards from disk."""
    data_root = tmp_path / "digits"
    cfg = load_config(
        "digits_meanteacher_1_16",
        [
            f"data.root={data_root}",
            "data.digits_train=32",
            "data.digits_val=16",
            "model.width=8",
            "model.decoder_channels=16",
            "model.rep_dim=8",
            "train.batch_size=4",
            "train.steps=4",
            "train.eval_every=2",
            "train.ckpt_every=2",
            "train.log_every=1",
            "train.threads=1",
            "optim.warmup_steps=1",
            "semi.sup_only_steps=1",
            "semi.unlabeled_batch_size=4",
            "eval.batch_size=8",
        ],
    )
    run, at2 = tmp_path / "run", tmp_path / "at2"
    tr = Trainer(cfg, run, progress=False)
    original_save = tr.save

    def save() -> None:
        original_save()
        if tr.step == 2:
            at2.mkdir()
            shutil.copy(run / CKPT_NAME, at2 / CKPT_NAME)
            shutil.copy(run / "config.yaml", at2 / "config.yaml")

    monkeypatch.setattr(tr, "save", save)
    summary = tr.fit()
    log = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    during = [rec for rec in log if "val_miou" in rec and rec["step"] == 2 and not rec.get("final")]
    assert len(during) == 1
    res = evaluate_run(at2, [], progress=False)
    assert res["step"] == 2
    assert res["miou"] == pytest.approx(during[0]["val_miou"], abs=1e-9)
    assert res["mbiou"] == pytest.approx(during[0]["val_mbiou"], abs=1e-9)
    assert summary["best_val_miou"] == pytest.approx(max(res["miou"], summary["val_miou"]))
    # the final evaluation too, from the final checkpoint
    final = evaluate_run(run, [], progress=False)
    assert final["miou"] == pytest.approx(summary["val_miou"], abs=1e-9)
    assert final["mbiou"] == pytest.approx(summary["val_mbiou"], abs=1e-9)
