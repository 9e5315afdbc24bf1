"""The three real benchmarks as data, and their datasets (appendix: data, evaluation,
configurations).

PASCAL VOC 2012 (``data.name: pascal``), Cityscapes (``cityscapes``) and COCO 2017 (``coco``)
are described by one :class:`Benchmark` each in :data:`BENCHMARKS`: class names and colours,
dataset sizes, the published split folders and their labeled counts, how a split line becomes
an image path and a mask path, the crop sizes and the evaluation protocols. The presets in
``brpg/configs/{voc,cityscapes,coco}_*.yaml`` copy these numbers; the book's chapter 9
explains them.

Layout. ``data.root`` is the ``DATA_ROOT`` that ``data_scripts/`` fills (``data/`` by default):
images and masks live in ``DATA_ROOT/<Benchmark.folder>`` (``VOC2012``, ``cityscapes``,
``coco``) and the split lists in ``DATA_ROOT/splits/<name>/<split>/{labeled,unlabeled}.txt`` and
``DATA_ROOT/splits/<name>/val.txt``; ``data.*_split`` are relative to ``DATA_ROOT``. A relative
``data.root`` is used as given here (relative to the current directory);
:func:`brpg.data.build.build_datasets` first resolves it against the checkout.

Padding label. Crops that are larger than the (rescaled) image pad the mask with
``data.pad_label``: 255 (ignored) by default. The official code pads with 0 (appendix Q6), which
trains and scores padded pixels as background (VOC, COCO) or road (Cityscapes);
``data.pad_label: 0`` is the ``faithful`` switch that reproduces it, also in the centre-cropped
validation of VOC and COCO.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from brpg.config import Config, ConfigError
from brpg.data.digits import PALETTE as VOC_PALETTE
from brpg.data.splitlist import DatasetError, PathTemplate, SplitListDataset
from brpg.data.transforms import SegTransform, build_eval_transform, build_train_transform
from brpg.prepare.cityscapes import image_to_label
from brpg.prepare.splits import (
    LABELED_COUNTS,
    PASCAL_BLENDED,
    PASCAL_CLASSIC,
    TRAIN_POOL,
    VAL_COUNTS,
)

__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "DataNotPreparedError",
    "EvalProtocol",
    "build_benchmark_datasets",
    "cityscapes_label_path",
    "coco_mask_of",
    "eval_transform",
    "get_benchmark",
    "labeled_dataset",
    "sliding_stride",
    "unlabeled_dataset",
    "val_dataset",
    "voc_palette",
]


class DataNotPreparedError(DatasetError, FileNotFoundError):
    """A benchmark's prepared folder or split list is missing; the message names the script."""


def voc_palette(n: int = 256) -> tuple[tuple[int, int, int], ...]:
    """The first ``n`` colours of the PASCAL VOC colour map (class 1 is (128, 0, 0), 15
    "person" (192, 128, 128), 255 the (224, 224, 192) of the object borders)."""
    return tuple((int(r), int(g), int(b)) for r, g, b in VOC_PALETTE[:n].tolist())


def sliding_stride(crop_size: int) -> int:
    """The official sliding-window stride, ``ceil(2/3 · crop)`` (769 -> 513, appendix: evaluation)."""
    return math.ceil(crop_size * 2 / 3)


@dataclass(frozen=True)
class EvalProtocol:
    """One way of scoring a model (the fields of :class:`brpg.config.EvalConfig`)."""

    protocol: str  # center_crop | full | sliding (brpg.engine.inference.PROTOCOLS)
    crop_size: int = 0  # center_crop: the crop; sliding: the window
    stride: int = 0  # sliding only
    where: str = ""  # where the official code uses it


