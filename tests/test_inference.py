"""Inference protocols and the evaluation loop (spec §10), with tiny fake models.

Machine: exact, fp32-tolerance. Window starts and the metrics of perfect and hand-counted
predictions come from integer counts (exact, also under the bf16 autocast the test asks for
explicitly, which does not depend on the CPU); logits of the protocols against upsampling and
full-image references are fp32-tolerance (allclose defaults, atol 1e-6 for overlapping windows).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from brpg.engine.inference import evaluate, predict_logits, window_starts
from brpg.metrics import BoundaryIoU


class LocalModel(nn.Module):
    """Logits ``-(x0 − c)²`` per class ``c`` from channel 0, sampled every ``stride`` pixels.

    With ``stride = 1`` the output at a pixel depends on that pixel only, so any tiling of the
    image gives the same logits; with the image's channel 0 holding the label it is perfect.
    """

    def __init__(self, num_classes: int, stride: int = 1) -> None:
        super().__init__()
        self.stride = stride
        self.register_buffer("classes", torch.arange(num_classes, dtype=torch.float32))
        self.dummy = nn.Parameter(torch.zeros(()))  # gives the model a device

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = x[:, :1, :: self.stride, :: self.stride]
        return {"logits": -((x0 - self.classes.view(1, -1, 1, 1)) ** 2) + self.dummy}


class ContextModel(nn.Module):
    """Stride-1 logits ``(c + 1)·x0 + mean(x0 over the whole input)``: depends on the window."""

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x0 = x[:, :1]
        scale = torch.arange(1, self.num_classes + 1, dtype=x.dtype).view(1, -1, 1, 1)
        return {"logits": x0 * scale + x0.mean(dim=(2, 3), keepdim=True)}


def test_window_starts():
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]  # last window moved back to the border
    assert window_starts(5, 5, 3) == [0]
    with pytest.raises(ValueError):
        window_starts(3, 5, 1)


def test_full_upsamples_stride4_logits_align_corners():
    model = LocalModel(3, stride=4)
    image = torch.randn(2, 3, 17, 21)
    logits = model(image)["logits"]
    expected = F.interpolate(logits, size=(17, 21), mode="bilinear", align_corners=True)
    out = predict_logits(model, image, "full")
    assert out.shape == (2, 3, 17, 21)
    assert torch.allclose(out, expected)
    assert torch.equal(predict_logits(model, image, "center_crop"), out)


def test_sliding_with_crop_equal_to_image_equals_full():
    model = LocalModel(4, stride=4)
    image = torch.randn(2, 3, 24, 24)
    full = predict_logits(model, image, "full")
    slid = predict_logits(model, image, "sliding", crop_size=24, stride=16)
    assert torch.allclose(slid, full)


def test_sliding_with_crop_larger_than_image_pads_and_equals_full_for_local_model():
    model = LocalModel(4, stride=1)
    image = torch.randn(2, 3, 13, 19)
    full = predict_logits(model, image, "full")
    slid = predict_logits(model, image, "sliding", crop_size=32, stride=21)
    assert slid.shape == full.shape
    assert torch.allclose(slid, full)


@pytest.mark.parametrize("window_batch", [1, 2, 3, 64])
def test_overlapping_windows_average_to_full_for_local_model(window_batch):
    model = LocalModel(3, stride=1)
    image = torch.randn(2, 3, 23, 30)
    full = predict_logits(model, image, "full")
    slid = predict_logits(model, image, "sliding", 10, 7, window_batch=window_batch)
    assert torch.allclose(slid, full, atol=1e-6)


def test_sliding_averages_logits_hand_made():
    # x0 = [[0,1,2],[3,4,5]], crop 2, stride 1: windows at columns 0-1 (mean 2) and 1-2 (mean 3).
    # Column 0 is seen once (+2), column 1 twice (+(2+3)/2), column 2 once (+3).
    image = torch.zeros(1, 3, 2, 3)
    image[0, 0] = torch.tensor([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]])
    out = predict_logits(ContextModel(2), image, "sliding", crop_size=2, stride=1)
    x0 = image[0, 0]
    offset = torch.tensor([2.0, 2.5, 3.0]).expand(2, 3)
    expected = torch.stack([1 * x0 + offset, 2 * x0 + offset])
    assert torch.allclose(out[0], expected)


def test_predict_logits_checks():
    model = LocalModel(3)
    image = torch.randn(1, 3, 8, 8)
    with pytest.raises(ValueError, match="valid: full, center_crop, sliding"):
        predict_logits(model, image, "tiles")
    with pytest.raises(ValueError, match="expected 5"):
        predict_logits(model, image, "full", num_classes=5)


def _labelled(label_bhw: torch.Tensor, ignore_noise: bool = True) -> dict[str, torch.Tensor]:
    image = torch.zeros(label_bhw.shape[0], 3, *label_bhw.shape[-2:])
    image[:, 0] = label_bhw.float()
    mask = label_bhw.clone()
    if ignore_noise:
        mask[..., 0, :] = 255  # the top row is ignored
    return {"image": image, "mask": mask}


@pytest.mark.parametrize("protocol", ["full", "center_crop", "sliding"])
def test_perfect_model_gets_100_miou(protocol):
    g = torch.Generator().manual_seed(0)
    c = 4
    # batch size 1 with variable sizes, then batched equal sizes
    loader = [_labelled(torch.randint(0, c, (1, h, w), generator=g)) for h, w in [(9, 14), (20, 7)]]
    loader.append(_labelled(torch.randint(0, c, (3, 12, 12), generator=g)))
    model = LocalModel(c)
    model.train()
    res = evaluate(model, loader, c, protocol, crop_size=8, stride=5, device="cpu", progress=False)
    assert res["miou"] == pytest.approx(100.0)
    assert res["per_class_iou"] == pytest.approx([100.0] * c)
    assert res["pixel_acc"] == pytest.approx(100.0)
    # Boundary IoU from the same pass: perfect on valid pixels, the ignored top row not counted
    assert res["mbiou"] == pytest.approx(100.0)
    assert res["per_class_biou"] == pytest.approx([100.0] * c)
    assert res["biou_dilation_ratio"] == 0.02
    assert model.training  # the previous mode is restored


def test_evaluate_list_batches_and_partial_errors():
    c = 3
    a = torch.tensor([[0, 1, 2, 2]])  # (1, 4): the model predicts the label
    b = torch.tensor([[1, 1], [0, 2]])
    batch = {
        "image": [_labelled(a[None], False)["image"][0], _labelled(b[None], False)["image"][0]],
        "mask": [torch.tensor([[0, 0, 2, 255]]), b],  # one error: pixel (0,1) pred 1, gt 0
    }
    res = evaluate(LocalModel(c), [batch], c, "full", progress=False)
    # class 0: I=2, U=3; class 1: I=2, U=3; class 2: I=2, U=2
    assert res["per_class_iou"] == pytest.approx([200 / 3, 200 / 3, 100.0])
    assert res["miou"] == pytest.approx((200 / 3 + 200 / 3 + 100) / 3)
    assert res["pixel_acc"] == pytest.approx(100 * 6 / 7)
    # images of 1 and 2 rows: every mask pixel is on a contour (the image border), so the bands
    # are the masks and Boundary IoU equals IoU here; each image is counted once
    assert res["per_class_biou"] == pytest.approx([200 / 3, 200 / 3, 100.0])


def test_evaluate_upsamples_to_mask_size_and_runs_under_autocast():
    model = LocalModel(2, stride=1)
    label = torch.zeros(1, 8, 8, dtype=torch.long)
    batch = {"image": torch.zeros(1, 3, 4, 4), "mask": label}  # image at half resolution
    res = evaluate(model, [batch], 2, "full", amp_dtype=torch.bfloat16, progress=False)
    assert res["pixel_acc"] == pytest.approx(100.0)
    assert res["per_class_iou"] == pytest.approx([100.0, 0.0])  # class 1 absent counts as 0


@pytest.mark.parametrize("protocol", ["full", "center_crop", "sliding"])
def test_evaluate_boundary_iou_matches_the_accumulator(protocol):
    # an imperfect prediction (a 2-px shift of a square) on a 40×40 image (d = 1) and a
    # 100×100 one (d = 3), each at its own size: evaluate() must report BoundaryIoU's numbers
    c = 2
    loader, expected = [], BoundaryIoU(c)
    for size, (lo, hi) in [(40, (8, 30)), (100, (20, 80))]:
        label = torch.zeros(1, size, size, dtype=torch.long)
        label[0, lo + 2 : hi + 2, lo + 2 : hi + 2] = 1  # what the model sees (and predicts)
        batch = _labelled(label, ignore_noise=False)
        batch["mask"] = torch.zeros_like(label)
        batch["mask"][0, lo:hi, lo:hi] = 1
        loader.append(batch)
        expected.update(label, batch["mask"])
    res = evaluate(LocalModel(c), loader, c, protocol, crop_size=32, stride=24, progress=False)
    assert res["per_class_biou"] == pytest.approx((expected.iou() * 100).tolist())
    assert res["mbiou"] == pytest.approx(expected.miou())
    assert res["mbiou"] < res["miou"]  # the shift costs more at the boundary
