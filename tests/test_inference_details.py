"""Inference details that mutation testing found unpinned (issue 18, ``make mutate``): the
model-output and argument checks and their messages, list and ``[B, 1, H, W]`` masks, the
default ignore value and protocol, the class-count check, autocast only when asked.

Machine: exact. Argument checks, messages, mask layouts, metrics from integer counts, and the
autocast dtype the model sees (float16, asked explicitly: not what the CPU offers).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from brpg.engine.inference import evaluate, predict_logits, window_starts


class Onehot(nn.Module):
    """Logits = one-hot of the input's channel 0 read as a class id (a perfect model)."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.c = num_classes
        self.seen_autocast: list[torch.dtype | None] = []

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        on = torch.is_autocast_enabled(x.device.type)
        self.seen_autocast.append(torch.get_autocast_dtype(x.device.type) if on else None)
        cls = x[:, 0].round().long().clamp(0, self.c - 1)
        return {"logits": nn.functional.one_hot(cls, self.c).permute(0, 3, 1, 2).float()}


def _batch(mask: Tensor) -> dict[str, Tensor]:
    image = mask.float()[:, None].expand(-1, 3, -1, -1).clone()
    return {"image": image, "mask": mask}


def test_model_output_checks_and_argument_messages():
    x = torch.zeros(1, 3, 4, 4)

    class Plain(nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return x

    with pytest.raises(TypeError, match="the model must return a dict with key 'logits'"):
        predict_logits(Plain(), x)
    with pytest.raises(TypeError, match="the model must return a dict with key 'logits'"):
        predict_logits(lambda t: {"out": t}, x)
    with pytest.raises(ValueError, match=r"got shape \(3, 4, 4\)"):
        predict_logits(Onehot(), x[0])
    with pytest.raises(ValueError, match="got 0, 4"):
        predict_logits(Onehot(), x, "sliding", crop_size=0, stride=4)
    with pytest.raises(ValueError, match="got 4, 0"):
        predict_logits(Onehot(), x, "sliding", crop_size=4, stride=0)
    one = predict_logits(Onehot(), x, "sliding", crop_size=1, stride=1)  # 1 is a valid crop
    assert one.shape == (1, 3, 4, 4)
    with pytest.raises(ValueError, match="model returned 3 classes, expected 5"):
        predict_logits(Onehot(), x, num_classes=5)
    with pytest.raises(ValueError, match="length 3 < crop 5: pad the image first"):
        window_starts(3, 5, 1)
    with pytest.raises(ValueError, match="unknown eval protocol 'tiles'; valid: full, center_crop"):
        evaluate(Onehot(), [], num_classes=3, protocol="tiles", progress=False)


def test_default_protocol_is_the_whole_image():
    x = torch.arange(3.0).view(1, 1, 1, 3).expand(1, 3, 2, 3).clone()
    torch.testing.assert_close(predict_logits(Onehot(), x), predict_logits(Onehot(), x, "full"))


def test_evaluate_checks_the_number_of_classes():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="model returned 3 classes, expected 4"):
        evaluate(Onehot(3), [_batch(mask)], num_classes=4, progress=False)


def test_evaluate_default_ignore_and_mask_layouts():
    mask = torch.tensor([[[0, 1, 2, 2], [0, 1, 2, 2]]])
    wrong = _batch(mask)
    wrong["image"][:, :, 0, 0] = 2.0  # a wrong prediction where the target is about to be 255
    target = mask.clone()
    target[0, 0, 0] = 255
    res = evaluate(Onehot(), [{"image": wrong["image"], "mask": target}], 3, progress=False)
    assert res["miou"] == pytest.approx(100.0, abs=1e-6)
    # the same as [B, 1, H, W] mask and as a list of per-image [1, H, W] masks
    as4d = evaluate(
        Onehot(), [{"image": wrong["image"], "mask": target[:, None]}], 3, progress=False
    )
    as_list = evaluate(
        Onehot(), [{"image": [wrong["image"][0]], "mask": [target]}], 3, progress=False
    )
    assert as4d["miou"] == res["miou"] == as_list["miou"]
    assert as4d["per_class_biou"] == res["per_class_biou"] == as_list["per_class_biou"]
    with pytest.raises(ValueError):  # a list batch with more masks than images
        evaluate(Onehot(), [{"image": [wrong["image"][0]], "mask": [target, target]}], 3)


def test_autocast_only_when_asked():
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    model = Onehot()
    evaluate(model, [_batch(mask)], 3, progress=False)
    assert model.seen_autocast == [None]
    # float16, not the CPU's default autocast dtype (bfloat16): the asked dtype is used
    evaluate(model, [_batch(mask)], 3, amp_dtype=torch.float16, progress=False)
    assert model.seen_autocast == [None, torch.float16]


def test_a_one_row_image_keeps_its_mask():
    mask = torch.tensor([[[0, 1, 2, 1]]])  # [B = 1, H = 1, W = 4]: not a [B, 1, H, W] mask
    res = evaluate(Onehot(), [_batch(mask)], 3, progress=False)
    assert res["miou"] == pytest.approx(100.0, abs=1e-6)
