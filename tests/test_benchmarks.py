"""Real-benchmark datasets on tiny prepared folders (the layout data_scripts/ produce)."""

import numpy as np
import pytest
from PIL import Image

from brpg.config import load_config
from brpg.data.benchmarks import BENCHMARKS, build_benchmark_datasets, cityscapes_label_path
from brpg.data.digits import PALETTE
from brpg.data.splitlist import DatasetError
from brpg.engine.datasets import build_datasets
from brpg.engine.trainer import Trainer


def _write_voc(root, ids, size=(70, 60), bad_label=False):
    (root / "VOC2012" / "JPEGImages").mkdir(parents=True)
    (root / "VOC2012" / "SegmentationClassAug").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in ids:
        img = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(img).save(root / "VOC2012" / "JPEGImages" / f"{i}.jpg")
        lab = rng.integers(0, 21, (size[1], size[0]), dtype=np.uint8)
        lab[:2] = 255
        if bad_label:
            lab[5, 5] = 40
        m = Image.fromarray(lab, "L").convert("P")
        m.putpalette(PALETTE.reshape(-1).tolist())
        m.save(root / "VOC2012" / "SegmentationClassAug" / f"{i}.png")
    split = root / "splits" / "pascal" / "1464"
    split.mkdir(parents=True)
    (split / "labeled.txt").write_text("\n".join(ids[:3]) + "\n")
    (split / "unlabeled.txt").write_text("\n".join(ids[3:]) + "\n")
    (root / "splits" / "pascal" / "val.txt").write_text("\n".join(ids[:2]) + "\n")


def _voc_cfg(root, *extra):
    return load_config(
        "voc_suponly_classic_1464",
        [f"data.root={root}", "data.num_workers=0", *extra],
    )


def test_voc_preset_reads_the_prepared_layout(tmp_path):
    ids = [f"2007_00000{i}" for i in range(5)]
    _write_voc(tmp_path, ids)
    cfg = _voc_cfg(tmp_path, "data.crop_size=65", "eval.crop_size=97")
    labeled, val = build_datasets(cfg)
    assert len(labeled) == 3 and len(val) == 2
    item = labeled[0]
    assert item["image"].shape == (3, 65, 65) and item["mask"].shape == (65, 65)
    vals = set(item["mask"].unique().tolist())
    assert vals <= set(range(21)) | {255}
    v = val[0]  # center_crop protocol: 70x60 padded to 97x97 with label 255
    assert v["image"].shape == (3, 97, 97) and (v["mask"] == 255).sum() > 97 * 97 - 70 * 60


def test_two_training_steps_on_voc_layout(tmp_path):
    ids = [f"2008_00000{i}" for i in range(5)]
    _write_voc(tmp_path / "data", ids)
    cfg = _voc_cfg(
        tmp_path / "data",
        "data.crop_size=65",
        "model.backbone=small",
        "model.width=8",
        "model.decoder_channels=16",
        "model.aspp_rates=[1, 2, 3]",
        "train.steps=2",
        "train.batch_size=2",
        "train.device=cpu",
        "train.threads=1",
        "eval.protocol=full",
        "eval.batch_size=1",
    )
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["steps"] == 2 and len(summary["per_class_iou"]) == 21


def test_missing_preparation_names_the_script(tmp_path):
    with pytest.raises(DatasetError, match="prepare_pascal.py"):
        build_datasets(_voc_cfg(tmp_path))


def test_label_values_are_checked(tmp_path):
    ids = [f"2009_00000{i}" for i in range(4)]
    _write_voc(tmp_path, ids, bad_label=True)
    labeled, _ = build_datasets(_voc_cfg(tmp_path, "data.crop_size=65"))
    with pytest.raises(DatasetError, match="40"):
        labeled[0]


def test_cityscapes_label_path():
    line = "leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png"
    assert cityscapes_label_path(line) == (
        "gtFine/train/hamburg/hamburg_000000_080169_gtFine_labelTrainIds.png"
    )
    with pytest.raises(DatasetError, match="fetch_splits"):
        cityscapes_label_path("train2017/x.jpg")


def test_coco_pair_lines(tmp_path):
    root = tmp_path / "coco"
    (root / "train2017").mkdir(parents=True)
    (root / "masks").mkdir()
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(root / "train2017" / "1.jpg")
    Image.fromarray(np.full((20, 30), 80, np.uint8), "L").save(root / "masks" / "1.png")
    split = tmp_path / "splits" / "coco" / "1_32"
    split.mkdir(parents=True)
    (split / "labeled.txt").write_text("train2017/1.jpg masks/1.png\n")
    (split / "unlabeled.txt").write_text("train2017/1.jpg\n")
    (tmp_path / "splits" / "coco" / "val.txt").write_text("train2017/1.jpg masks/1.png\n")
    cfg = load_config(
        "voc_suponly_classic_1464",
        [
            "data.name=coco",
            "data.num_classes=81",
            "data.crop_size=33",
            "data.labeled_split=splits/coco/1_32/labeled.txt",
            "data.unlabeled_split=splits/coco/1_32/unlabeled.txt",
            "data.val_split=splits/coco/val.txt",
        ],
    ).data
    labeled, unlabeled, val = build_benchmark_datasets(cfg, tmp_path)
    assert len(labeled) == len(unlabeled) == len(val) == 1
    assert int(val[0]["mask"].max()) == 80 and "mask" not in unlabeled[0]


def test_benchmark_facts():
    assert {b: BENCHMARKS[b].num_classes for b in BENCHMARKS} == {
        "pascal": 21,
        "cityscapes": 19,
        "coco": 81,
    }
    assert BENCHMARKS["pascal"].train_size == 10_582 and BENCHMARKS["coco"].val_size == 5_000