@dataclass(frozen=True)
class Benchmark:
    """Everything about one real benchmark that is data rather than code."""

    name: str  # data.name
    title: str
    folder: str  # the prepared folder under DATA_ROOT
    subfolders: tuple[str, ...]  # that a prepared folder must hold
    num_classes: int
    class_names: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]  # RGB per class index
    train_size: int  # the training pool that labeled + unlabeled split
    val_size: int
    image_size: str  # typical image size, for the reader
    splits: dict[str, dict[str, int]]  # setting -> {split folder: labeled images}
    image_tpl: PathTemplate  # split line -> image path (relative to the prepared folder)
    mask_tpl: PathTemplate  # split line -> mask path, for one-token lines
    train_crop: int  # labeled random crop
    unlabeled_crop: int  # hard-coded crop of the official unlabeled pipeline (appendix: data)
    in_training_eval: EvalProtocol  # the official validation during training (appendix: data)
    offline_eval: EvalProtocol  # the official eval.py (appendix: evaluation)
    paper_eval: str  # "in_training" | "offline": which one the published numbers come from
    ignore_colour: tuple[int, int, int] = (224, 224, 192)  # of label 255 (and unknown values)

    @property
    def prepare_script(self) -> str:
        return f"data_scripts/prepare_{self.name}.py"

    @property
    def split_sizes(self) -> dict[str, int]:
        """Every published split folder and its labeled count, over all settings."""
        return {k: v for setting in self.splits.values() for k, v in setting.items()}

    def setting_of(self, split: str) -> str:
        """The protocol a split folder belongs to (``classic``, ``blended``, ...)."""
        for setting, sizes in self.splits.items():
            if split in sizes:
                return setting
        raise KeyError(f"{self.name} has no split {split!r}; published: {list(self.split_sizes)}")

    def labeled_split(self, split: str) -> str:
        """``data.labeled_split`` of a published split folder (relative to DATA_ROOT)."""
        return f"splits/{self.name}/{split}/labeled.txt"

    def unlabeled_split(self, split: str) -> str:
        return f"splits/{self.name}/{split}/unlabeled.txt"

    @property
    def val_split(self) -> str:
        return f"splits/{self.name}/val.txt"

    def colorize(self, mask: Any) -> np.ndarray:
        """Class-index mask ``[..., H, W]`` (numpy or torch) -> uint8 RGB ``[..., H, W, 3]``."""
        if hasattr(mask, "detach"):
            mask = mask.detach().cpu().numpy()
        lut = np.tile(np.array(self.ignore_colour, np.uint8), (256, 1))
        lut[: self.num_classes] = self.palette
        return lut[np.asarray(mask).astype(np.intp).clip(0, 255)]

    @property
    def default_eval(self) -> EvalProtocol:
        """The protocol behind the published numbers: the presets' ``eval`` section."""
        return self.in_training_eval if self.paper_eval == "in_training" else self.offline_eval


VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat",
    "chair", "cow", "diningtable", "dog", "horse", "motorbike", "person", "pottedplant",
    "sheep", "sofa", "train", "tvmonitor",
)  # fmt: skip

CITYSCAPES_CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)  # fmt: skip

#: The official colours of the 19 Cityscapes train ids (cityscapesScripts' label table).
CITYSCAPES_PALETTE = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

#: Background, then the 80 COCO thing classes in ascending category-id order (mask values 1..80,
#: as brpg.prepare.coco writes them).
COCO_CLASSES = (
    "background", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck",
    "boat", "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote",
    "keyboard", "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book",
    "clock", "vase", "scissors", "teddy bear", "hair drier", "toothbrush",
)  # fmt: skip


def cityscapes_label_path(image_rel: str) -> str:
    """``leftImg8bit/<split>/<city>/<x>_leftImg8bit.png`` -> its ``gtFine/..._labelTrainIds.png``."""
    parts = image_rel.split("/")
    if len(parts) != 4 or parts[0] != "leftImg8bit" or not parts[3].endswith("_leftImg8bit.png"):
        raise DatasetError(
            f"{image_rel!r} is not a Cityscapes split line (leftImg8bit/<split>/<city>/"
            "<name>_leftImg8bit.png): use the published lists (data_scripts/fetch_splits.py)"
        )
    return image_to_label(image_rel)


def coco_mask_of(image_rel: str) -> str:
    """``train2017/<n>.jpg`` -> ``masks/<n>.png`` (for one-column COCO lists)."""
    return f"masks/{Path(image_rel).stem}.png"


def _sizes(dataset: str, names: tuple[str, ...]) -> dict[str, int]:
    return {name: LABELED_COUNTS[dataset][name] for name in names}


