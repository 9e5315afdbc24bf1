"""Real-benchmark datasets and presets on tiny prepared folders.

The fixtures run the real preparation (``brpg.prepare.<dataset>``) on miniature archives, so the
loaders read exactly the layout ``data_scripts/`` produce.

Machine: exact, fp32-tolerance. Benchmark facts, presets, prepared folders and their loaders are
exact. The two training steps on the VOC fixture check bookkeeping, and that the mIoU is the mean
of the per-class IoUs (fp32-tolerance); they keep the VOC preset's train.amp=auto, on which nothing
they assert depends.
"""

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from brpg.cli import main as cli_main
from brpg.config import ConfigError, load_config
from brpg.data.benchmarks import (
    BENCHMARKS,
    DataNotPreparedError,
    build_benchmark_datasets,
    cityscapes_label_path,
    voc_palette,
)
from brpg.data.build import build_datasets
from brpg.data.splitlist import DatasetError
from brpg.engine.trainer import Trainer
from brpg.prepare import fixtures as fx
from brpg.prepare.label_png import read_label_png, save_label_png
from brpg.prepare.splits import read_lines

ROOT = Path(__file__).resolve().parents[1]
SHARED_SPLITS = ROOT.parent / "shared" / "splits"

#: preset -> (benchmark, published split, official epochs)
PRESETS = {
    "voc_suponly_classic_1464": ("pascal", "1464", 80),
    "voc_suponly_blended_662": ("pascal", "662", 80),
    "cityscapes_suponly_744": ("cityscapes", "744", 200),
    "coco_suponly_1_32": ("coco", "1_32", 80),
}
PRESET_OF = {"pascal": "voc_suponly_classic_1464", "cityscapes": "cityscapes_suponly_744"}
PRESET_OF["coco"] = "coco_suponly_1_32"


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("benchmarks")
    for name in fx.FIXTURE_DATASETS:
        assert fx.prepare_fixture(root, name)["ok"]
    return root


def _cfg(dataset: str, root: Path, split: str, *extra: str):
    bench = BENCHMARKS[dataset]
    return load_config(
        PRESET_OF[dataset],
        [
            f"data.root={root}",
            f"data.labeled_split={bench.labeled_split(split)}",
            f"data.unlabeled_split={bench.unlabeled_split(split)}",
            "data.num_workers=0",
            *extra,
        ],
    )


def _values(mask: torch.Tensor) -> set[int]:
    return set(mask.unique().tolist())


# --------------------------------------------------------------------------- facts and presets


def test_benchmark_facts():
    sizes = {n: (b.num_classes, b.train_size, b.val_size) for n, b in BENCHMARKS.items()}
    assert sizes == {
        "pascal": (21, 10_582, 1_449),
        "cityscapes": (19, 2_975, 500),
        "coco": (81, 118_287, 5_000),
    }
    for bench in BENCHMARKS.values():
        assert len(bench.class_names) == len(set(bench.class_names)) == bench.num_classes
        assert len(bench.palette) == len(set(bench.palette)) == bench.num_classes
        assert all(0 <= c <= 255 for colour in bench.palette for c in colour)
    voc = BENCHMARKS["pascal"]
    assert voc.palette[:3] == ((0, 0, 0), (128, 0, 0), (0, 128, 0))
    assert voc.class_names[15] == "person" and voc.palette[15] == (192, 128, 128)
    assert voc_palette(256)[255] == (224, 224, 192)  # the VOC ignore/border colour
    cs = BENCHMARKS["cityscapes"]
    assert cs.palette[0] == (128, 64, 128) and cs.class_names[0] == "road"
    assert cs.palette[18] == (119, 11, 32) and cs.class_names[18] == "bicycle"
    coco = BENCHMARKS["coco"]  # mask values: category ids in ascending order (prepare_coco)
    assert coco.class_names[1] == "person" and coco.class_names[12] == "stop sign"
    assert coco.class_names[80] == "toothbrush"


