"""Chapter 2's pseudo-label measurements (brpg.book.demo_pseudo): the entropy filter's two
sides on a hand-built case, and the view's maps mixed by the same CutMix boxes.

Machine: exact. Hand-built tensors and a one-layer stand-in teacher; the checks are on which
pixel goes where and on counts, not on float sums.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from brpg.book.demo import DemoRun
from brpg.book.demo_pseudo import PseudoView, entropy_filter, pseudo_view
from brpg.config import load_config


def _view(logits_bchw: torch.Tensor, labels_bhw: torch.Tensor) -> PseudoView:
    """A view without augmentation or CutMix: the maps as given."""
    b, _, h, w = logits_bchw.shape
    pseudo = logits_bchw.argmax(1)
    conf = logits_bchw.softmax(1).amax(1)
    images = torch.zeros(b, 3, h, w)
    return PseudoView(images, labels_bhw, logits_bchw, images, pseudo, conf, labels_bhw,
                      logits_bchw, torch.zeros(b, h, w, dtype=torch.bool))  # fmt: skip


def test_entropy_filter_scores_each_side_against_the_true_labels():
    """Hand case, 1 image of 2 × 4 pixels, 2 classes. Four pixels are confident (logit gap 6:
    low entropy) and four are near-uniform (gap 0.1: high entropy). At percentile 50 the
    filter keeps the four confident ones. Their pseudo-labels are right 3 times of 4; of the
    four dropped, one has label 255 (left out) and one of the other three is right:
    accuracy 3/4 kept, 1/3 dropped; kept share 4/8 of all pixels."""
    gap = torch.tensor([[6.0, 6.0, 6.0, 6.0], [0.1, 0.1, 0.1, 0.1]])
    logits = torch.stack([gap, torch.zeros(2, 4)])[None]  # class 0 wins everywhere
    labels = torch.tensor([[[0, 0, 0, 1], [0, 1, 1, 255]]])
    check = entropy_filter(_view(logits, labels), percent=50.0)
    assert check.keep_bhw.tolist() == [[[True] * 4, [False] * 4]]
    assert check.kept_share == 0.5
    assert check.acc_kept == 0.75 and check.acc_dropped == pytest.approx(1 / 3, rel=1e-6)
    assert check.valid_bhw.sum() == 7 and check.right_bhw.sum() == 4


def test_entropy_filter_refuses_a_percentile_that_leaves_one_side_empty():
    logits = torch.stack([torch.tensor([[6.0, 0.1]]), torch.zeros(1, 2)])[None]
    with pytest.raises(ValueError, match="keeps all or none"):
        entropy_filter(_view(logits, torch.tensor([[[0, 0]]])), percent=0.0)  # keeps none


class _Teacher(nn.Module):
    """Logits that name each pixel's class by the image's first channel (class = round(x)),
    at stride 4 as the real model's are, and a representation head."""

    def forward(self, x):
        small = x[:, :1, ::4, ::4].round().long().clamp(0, 2)
        logits = 5.0 * nn.functional.one_hot(small[:, 0], 3).permute(0, 3, 1, 2).float()
        return {"logits": logits, "rep": torch.zeros(x.shape[0], 2, *small.shape[-2:])}


def test_pseudo_view_mixes_every_map_with_the_same_boxes():
    """Scene i is filled with class i (image value i, label i), so every mixed map must hold
    i outside the box and its partner's class (i + 1) mod 3 inside it."""
    cfg = load_config("digits_brpg_1_16")
    val = [{"image": torch.full((3, 16, 16), float(i)), "mask": torch.full((16, 16), i)}
           for i in range(3)]  # fmt: skip
    run = DemoRun(cfg, nn.Identity(), [], [], val, {}, Path("."), teacher=_Teacher())
    view = pseudo_view(run, n_images=3, seed=1)
    assert view.cut_bhw.any() and not view.cut_bhw.all()
    own = torch.arange(3)[:, None, None].expand(3, 16, 16)
    want = torch.where(view.cut_bhw, (own + 1) % 3, own)
    assert torch.equal(view.labels_mix_bhw, want) and torch.equal(view.pseudo_mix_bhw, want)
    assert torch.equal(view.logits_mix_bchw.argmax(1), want)
    assert torch.equal(view.logits_bchw.argmax(1), own)  # the weak view is not mixed
    assert torch.equal(pseudo_view(run, n_images=3, seed=1).cut_bhw, view.cut_bhw)  # seeded