PASCAL = Benchmark(
    name="pascal",
    title="PASCAL VOC 2012 + SBD",
    folder="VOC2012",
    subfolders=("JPEGImages", "SegmentationClassAug"),
    num_classes=21,
    class_names=VOC_CLASSES,
    palette=voc_palette(21),
    train_size=TRAIN_POOL["pascal"],
    val_size=VAL_COUNTS["pascal"],
    image_size="≤ 500×500",
    splits={
        "classic": _sizes("pascal", PASCAL_CLASSIC),
        "blended": _sizes("pascal", PASCAL_BLENDED),
    },
    image_tpl="JPEGImages/{id}.jpg",
    mask_tpl="SegmentationClassAug/{id}.png",
    train_crop=513,
    unlabeled_crop=513,
    in_training_eval=EvalProtocol("center_crop", 513, 0, "validate() during training"),
    offline_eval=EvalProtocol("full", 0, 0, "eval.py: predictions only, no mIoU (appendix Q8)"),
    paper_eval="in_training",
)

CITYSCAPES = Benchmark(
    name="cityscapes",
    title="Cityscapes (fine annotations)",
    folder="cityscapes",
    subfolders=("leftImg8bit", "gtFine"),
    num_classes=19,
    class_names=CITYSCAPES_CLASSES,
    palette=CITYSCAPES_PALETTE,
    train_size=TRAIN_POOL["cityscapes"],
    val_size=VAL_COUNTS["cityscapes"],
    image_size="2048×1024",
    splits={"fine": _sizes("cityscapes", ("186", "372", "744", "1488"))},
    image_tpl="{id}",
    mask_tpl=cityscapes_label_path,
    train_crop=769,
    unlabeled_crop=769,
    in_training_eval=EvalProtocol("center_crop", 769, 0, "validate() during training"),
    offline_eval=EvalProtocol(
        "sliding",
        769,
        sliding_stride(769),
        "eval.py: full 2048×1024 images, window logits averaged",
    ),
    paper_eval="offline",
    ignore_colour=(0, 0, 0),  # cityscapesScripts colours unlabeled pixels black
)

COCO = Benchmark(
    name="coco",
    title="COCO 2017 (80 thing classes + background)",
    folder="coco",
    subfolders=("train2017", "val2017", "masks"),
    num_classes=81,
    class_names=COCO_CLASSES,
    palette=voc_palette(81),
    train_size=TRAIN_POOL["coco"],
    val_size=VAL_COUNTS["coco"],
    image_size="≤ 640×640",
    splits={"fraction": _sizes("coco", ("1_128", "1_64", "1_32", "1_16"))},
    image_tpl="{id}",
    mask_tpl=coco_mask_of,
    train_crop=513,
    unlabeled_crop=513,
    in_training_eval=EvalProtocol("center_crop", 641, 0, "validate() during training"),
    offline_eval=EvalProtocol("full", 0, 0, "eval.py: predictions only, no mIoU (appendix Q8)"),
    paper_eval="in_training",
)

BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in (PASCAL, CITYSCAPES, COCO)}


def get_benchmark(name: str) -> Benchmark:
    """The :class:`Benchmark` called ``name`` (a ``data.name``)."""
    if name not in BENCHMARKS:
        raise ConfigError(
            f"data.name={name!r} is not a real benchmark; valid: {', '.join(BENCHMARKS)}"
        )
    return BENCHMARKS[name]


# --------------------------------------------------------------------------- datasets


def _checked(cfg: Config) -> tuple[Benchmark, Path, Path]:
    """``(benchmark, DATA_ROOT, prepared folder)`` after checking the config and the folder."""
    d = cfg.data
    bench = get_benchmark(d.name)
    if d.num_classes != bench.num_classes:
        raise ConfigError(
            f"data.num_classes={d.num_classes} but {bench.title} has {bench.num_classes} classes;"
            f" set data.num_classes={bench.num_classes}"
        )
    data_root = Path(d.root).expanduser()
    folder = data_root / bench.folder
    missing = [s for s in bench.subfolders if not (folder / s).is_dir()]
    if missing:
        what = "does not exist" if not folder.is_dir() else f"lacks {', '.join(missing)}/"
        raise DataNotPreparedError(
            f"{bench.title} is not prepared: {folder} {what}. Run `python "
            f"{bench.prepare_script} --data-root {data_root}` (see data_scripts/README.md), or "
            f"set data.root to the DATA_ROOT that holds {bench.folder}/"
        )
    return bench, data_root, folder