def test_colorize():
    mask = torch.tensor([[0, 1, 255], [18, 19, 7]])
    cs = BENCHMARKS["cityscapes"].colorize(mask)
    assert cs.shape == (2, 3, 3) and cs.dtype == np.uint8
    assert tuple(cs[0, 0]) == (128, 64, 128) and tuple(cs[1, 0]) == (119, 11, 32)
    assert tuple(cs[0, 2]) == tuple(cs[1, 1]) == (0, 0, 0)  # ignore and unknown values: black
    voc = BENCHMARKS["pascal"].colorize(mask.numpy())
    assert tuple(voc[0, 1]) == (128, 0, 0) and tuple(voc[0, 2]) == (224, 224, 192)


def test_split_protocols():
    voc = BENCHMARKS["pascal"]
    assert voc.splits["classic"] == {"92": 92, "183": 183, "366": 366, "732": 732, "1464": 1464}
    assert list(voc.splits["blended"].values()) == [662, 1323, 2646, 5291]
    assert BENCHMARKS["cityscapes"].split_sizes == {
        "186": 186,
        "372": 372,
        "744": 744,
        "1488": 1488,
    }
    assert list(BENCHMARKS["coco"].split_sizes.values()) == [925, 1849, 3697, 7393]
    # every published labeled count is ceil(pool / k) for k = 16, 8, 4, 2 (COCO: 128 ... 16)
    pools = {"classic": 1464, "blended": 10_582, "fine": 2_975, "fraction": 118_287}
    for bench in BENCHMARKS.values():
        for setting, sizes in bench.splits.items():
            k = [128, 64, 32, 16] if setting == "fraction" else [16, 8, 4, 2, 1][: len(sizes)]
            assert list(sizes.values()) == [math.ceil(pools[setting] / d) for d in k]
            assert all(bench.setting_of(s) == setting for s in sizes)


def test_eval_protocols_as_data():
    voc, cs, coco = (BENCHMARKS[n] for n in ("pascal", "cityscapes", "coco"))
    assert (voc.default_eval.protocol, voc.default_eval.crop_size) == ("center_crop", 513)
    assert (cs.default_eval.protocol, cs.default_eval.crop_size, cs.default_eval.stride) == (
        "sliding",
        769,
        513,
    )
    assert (coco.default_eval.protocol, coco.default_eval.crop_size) == ("center_crop", 641)
    assert [b.train_crop for b in (voc, cs, coco)] == [513, 769, 513]
    assert [b.in_training_eval.crop_size for b in (voc, cs, coco)] == [513, 769, 641]


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="../shared/splits is absent")
def test_split_sizes_match_the_published_lists():
    for bench in BENCHMARKS.values():
        folder = SHARED_SPLITS / bench.name
        assert len(read_lines(folder / "val.txt")) == bench.val_size
        for split, n in bench.split_sizes.items():
            assert len(read_lines(folder / split / "labeled.txt")) == n
            unlabeled = folder / split / "unlabeled.txt"
            if unlabeled.is_file():
                assert n + len(read_lines(unlabeled)) == bench.train_size


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_load_and_follow_the_benchmark(preset):
    dataset, split, _ = PRESETS[preset]
    cfg = load_config(preset)
    bench = BENCHMARKS[dataset]
    assert cfg.name == preset and cfg.data.name == dataset
    assert cfg.data.num_classes == bench.num_classes
    assert cfg.data.labeled_split == bench.labeled_split(split)
    assert cfg.data.unlabeled_split == bench.unlabeled_split(split)
    assert cfg.data.val_split == bench.val_split
    assert cfg.data.crop_size == bench.train_crop and cfg.data.hflip
    assert cfg.data.pad_label == 255 and cfg.data.scale_range == (0.5, 2.0)
    ev = bench.default_eval
    assert (cfg.eval.protocol, cfg.eval.crop_size) == (ev.protocol, ev.crop_size)
    if ev.protocol == "sliding":
        assert cfg.eval.stride == ev.stride
    assert cfg.train.device == "auto" and cfg.train.amp == "auto"
    assert cfg.model.backbone == ("xception65" if dataset == "coco" else "resnet101")
    assert cfg.model.output_stride == 8 and cfg.model.aspp_rates == (12, 24, 36)
    assert cfg.model.decoder_channels == 256 and not cfg.model.rep_head
    assert cfg.optim.name == "sgd" and cfg.optim.momentum == 0.9


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_steps_are_the_official_epochs_on_4_gpus(preset):
    dataset, split, epochs = PRESETS[preset]
    cfg = load_config(preset)
    n_sup = BENCHMARKS[dataset].split_sizes[split]
    per_epoch = math.ceil(n_sup / 4) // cfg.train.batch_size  # spec §3.2 loader arithmetic
    assert cfg.train.steps == epochs * per_epoch


