"""Split-list dataset, joint transforms and oversampling (brpg.data, spec §3).

Machine: exact, fp32-tolerance. Split lists, files, masks, seeded crops, scales and flips, and
oversampling are exact; the eval transform's normalisation against its formula is fp32-tolerance
(atol 1e-5).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from brpg.config import DataConfig
from brpg.data.sampling import oversample, oversample_indices
from brpg.data.splitlist import DatasetError, SplitListDataset, read_split_file
from brpg.data.transforms import (
    CenterCropPad,
    RandomCropPad,
    RandomScale,
    SegTransform,
    build_eval_transform,
    build_train_transform,
)


def _write_pair(root: Path, item_id: str, h: int = 12, w: int = 16, label: int = 1) -> None:
    (root / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (root / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(item_id)) % 2**32)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(
        root / "JPEGImages" / f"{item_id}.jpg"
    )
    mask = np.zeros((h, w), dtype=np.uint8)
    mask[2:6, 3:9] = label
    mask[0, 0] = 255
    im = Image.fromarray(mask)
    im.putpalette([0, 0, 0, 128, 0, 0] + [255, 255, 255] * 254)
    im.save(root / "SegmentationClass" / f"{item_id}.png")


@pytest.fixture()
def voc_root(tmp_path: Path) -> Path:
    root = tmp_path / "voc"
    for item_id in ("a", "b", "c"):
        _write_pair(root, item_id)
    (root / "train.txt").write_text("a\n\n# comment\nb\nc\n")
    return root


# ----------------------------------------------------------------------------- split lists


def test_read_split_file_id_and_pair_lines(tmp_path: Path) -> None:
    f = tmp_path / "s.txt"
    f.write_text("2007_000032\ntrain2017/x.jpg masks/x.png\n\n")
    items = read_split_file(f)
    assert items == [
        ("2007_000032", "JPEGImages/2007_000032.jpg", "SegmentationClass/2007_000032.png"),
        ("train2017/x.jpg", "train2017/x.jpg", "masks/x.png"),
    ]
    f.write_text("a b c\n")
    with pytest.raises(DatasetError, match=r"s\.txt:1"):
        read_split_file(f)


def test_callable_mask_template(tmp_path: Path) -> None:
    f = tmp_path / "s.txt"
    f.write_text("leftImg8bit/train/a/a_000000_leftImg8bit.png\n")

    def to_label(p: str) -> str:
        return p.replace("leftImg8bit/", "gtFine/").replace(
            "_leftImg8bit.png", "_gtFine_labelTrainIds.png"
        )

    (item,) = read_split_file(f, image_tpl="{id}", mask_tpl=to_label)
    assert item[2] == "gtFine/train/a/a_000000_gtFine_labelTrainIds.png"


def test_dataset_reads_images_and_palette_masks(voc_root: Path) -> None:
    ds = SplitListDataset(voc_root, "train.txt", num_classes=2)
    assert len(ds) == 3 and ds.ids == ["a", "b", "c"]
    sample = ds[1]
    assert sample["id"] == "b"
    assert sample["image"].shape == (3, 12, 16) and sample["image"].dtype == torch.float32
    assert sample["mask"].shape == (12, 16) and sample["mask"].dtype == torch.int64
    # class indices, not palette colours
    assert set(sample["mask"].unique().tolist()) == {0, 1, 255}
    unlabeled = SplitListDataset(voc_root, "train.txt", with_mask=False)
    assert set(unlabeled[0]) == {"image", "id"}


def test_cache_reads_each_file_once_and_returns_the_same_private_arrays(
    voc_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain = SplitListDataset(voc_root, "train.txt", num_classes=2)
    cached = SplitListDataset(voc_root, "train.txt", num_classes=2, cache=True)
    opened: list[str] = []
    original = SplitListDataset._open

    def counting_open(self: SplitListDataset, rel: str, kind: str) -> Image.Image:
        opened.append(rel)
        return original(self, rel, kind)

    monkeypatch.setattr(SplitListDataset, "_open", counting_open)
    for ds in (plain, cached):
        opened.clear()
        for _ in range(3):
            for i in range(len(ds)):
                ds.load_image(i), ds.load_mask(i), ds[i]
        reads = 3 * 3 * 4 if ds is plain else 3 * 2  # the cache reads each file once
        assert len(opened) == reads
    for i in range(len(cached)):
        assert np.array_equal(cached.load_image(i), plain.load_image(i))
        assert np.array_equal(cached.load_mask(i), plain.load_mask(i))
        a, b = cached[i], plain[i]
        assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    # a caller that writes into a returned array does not change what the cache returns
    cached.load_mask(0)[:] = 7
    cached.load_image(0)[:] = 0
    assert np.array_equal(cached.load_mask(0), plain.load_mask(0))
    assert np.array_equal(cached.load_image(0), plain.load_image(0))


def test_dataset_pair_lines(voc_root: Path) -> None:
    (voc_root / "pairs.txt").write_text("JPEGImages/a.jpg SegmentationClass/b.png\n")
    ds = SplitListDataset(voc_root, "pairs.txt")
    assert ds[0]["id"] == "JPEGImages/a.jpg" and ds[0]["mask"].shape == (12, 16)


def test_missing_root_and_split_file(tmp_path: Path, voc_root: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere.*does not exist.*data.root"):
        SplitListDataset(tmp_path / "nowhere", "train.txt")
    with pytest.raises(DatasetError, match="nosuch.txt.*does not exist"):
        SplitListDataset(voc_root, "nosuch.txt")


def test_missing_listed_files_named_with_count(voc_root: Path) -> None:
    (voc_root / "bad.txt").write_text("a\nx1\nx2\nx3\nx4\n")
    with pytest.raises(DatasetError) as err:
        SplitListDataset(voc_root, "bad.txt")
    msg = str(err.value)
    assert "8 file(s)" in msg and "bad.txt" in msg and "x1.jpg" in msg and "5 more" in msg
    ds = SplitListDataset(voc_root, "bad.txt", validate=False)  # lazy: fails at load time
    with pytest.raises(DatasetError, match="x1.jpg"):
        ds[1]


def test_corrupt_image_names_the_file(voc_root: Path) -> None:
    (voc_root / "JPEGImages" / "b.jpg").write_bytes(b"not a jpeg at all")
    ds = SplitListDataset(voc_root, "train.txt")
    with pytest.raises(DatasetError, match=r"b\.jpg.*corrupt"):
        ds[1]


def test_mask_size_mismatch_names_sizes(voc_root: Path) -> None:
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(voc_root / "SegmentationClass/c.png")
    ds = SplitListDataset(voc_root, "train.txt")
    with pytest.raises(DatasetError, match=r"c\.png.*10x10.*16x12"):
        ds[2]


def test_label_out_of_range_names_values(voc_root: Path) -> None:
    _write_pair(voc_root, "b", label=7)
    ds = SplitListDataset(voc_root, "train.txt", num_classes=5)
    with pytest.raises(DatasetError, match=r"b\.png.*\[7\].*num_classes"):
        ds[1]
    assert SplitListDataset(voc_root, "train.txt", num_classes=8)[1]["mask"].max() == 255


def test_rgb_mask_rejected(voc_root: Path) -> None:
    Image.fromarray(np.zeros((12, 16, 3), dtype=np.uint8)).save(
        voc_root / "SegmentationClass/a.png"
    )
    with pytest.raises(DatasetError, match=r"a\.png.*mode RGB"):
        SplitListDataset(voc_root, "train.txt")[0]


# ----------------------------------------------------------------------------- transforms


def _pair(h: int, w: int) -> tuple[tv_tensors.Image, tv_tensors.Mask]:
    image = tv_tensors.Image(torch.randint(0, 256, (3, h, w), dtype=torch.uint8))
    mask = tv_tensors.Mask(torch.randint(0, 5, (h, w), dtype=torch.int64))
    return image, mask


@pytest.mark.parametrize("pad_label", [255, 0])
def test_train_transform_crop_and_pad_label(pad_label: int) -> None:
    cfg = DataConfig(crop_size=48, scale_range=(0.5, 0.5), pad_label=pad_label)
    t = build_train_transform(cfg)
    torch.manual_seed(0)
    image, mask = t(*_pair(40, 60))  # scaled to 20x30, padded to 48x48
    assert image.shape == (3, 48, 48) and mask.shape == (48, 48)
    assert mask.dtype == torch.int64
    assert mask[0, 0] == pad_label and mask[-1, -1] == pad_label  # symmetric padding
    assert torch.all(image[:, 0, 0] == 0)  # mean colour -> exactly 0 after normalisation
    assert set(mask.unique().tolist()) <= set(range(5)) | {pad_label}


def test_train_transform_mask_stays_valid_labels() -> None:
    cfg = DataConfig(crop_size=32, scale_range=(0.5, 2.0))
    t = build_train_transform(cfg)
    torch.manual_seed(1)
    for _ in range(10):
        image, mask = t(*_pair(37, 41))
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, 1, 2, 3, 4, 255}


def test_no_flip_when_hflip_false() -> None:
    """An asymmetric image (left half dark, right half bright) must never come out mirrored."""
    image = torch.zeros(3, 32, 32, dtype=torch.uint8)
    image[:, :, 16:] = 255
    mask = torch.zeros(32, 32, dtype=torch.int64)
    mask[:, 16:] = 1
    cfg = DataConfig(crop_size=32, scale_range=(1.0, 1.0), hflip=False)
    t = build_train_transform(cfg)
    for seed in range(20):
        torch.manual_seed(seed)
        out, m = t(tv_tensors.Image(image), tv_tensors.Mask(mask))
        assert m[:, 0].eq(0).all() and m[:, -1].eq(1).all()
        assert out[:, :, 0].mean() < out[:, :, -1].mean()
    flips = 0
    t_flip = build_train_transform(DataConfig(crop_size=32, scale_range=(1.0, 1.0), hflip=True))
    for seed in range(20):
        torch.manual_seed(seed)
        _, m = t_flip(tv_tensors.Image(image), tv_tensors.Mask(mask))
        flips += int(m[0, 0] == 1)
    assert 0 < flips < 20


def test_random_scale_keeps_aspect_and_mask_nearest() -> None:
    torch.manual_seed(0)
    image, mask = _pair(20, 40)
    out_i, out_m = RandomScale((2.0, 2.0))(image, mask)
    assert out_i.shape == (3, 40, 80) and out_m.shape == (40, 80)
    assert set(out_m.unique().tolist()) <= set(mask.unique().tolist())
    assert isinstance(out_m, tv_tensors.Mask) and out_m.dtype == torch.int64


def test_random_scale_u2pl_sampling_balanced() -> None:
    torch.manual_seed(0)
    t = RandomScale((0.5, 2.0), mode="u2pl")
    image = tv_tensors.Image(torch.zeros(3, 100, 100))
    sizes = [t(image).shape[-1] for _ in range(400)]
    below = sum(s < 100 for s in sizes)
    assert 150 < below < 250  # P(s < 1) = 1/2 (uniform over (0.5, 2) would give 1/3)


def test_eval_transform_normalize_only_and_center_crop() -> None:
    cfg = DataConfig(pad_label=255)
    image, mask = _pair(30, 50)
    out, m = build_eval_transform(cfg)(image, mask)
    assert out.shape == (3, 30, 50) and torch.equal(m, mask)
    expected = (image.float() / 255 - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(
        cfg.std
    )[:, None, None]
    assert torch.allclose(out, expected, atol=1e-5)
    out, m = build_eval_transform(cfg, crop_size=40)(image, mask)
    assert out.shape == (3, 40, 40)
    assert (m[:5] == 255).all() and (m[-5:] == 255).all()  # 10 rows padded, 5 each side
    assert torch.equal(m[5:35], mask[:, 5:45])  # width 50 -> centre 40


def test_crop_pad_components_deterministic_under_seed() -> None:
    image, mask = _pair(50, 50)
    t = RandomCropPad(32, image_fill=(0, 0, 0), pad_label=255)
    torch.manual_seed(3)
    a = t(image, mask)
    torch.manual_seed(3)
    b = t(image, mask)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    ci, cm = CenterCropPad(20, image_fill=(0, 0, 0), pad_label=255)(image, mask)
    assert torch.equal(cm, mask[15:35, 15:35])


def test_segtransform_image_only() -> None:
    t = SegTransform()
    out = t(torch.zeros(3, 8, 8, dtype=torch.uint8))
    assert out.shape == (3, 8, 8) and out.dtype == torch.float32


# ----------------------------------------------------------------------------- oversampling


def test_oversample_length_coverage_determinism() -> None:
    idx = oversample_indices(125, 1875, seed=0)
    assert len(idx) == 1875
    assert Counter(idx) == dict.fromkeys(range(125), 15)  # multiple: each exactly 15 times
    assert idx == oversample_indices(125, 1875, seed=0)
    assert idx != oversample_indices(125, 1875, seed=1)
    idx = oversample_indices(7, 100, seed=0)
    counts = Counter(idx)
    assert len(idx) == 100 and set(counts) == set(range(7)) and max(counts.values()) <= 15
    short = oversample_indices(10, 9, seed=0)  # fewer than items: a random subset
    assert len(short) == len(set(short)) == 9
    with pytest.raises(ValueError):
        oversample_indices(0, 5, seed=0)


def test_oversample_dataset_wrapper() -> None:
    data = list(range(5))
    sub = oversample(data, 12, seed=0)  # type: ignore[arg-type]
    assert len(sub) == 12 and set(sub[i] for i in range(12)) <= set(data)