def _split_file(data_root: Path, rel: str, bench: Benchmark, key: str) -> Path:
    path = Path(rel).expanduser()
    path = path if path.is_absolute() else data_root / path
    if not path.is_file():
        if bench.name == "coco" and key == "unlabeled_split":
            fix = f"`python {bench.prepare_script}` derives the COCO unlabeled lists"
        else:
            fix = "`python data_scripts/fetch_splits.py` downloads the published lists"
        raise DataNotPreparedError(
            f"data.{key}: split list {path} does not exist. {fix}, or point data.{key} at a "
            f"list relative to data.root ({data_root})"
        )
    return path


def _dataset(
    cfg: Config, key: str, transform: SegTransform, with_mask: bool = True
) -> SplitListDataset:
    bench, data_root, folder = _checked(cfg)
    return SplitListDataset(
        folder,
        _split_file(data_root, getattr(cfg.data, key), bench, key),
        image_tpl=bench.image_tpl,
        mask_tpl=bench.mask_tpl,
        transform=transform,
        num_classes=bench.num_classes,
        with_mask=with_mask,
        validate=True,
    )


def eval_transform(cfg: Config) -> SegTransform:
    """Normalisation, plus the padded centre crop of ``cfg.eval`` when the protocol is
    ``center_crop`` (the mask is padded with ``data.pad_label``)."""
    crop = cfg.eval.crop_size if cfg.eval.protocol == "center_crop" else None
    return build_eval_transform(cfg.data, crop_size=crop)


def labeled_dataset(cfg: Config, transform: SegTransform | None = None) -> SplitListDataset:
    """The labeled list ``data.labeled_split`` with the labeled augmentation (appendix: data)."""
    return _dataset(cfg, "labeled_split", transform or build_train_transform(cfg.data))


def unlabeled_dataset(cfg: Config, transform: SegTransform | None = None) -> SplitListDataset:
    """The unlabeled list ``data.unlabeled_split``, images only.

    The default transform is the labeled one; the semi-supervised trainer passes its own
    weak/strong pipeline (appendix: data).
    """
    t = transform or build_train_transform(cfg.data)
    return _dataset(cfg, "unlabeled_split", t, with_mask=False)


def val_dataset(cfg: Config, transform: SegTransform | None = None) -> SplitListDataset:
    """The val list under ``cfg.eval``'s protocol (appendix: evaluation).

    ``full`` and ``sliding`` keep every image at its own size, so images of different sizes
    (VOC, COCO) need ``eval.batch_size: 1``; this is checked here, not after hours of training.
    """
    _checked(cfg)
    if (
        cfg.eval.protocol != "center_crop"
        and cfg.eval.batch_size > 1
        and cfg.data.name != "cityscapes"
    ):
        raise ConfigError(
            f"eval.protocol={cfg.eval.protocol} keeps {cfg.data.name} images at their own sizes, "
            f"which differ, so they cannot be batched: set eval.batch_size=1 (it is "
            f"{cfg.eval.batch_size})"
        )
    return _dataset(cfg, "val_split", transform or eval_transform(cfg))


def build_benchmark_datasets(cfg: Config) -> tuple[Dataset, Dataset, Dataset]:
    """``(labeled, unlabeled, val)`` :class:`SplitListDataset` s of ``cfg.data.name``.

    Every listed file is checked at construction (``validate=True``); mask values outside
    ``[0, num_classes)`` other than 255 raise :class:`DatasetError` when the mask is read. A
    missing prepared folder or split list raises :class:`DataNotPreparedError` naming the
    ``data_scripts/`` command that makes it.
    """
    return labeled_dataset(cfg), unlabeled_dataset(cfg), val_dataset(cfg)