def test_suponly_hyperparameters():
    voc, cs = load_config("voc_suponly_classic_1464"), load_config("cityscapes_suponly_744")
    assert (voc.optim.lr, voc.optim.head_lr_mult, voc.optim.weight_decay) == (0.001, 10.0, 1e-4)
    assert (voc.loss.ce_weight, voc.loss.ohem_weight, voc.train.batch_size) == (1.0, 0.0, 8)
    assert (cs.optim.lr, cs.optim.head_lr_mult, cs.optim.weight_decay) == (0.01, 1.0, 5e-4)
    assert (cs.loss.ce_weight, cs.loss.ohem_weight, cs.train.batch_size) == (0.0, 1.0, 4)
    assert cs.loss.ohem_min_kept == 100_000 and cs.eval.batch_size == 1


# --------------------------------------------------------------------------- datasets


def test_voc_datasets(data_root):
    cfg = _cfg("pascal", data_root, "3", "data.crop_size=33", "eval.crop_size=17")
    labeled, val = build_datasets(cfg)
    assert len(labeled) == 3 and len(val) == 2
    item = labeled[0]
    assert item["image"].shape == (3, 33, 33) and item["mask"].shape == (33, 33)
    assert _values(item["mask"]) <= set(range(21)) | {255}
    # center crop 17x17 of a 10x8 image: the raw mask in the middle, padding = 255 around it
    v = val[0]
    raw = read_label_png(data_root / "VOC2012" / "SegmentationClassAug" / f"{fx.VOC_VAL[0]}.png")
    assert v["image"].shape == (3, 17, 17)
    top, left = (17 - fx.PASCAL_H) // 2, (17 - fx.PASCAL_W) // 2
    inner = v["mask"][top : top + fx.PASCAL_H, left : left + fx.PASCAL_W].numpy()
    np.testing.assert_array_equal(inner, raw)
    assert int((v["mask"] == 255).sum()) >= 17 * 17 - fx.PASCAL_W * fx.PASCAL_H


def test_faithful_padding_label(data_root):
    """data.pad_label=0 reproduces the official padding: the border becomes background."""
    cfg = _cfg("pascal", data_root, "3", "eval.crop_size=17", "data.pad_label=0")
    _, val = build_datasets(cfg)
    mask = val[0]["mask"]
    assert (mask[0] == 0).all() and (mask[:, 0] == 0).all()


def test_build_benchmark_datasets_returns_three(data_root):
    cfg = _cfg("pascal", data_root, "1", "data.crop_size=9", "eval.crop_size=9")
    labeled, unlabeled, val = build_benchmark_datasets(cfg)
    assert (len(labeled), len(unlabeled), len(val)) == (1, len(fx.TRAIN_AUG) - 1, 2)
    assert "mask" not in unlabeled[0] and unlabeled[0]["image"].shape == (3, 9, 9)


def test_cityscapes_datasets(data_root):
    cfg = _cfg("cityscapes", data_root, "1", "data.crop_size=9")
    labeled, unlabeled, val = build_benchmark_datasets(cfg)
    assert (len(labeled), len(unlabeled), len(val)) == (1, 2, 2)
    assert labeled[0]["mask"].shape == (9, 9)
    # sliding protocol: full-size val images, masks are the train ids written by the preparation
    v = val[1]
    assert v["image"].shape == (3, fx.CITYSCAPES_H, fx.CITYSCAPES_W)
    label = data_root / "cityscapes" / cityscapes_label_path(val.items[1][1])
    np.testing.assert_array_equal(v["mask"].numpy(), read_label_png(label))
    assert _values(v["mask"]) == set(range(19)) | {255}  # the fixture uses every label id
    _, val2 = build_datasets(cfg)
    assert len(val2) == 2


