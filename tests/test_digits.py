"""The DigitScenes benchmark (brpg.data.digits): determinism, splits, cache, rendering.

Machine: exact. Generation gives the same bytes for the same seed (checked on one machine, with 1
and 2 workers: tests/README.md), and the splits, caches, masks and colours are bookkeeping.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brpg.config import DataConfig
from brpg.data.digits import (
    DIGIT_CLASSES,
    MULTIMODAL_DIGITS,
    NUM_CLASSES,
    PALETTE,
    DigitKnobs,
    boundary_band,
    build_digit_datasets,
    colorize,
    ensure_digit_scenes,
    glyph_alpha,
    labeled_splits,
    render_scene,
    scenes_fingerprint,
    source_pools,
)
from brpg.data.splitlist import DatasetError, SplitListDataset

N_TRAIN, N_VAL = 64, 16


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_digit_scenes(
        tmp_path_factory.mktemp("digits") / "ds", seed=0, n_train=N_TRAIN, n_val=N_VAL, workers=1
    )


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _masks(root: Path, split: str) -> list[np.ndarray]:
    ids = (root / "splits" / f"{split}.txt").read_text().split()
    return [np.array(Image.open(root / "SegmentationClass" / f"{i}.png")) for i in ids]


def test_layout_and_meta(cache: Path) -> None:
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["params"]["n_train"] == N_TRAIN and meta["num_classes"] == NUM_CLASSES == 11
    assert len(DIGIT_CLASSES) == 11 and DIGIT_CLASSES[3] == "2"
    assert len((cache / "splits/train.txt").read_text().split()) == N_TRAIN
    assert len((cache / "splits/val.txt").read_text().split()) == N_VAL
    assert len(list((cache / "JPEGImages").glob("*.png"))) == N_TRAIN + N_VAL
    mask_png = Image.open(cache / "SegmentationClass" / "train_00000.png")
    assert mask_png.mode == "P" and mask_png.size == (64, 64)
    assert not list(cache.parent.glob(".ds.tmp-*"))  # temp folder renamed away


def test_same_seed_identical_bytes_other_seed_differs(cache: Path, tmp_path: Path) -> None:
    again = ensure_digit_scenes(tmp_path / "a", seed=0, n_train=N_TRAIN, n_val=N_VAL, workers=2)
    assert _files(again) == _files(cache)  # also: the number of workers does not matter
    other = ensure_digit_scenes(tmp_path / "b", seed=1, n_train=N_TRAIN, n_val=N_VAL, workers=1)
    img = "JPEGImages/train_00000.png"
    assert (other / img).read_bytes() != (cache / img).read_bytes()


def test_source_digits_disjoint_between_train_and_val(cache: Path) -> None:
    ann = json.loads((cache / "annotations.json").read_text())
    train_pool, val_pool = set(ann["source_pools"]["train"]), set(ann["source_pools"]["val"])
    assert not train_pool & val_pool and len(train_pool | val_pool) == 1797
    assert 0.7 < len(train_pool) / 1797 < 0.8
    for scene_id, instances in ann["scenes"].items():
        pool = train_pool if scene_id.startswith("train") else val_pool
        assert all(inst["source"] in pool for inst in instances)
    pools = source_pools(0)
    assert not set(pools["train"].source) & set(pools["val"].source)


def test_all_eleven_classes_present(cache: Path) -> None:
    values = set(np.unique(np.concatenate([m.ravel() for m in _masks(cache, "train")])).tolist())
    assert values == set(range(11))  # v3: no ignore band by default


def test_default_labels_boundaries_at_most_two_percent_ignored(cache: Path) -> None:
    masks = np.stack(_masks(cache, "train"))
    assert (masks == 255).mean() <= 0.02
    # boundary pixels are labeled: two different valid labels touch in (almost) every scene
    touching = (masks[:, :, 1:] != masks[:, :, :-1]).any(axis=(1, 2))
    assert touching.mean() > 0.9


def test_boundary_band_between_different_labels(cache: Path) -> None:
    label = np.zeros((8, 8), dtype=np.uint8)
    label[2:6, 2:6] = 3
    band = boundary_band(label)
    assert band[1, 3] and band[2, 3] and not band[3, 3] and not band[0, 0]  # 1 px each side
    knobs = DigitKnobs(ignore_band=1)  # the VOC-style band of version 2, now a knob
    pool = source_pools(0)["train"]
    for i in range(16):
        mask = render_scene(np.random.default_rng(100 + i), pool, 64, knobs)[1]
        assert (mask == 255).any()
        # no two different valid labels touch: the band always separates them
        padded = np.pad(mask, 1, mode="edge").astype(np.int64)
        for dy in range(3):
            for dx in range(3):
                nb = padded[dy : dy + 64, dx : dx + 64]
                touching = (mask != 255) & (nb != 255) & (nb != mask)
                assert not touching.any()
    # the band is exactly the pixels whose 3x3 neighbourhood held two labels before banding
    for i in range(20):
        raw = render_scene(np.random.default_rng(i), pool, 64, DigitKnobs())[1]
        banded = render_scene(np.random.default_rng(i), pool, 64, knobs)[1]
        assert 255 not in raw
        between = np.zeros_like(raw, dtype=bool)
        padded = np.pad(raw, 1, mode="edge")
        for dy in range(3):
            for dx in range(3):
                between |= padded[dy : dy + 64, dx : dx + 64] != raw
        assert np.array_equal(banded == 255, between)
        assert np.array_equal(banded[~between], raw[~between])


def test_nested_splits_sizes_and_unlabeled_rest(cache: Path) -> None:
    ids = [f"train_{i:05d}" for i in range(2000)]
    splits = labeled_splits(ids, seed=0)
    sizes = {name: len(lab) for name, (lab, _) in splits.items()}
    assert sizes == {"1_16": 125, "1_8": 250, "1_4": 500, "1_2": 1000, "full": 2000}
    chain = ["1_16", "1_8", "1_4", "1_2", "full"]
    for small, big in zip(chain, chain[1:], strict=False):
        assert set(splits[small][0]) < set(splits[big][0])
    for lab, unl in splits.values():
        assert not set(lab) & set(unl) and sorted(lab + unl) == ids
    assert splits["full"][1] == []
    assert labeled_splits(ids, seed=1)["1_16"][0] != splits["1_16"][0]
    # on disk
    train = set((cache / "splits/train.txt").read_text().split())
    for name, expected in (("1_16", 4), ("1_8", 8), ("1_2", 32), ("full", 64)):
        lab = (cache / "splits" / name / "labeled.txt").read_text().split()
        unl = (cache / "splits" / name / "unlabeled.txt").read_text().split()
        assert len(lab) == expected and set(lab) | set(unl) == train and not set(lab) & set(unl)


def test_cache_reuse_and_regeneration(tmp_path: Path) -> None:
    root = tmp_path / "c"
    kw = {"seed": 0, "n_train": 16, "n_val": 4, "workers": 1}
    ensure_digit_scenes(root, **kw)
    meta = root / "meta.json"
    stamp = meta.stat().st_mtime_ns
    os.utime(meta, ns=(stamp - 10**9, stamp - 10**9))  # make any rewrite visible
    stamp = meta.stat().st_mtime_ns
    ensure_digit_scenes(root, **kw)
    assert meta.stat().st_mtime_ns == stamp  # reused
    ensure_digit_scenes(root, **kw, noise_std=0.0)  # a knob changed: regenerated
    assert meta.stat().st_mtime_ns != stamp
    assert json.loads(meta.read_text())["params"]["knobs"]["noise_std"] == 0.0
    stamp = meta.stat().st_mtime_ns
    (root / "SegmentationClass" / "train_00003.png").unlink()  # incomplete: regenerated
    ensure_digit_scenes(root, **kw, noise_std=0.0)
    assert (root / "SegmentationClass" / "train_00003.png").is_file()
    assert not list(tmp_path.glob(".c.*-*"))  # no temp / old folders left behind
    with pytest.raises(TypeError, match="unknown DigitScenes knob.*noise_sd"):
        ensure_digit_scenes(root, **kw, noise_sd=0.1)
    other = tmp_path / "not_a_cache"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(DatasetError, match="not a DigitScenes cache"):
        ensure_digit_scenes(other, **kw)
    assert (other / "precious.txt").exists()


def test_multimodal_classes_render_differently(cache: Path) -> None:
    pool = source_pools(0)["train"]
    for digit in MULTIMODAL_DIGITS:
        glyph = pool.glyphs[pool.by_digit[digit][0]]
        solid_a, solid_r = glyph_alpha(glyph, 24, 24, "solid")
        hollow_a, hollow_r = glyph_alpha(glyph, 24, 24, "hollow")
        solid_fill = (solid_a[solid_r] > 0.5).mean()
        hollow_fill = (hollow_a[hollow_r] > 0.5).mean()
        assert solid_fill > 0.95 and hollow_fill < 0.8, (digit, solid_fill, hollow_fill)
    ann = json.loads((cache / "annotations.json").read_text())["scenes"]
    modes: dict[int, set[str]] = {}
    for instances in ann.values():
        for inst in instances:
            modes.setdefault(inst["digit"], set()).add(inst["mode"])
    assert any(modes.get(d) == {"solid", "hollow"} for d in MULTIMODAL_DIGITS)
    assert all(modes[d] == {"solid"} for d in modes if d not in MULTIMODAL_DIGITS)
    assert DigitKnobs.make(n_modes=1).n_modes == 1


def test_read_back_through_splitlist_dataset(cache: Path) -> None:
    cfg = DataConfig(root=str(cache), digits_train=N_TRAIN, digits_val=N_VAL)
    labeled, unlabeled, val = build_digit_datasets(cfg)
    assert isinstance(labeled, SplitListDataset)
    assert (len(labeled), len(unlabeled), len(val)) == (4, 60, 16)
    torch.manual_seed(0)
    sample = labeled[0]
    assert sample["image"].shape == (3, 64, 64) and sample["mask"].shape == (64, 64)
    assert set(sample["mask"].unique().tolist()) <= set(range(11)) | {255}
    assert "mask" not in unlabeled[0] and val[0]["image"].shape == (3, 64, 64)
    full = DataConfig(
        root=str(cache),
        digits_train=N_TRAIN,
        digits_val=N_VAL,
        labeled_split="splits/full/labeled.txt",
        unlabeled_split="splits/full/unlabeled.txt",
    )
    lab, unl, _ = build_digit_datasets(full)
    assert len(lab) == N_TRAIN and len(unl) == 0
    with pytest.raises(DatasetError, match="num_classes"):
        build_digit_datasets(DataConfig(root=str(cache), num_classes=21))


def test_colorize_uses_voc_palette() -> None:
    mask = torch.tensor([[0, 1], [10, 255]])
    rgb = colorize(mask)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert tuple(rgb[0, 1]) == (128, 0, 0) and tuple(rgb[1, 1]) == (224, 224, 192)
    assert tuple(PALETTE[15]) == (192, 128, 128)  # VOC "person"


# The pixel fingerprint of a 16 + 4 scene cache (seed 0), generated on an Intel Xeon with
# AVX-512 (2026-12-05). DigitScenes must be the same on every machine (tests/README.md: what may
# not differ): a study spread over sessions compares runs made on whatever machine each gets,
# and their summaries record this fingerprint of the full cache. If this fails on your machine,
# the generator is machine-dependent: that is a bug to fix, not a constant to update.
TINY_FINGERPRINT = "e6d5ee56cc253e19"


def test_the_same_scenes_on_every_machine(tmp_path: Path) -> None:
    root = ensure_digit_scenes(tmp_path / "digits", seed=0, n_train=16, n_val=4)
    assert scenes_fingerprint(root) == TINY_FINGERPRINT
    # the fingerprint reads pixels: one changed mask pixel changes it
    mask = root / "SegmentationClass" / "val_00000.png"
    with Image.open(mask) as im:
        pixels = np.array(im)
        palette = im.getpalette()
    pixels[0, 0] = (int(pixels[0, 0]) + 1) % 11
    edited = Image.fromarray(pixels)
    edited.putpalette(palette)
    edited.save(mask)
    assert scenes_fingerprint(root) != TINY_FINGERPRINT