def test_coco_datasets(data_root):
    cfg = _cfg("coco", data_root, "1_2", "data.crop_size=9", "eval.crop_size=25")
    labeled, unlabeled, val = build_benchmark_datasets(cfg)
    assert (len(labeled), len(unlabeled), len(val)) == (1, 2, 2)
    assert _values(labeled[0]["mask"]) <= set(range(81)) | {255}
    assert set(np.unique(labeled.load_mask(0)).tolist()) == {0, 1, 80}  # person + toothbrush
    assert val[0]["mask"].shape == (25, 25) and 17 in _values(val[0]["mask"])  # the dog


def test_missing_prepared_folder_names_the_script(tmp_path):
    for dataset, preset in PRESET_OF.items():
        cfg = load_config(preset, [f"data.root={tmp_path}"])
        with pytest.raises(DataNotPreparedError, match=f"data_scripts/prepare_{dataset}.py"):
            build_datasets(cfg)
    assert issubclass(DataNotPreparedError, FileNotFoundError)
    assert issubclass(DataNotPreparedError, DatasetError)


def test_missing_split_list_names_fetch_splits(data_root):
    with pytest.raises(DataNotPreparedError, match="fetch_splits.py"):
        build_datasets(_cfg("pascal", data_root, "1464"))


def test_cli_reports_an_unprepared_dataset(tmp_path, capsys):
    args = ["train", "--config", "voc_suponly_classic_1464", "--out", str(tmp_path / "run")]
    assert cli_main([*args, "--set", f"data.root={tmp_path / 'none'}"]) == 2
    assert "prepare_pascal.py" in capsys.readouterr().err


def test_config_mismatches_are_errors(data_root):
    with pytest.raises(ConfigError, match="data.num_classes=21"):
        build_datasets(_cfg("pascal", data_root, "3", "data.num_classes=20"))
    with pytest.raises(ConfigError, match="eval.batch_size=1"):
        build_datasets(_cfg("pascal", data_root, "3", "eval.protocol=full"))
    _, val = build_datasets(
        _cfg("pascal", data_root, "3", "eval.protocol=full", "eval.batch_size=1")
    )
    assert val[0]["mask"].shape == (fx.PASCAL_H, fx.PASCAL_W)


def test_label_values_outside_the_classes_are_errors(data_root, tmp_path):
    shutil.copytree(data_root / "VOC2012", tmp_path / "VOC2012")
    shutil.copytree(data_root / "splits" / "pascal", tmp_path / "splits" / "pascal")
    path = tmp_path / "VOC2012" / "SegmentationClassAug" / f"{fx.VOC_VAL[0]}.png"
    label = read_label_png(path)
    label[3, 3] = 30
    save_label_png(path, label)
    _, val = build_datasets(_cfg("pascal", tmp_path, "3", "eval.crop_size=17"))
    with pytest.raises(DatasetError, match="30"):
        val[0]
    with Image.open(path) as im:
        assert im.mode == "P"


def test_cityscapes_label_path():
    line = "leftImg8bit/train/hamburg/hamburg_000000_080169_leftImg8bit.png"
    assert cityscapes_label_path(line) == (
        "gtFine/train/hamburg/hamburg_000000_080169_gtFine_labelTrainIds.png"
    )
    with pytest.raises(DatasetError, match="fetch_splits"):
        cityscapes_label_path("train2017/x.jpg")


def test_two_training_steps_on_the_voc_fixture(data_root, tmp_path):
    cfg = _cfg(
        "pascal",
        data_root,
        "3",
        "data.crop_size=65",
        "eval.crop_size=65",
        "eval.batch_size=2",
        "model.backbone=small",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "model.aspp_rates=[1, 2, 3]",
        "train.steps=2",
        "train.batch_size=2",
        "train.device=cpu",
        "train.threads=1",
        "train.eval_every=0",
        "train.ckpt_every=0",
        "train.log_every=1",
    )
    summary = Trainer(cfg, tmp_path / "run", progress=False).fit()
    assert summary["steps"] == 2 and summary["eval_protocol"] == "center_crop"
    assert len(summary["per_class_iou"]) == 21
    assert summary["val_miou"] == pytest.approx(sum(summary["per_class_iou"]) / 21)
