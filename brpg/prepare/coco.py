"""COCO 2017 preparation (appendix: data): 81-class semantic masks from the instance annotations.

Inputs, in ``--archives`` (default ``DATA_ROOT/archives``), from http://images.cocodataset.org:
``train2017.zip``, ``val2017.zip`` and ``annotations_trainval2017.zip`` (which holds
``annotations/instances_{train,val}2017.json``).

Output, in ``DATA_ROOT/coco``: ``train2017/``, ``val2017/``, ``annotations/instances_*.json`` and
``masks/<12-digit id>.png`` for every train and val image, as the split lines
``train2017/000000000009.jpg masks/000000000009.png`` expect. Mask values:

- 0 background, and 1..80 for the 80 thing categories in ascending category-id order (COCO ids
  1..90 with ten gaps, so id 1 (person) -> 1, ..., id 90 (toothbrush) -> 80);
- **overlaps**: instances are painted from the largest to the smallest COCO ``area`` (ties: by
  annotation id), so where two instances overlap the *smaller* one wins;
- **crowd** regions (``iscrowd=1``) are painted first, with 255 (ignore) by default; individual
  instances painted afterwards win over them. ``crowd="category"`` paints crowds with their class
  instead, which keeps 255 out of the masks (the official BRPG COCO sampling path crashes on 255,
  appendix Q15).

The masks the BRPG README links to (a Google-Drive archive from UniMatch) cannot be downloaded
here, so equality with them has not been checked; other codebases may order overlaps or treat
crowds differently. The COCO unlabeled split lists are derived as train2017 minus labeled.
"""

from __future__ import annotations

import argparse
import json
import logging
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brpg.prepare import (
    base,
    bookkeeping,
    checksums,
    cli,
    downloads,
    extraction,
    label_png,
    parallel,
)
from brpg.prepare.base import IGNORE_LABEL, Archive, PrepareError
from brpg.prepare.bookkeeping import Markers
from brpg.prepare.splits import (
    TRAIN_POOL,
    check_split_lists,
    derive_coco_unlabeled,
    expected_count_warnings,
)

log = logging.getLogger("brpg.prepare")

_MD5_SOURCE = (
    "community-sourced: cocodataset.org publishes no checksums; these MD5s are the ones used by "
    "PaddleDetection (ppdet/utils/download.py) and other downloaders"
)
TRAIN_ARCHIVE = Archive(
    "train2017.zip",
    "http://images.cocodataset.org/zips/train2017.zip",
    md5="cced6f7f71b7629ddf16f17bbcfab6b2",
    checksum_source=_MD5_SOURCE,
    size_hint="18 GB",
)
VAL_ARCHIVE = Archive(
    "val2017.zip",
    "http://images.cocodataset.org/zips/val2017.zip",
    md5="442b8da7639aecaf257c1dceb8ba8c80",
    checksum_source=_MD5_SOURCE,
    size_hint="778 MB",
)
ANNOTATIONS_ARCHIVE = Archive(
    "annotations_trainval2017.zip",
    "http://images.cocodataset.org/annotations/annotations_trainval2017.zip",
    md5="f4bbac642086de4f52a3fdda2de5fa2c",
    checksum_source=_MD5_SOURCE,
    size_hint="241 MB",
)
ARCHIVES = (ANNOTATIONS_ARCHIVE, TRAIN_ARCHIVE, VAL_ARCHIVE)

#: The 80 COCO "thing" category ids (1..90 without 12, 26, 29, 30, 45, 66, 68, 69, 71, 83).
COCO_THING_IDS: tuple[int, ...] = tuple(
    i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)
)
#: Category id -> contiguous mask value 1..80 (0 is background).
CATEGORY_TO_INDEX: dict[int, int] = {cid: k + 1 for k, cid in enumerate(COCO_THING_IDS)}
NUM_CLASSES = 81
SPLITS = ("train2017", "val2017")
EXPECTED_IMAGES = {"train2017": TRAIN_POOL["coco"], "val2017": 5000}
CROWD_MODES = ("ignore", "category")

ALLOWED = np.zeros(256, dtype=bool)
ALLOWED[:NUM_CLASSES] = True
ALLOWED[IGNORE_LABEL] = True


@dataclass(frozen=True)
class MaskTask:
    """Render the mask of one image: ``anns`` are ``(index, iscrowd, area, id, segmentation)``."""

    image: str
    out: str
    height: int
    width: int
    anns: tuple[tuple[int, int, float, int, Any], ...]
    crowd: str
    annotation_file: str
    force: bool


def decode_segmentation(segmentation: Any, height: int, width: int) -> np.ndarray:
    """Binary ``HxW`` mask of a COCO segmentation (polygons, uncompressed or compressed RLE)."""
    try:
        from pycocotools import mask as mask_utils
    except ImportError as exc:
        raise PrepareError(
            "pycocotools is needed to render COCO masks: pip install 'brpg[coco]'"
        ) from exc

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            return np.zeros((height, width), dtype=np.uint8)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():  # pycocotools vs NumPy 2 `copy=` deprecation, harmless
        warnings.simplefilter("ignore", DeprecationWarning)
        return mask_utils.decode(rle)


def render_mask(
    height: int, width: int, anns: tuple[tuple[int, int, float, int, Any], ...], crowd: str
) -> np.ndarray:
    """Paint one semantic mask: crowds first, then instances from the largest to the smallest."""
    mask = np.zeros((height, width), dtype=np.uint8)
    crowds = [a for a in anns if a[1]]
    things = sorted((a for a in anns if not a[1]), key=lambda a: (-a[2], a[3]))
    for index, _, _, _, segmentation in crowds:
        value = IGNORE_LABEL if crowd == "ignore" else index
        mask[decode_segmentation(segmentation, height, width) > 0] = value
    for index, _, _, _, segmentation in things:
        mask[decode_segmentation(segmentation, height, width) > 0] = index
    return mask


def convert_mask(task: MaskTask) -> np.ndarray:
    """Write one mask PNG (or re-check an existing one); return its histogram."""
    out = Path(task.out)
    if out.is_file() and not task.force:
        mask = label_png.read_label_png(out)
        label_png.check_label_values(mask, ALLOWED, out, "delete it and re-run with --force")
        source = str(out)
    else:
        mask = render_mask(task.height, task.width, task.anns, task.crowd)
        source = f"the size {task.width}x{task.height} given in {task.annotation_file}"
    label_png.check_same_size(Path(task.image), (mask.shape[1], mask.shape[0]), source)
    if not out.is_file() or task.force:
        label_png.save_label_png(out, mask)
    return label_png.label_histogram(mask)


def load_instances(path: Path) -> dict[str, Any]:
    """Load an ``instances_*.json`` and check that it has the 80 COCO thing categories."""
    try:
        data = json.loads(Path(path).read_text())
        ids = sorted(c["id"] for c in data["categories"])
        data["images"], data["annotations"]  # noqa: B018 - presence check
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PrepareError(
            f"cannot read COCO annotations {path} ({type(exc).__name__}: {exc}); download "
            "annotations_trainval2017.zip again"
        ) from exc
    if tuple(ids) != COCO_THING_IDS:
        raise PrepareError(
            f"{path} has {len(ids)} categories, not the 80 COCO thing categories: it is not an "
            "instances_*2017.json (stuff or panoptic annotations?); use "
            "annotations_trainval2017.zip"
        )
    return data


def _tasks(
    root: Path, split: str, data: dict[str, Any], crowd: str, ann_file: Path, force: bool
) -> list[MaskTask]:
    by_image: dict[int, list[tuple[int, int, float, int, Any]]] = defaultdict(list)
    for ann in data["annotations"]:
        index = CATEGORY_TO_INDEX.get(ann["category_id"])
        if index is None:
            raise PrepareError(
                f"annotation {ann.get('id')} in {ann_file} has category_id "
                f"{ann['category_id']}, outside the 80 COCO classes; download the annotations again"
            )
        by_image[ann["image_id"]].append(
            (
                index,
                int(ann.get("iscrowd", 0)),
                float(ann.get("area", 0.0)),
                ann["id"],
                ann["segmentation"],
            )
        )
    present = bookkeeping.list_files(root / split, ".jpg")
    tasks = []
    for image in sorted(data["images"], key=lambda im: im["file_name"]):
        name = image["file_name"]
        if name not in present:
            raise PrepareError(
                f"{ann_file} lists image {name} but {root / split / name} does not exist: "
                f"{split}.zip is incomplete; download it again and re-run with --force"
            )
        stem = name.rsplit(".", 1)[0]
        tasks.append(
            MaskTask(
                image=str(root / split / name),
                out=str(root / "masks" / f"{stem}.png"),
                height=int(image["height"]),
                width=int(image["width"]),
                anns=tuple(by_image.get(image["id"], ())),
                crowd=crowd,
                annotation_file=str(ann_file),
                force=force,
            )
        )
    return tasks


def _convert_split(
    root: Path, split: str, *, crowd: str, workers: int, progress: bool, force: bool
) -> dict[str, Any]:
    ann_file = root / "annotations" / f"instances_{split}.json"
    data = load_instances(ann_file)
    tasks = _tasks(root, split, data, crowd, ann_file, force)
    del data
    hist = np.zeros(256, np.int64)
    for h in parallel.parallel_map(
        convert_mask, tasks, workers=workers, desc=f"masks {split}", progress=progress
    ):
        hist += h
    return {
        "stems": sorted(Path(t.out).stem for t in tasks),
        "label_histogram": label_png.histogram_dict(hist),
    }


def build_report(
    data_root: Path, convert_info: dict[str, Any], *, check_counts: bool = True
) -> dict[str, Any]:
    """Validation report: images/masks per split, missing/extra files, split lists, histograms."""
    root = data_root / "coco"
    masks = {Path(p).stem for p in bookkeeping.list_files(root / "masks", ".png")}
    errors: list[str] = []
    warnings: list[str] = []
    sets = {}
    expected_masks: set[str] = set()
    extra_images: dict[str, list[str]] = {}
    images_by_split: dict[str, set[str]] = {}
    for split in SPLITS:
        images = {Path(p).stem for p in bookkeeping.list_files(root / split, ".jpg")}
        images_by_split[split] = images
        annotated = set(convert_info.get("images", {}).get(split, []))
        expected_masks |= annotated
        errors += [
            f"{root / 'masks' / (s + '.png')} is missing; re-run with --force"
            for s in sorted(annotated - masks)
        ]
        extra_images[split] = sorted(images - annotated)
        sets[split] = {"images": len(images & annotated), "masks": len(annotated & masks)}
        if check_counts and len(images) != EXPECTED_IMAGES[split]:
            warnings.append(f"{split} has {len(images)} images, expected {EXPECTED_IMAGES[split]}")
    split_dir = data_root / "splits" / "coco"
    splits: dict[str, Any] = {}
    if (split_dir / "val.txt").is_file():
        train_names = [f"{s}.jpg" for s in convert_info.get("images", {}).get("train2017", [])]
        try:
            unlabeled = derive_coco_unlabeled(
                split_dir,
                train_names,
                expected_train=EXPECTED_IMAGES["train2017"] if check_counts else None,
            )
        except PrepareError as exc:  # in the report, not instead of it
            errors.append(f"cannot derive the unlabeled lists: {exc}")
            unlabeled = {}
        known = {f"{split}/{stem}.jpg" for split in SPLITS for stem in images_by_split[split]}
        known |= {f"masks/{stem}.png" for stem in masks}
        splits, split_errors = check_split_lists(
            split_dir,
            lambda line: [root / part for part in line.split()],
            lambda path: path.relative_to(root).as_posix() in known,
        )
        errors += split_errors
        if check_counts:
            warnings += expected_count_warnings("coco", splits)
        for name, count in unlabeled.items():
            splits[name]["unlabeled_derived"] = count
    else:
        warnings.append(
            f"no split lists in {split_dir}: run data_scripts/fetch_splits.py, then re-run this "
            "script to check them and derive the unlabeled lists"
        )
    return {
        "dataset": "coco",
        "root": str(root),
        "overlap_rule": "instances painted largest-first: the smaller instance wins an overlap",
        "crowd": convert_info.get("crowd"),
        "sets": sets,
        "splits": splits,
        "label_histogram": convert_info.get("label_histogram", {}),
        "extra": {
            "masks_without_image": sorted(masks - expected_masks),
            "images_without_annotation_entry": extra_images,
        },
        "warnings": warnings,
        "errors": errors,
    }


def _select(prefixes: dict[str, str]) -> extraction.Selector:
    def select(name: str) -> str | None:
        for prefix, suffix in prefixes.items():
            if name.startswith(prefix) and name.endswith(suffix) and name.count("/") == 1:
                return name
        return None

    return select


def mask_files(root: Path) -> list[str]:
    """The mask PNGs under ``root`` (``DATA_ROOT/coco``), relative to it."""
    return sorted(f"masks/{rel}" for rel in bookkeeping.list_files(root / "masks", ".png"))


@bookkeeping.reports_failure("coco")
def prepare_coco(
    data_root: Path,
    archives_dir: Path | None = None,
    *,
    download: bool = False,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    verify: bool = True,
    crowd: str = "ignore",
    check_counts: bool = True,
    archives: tuple[Archive, Archive, Archive] = ARCHIVES,
) -> dict[str, Any]:
    """Build ``DATA_ROOT/coco`` (images, annotations, ``masks/``) and derive the unlabeled lists.

    ``archives`` is (annotations, train2017, val2017). Returns the validation report; raises
    :class:`PrepareError` on bad input.
    """
    if crowd not in CROWD_MODES:
        raise PrepareError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
    data_root = Path(data_root)
    archives_dir = Path(archives_dir) if archives_dir else data_root / "archives"
    workers = workers or base.default_workers()
    markers = Markers(data_root, "coco")
    rerender = force
    if force:
        markers.clear()
    elif markers.info("convert-started").get("crowd", crowd) != crowd:
        log.info("crowd mode changed to %r: re-rendering the masks", crowd)
        markers.clear("convert")
        rerender = True
    root = data_root / "coco"
    selects = {
        "annotations": _select({"annotations/instances_": "2017.json"}),
        "train2017": _select({"train2017/": ".jpg"}),
        "val2017": _select({"val2017/": ".jpg"}),
    }
    converted_now = not markers.done("convert")
    if converted_now:
        for archive, key in zip(archives, ("annotations", "train2017", "val2017"), strict=True):
            step = f"extract-{key}"
            if markers.done(step):
                continue
            path = downloads.obtain_archive(
                archives_dir, archive, fetch=download, progress=progress
            )
            if verify:
                checksums.verify_archive(path, archive, data_root, progress=progress)
            n = extraction.extract(
                path, root, selects[key], workers=workers, progress=progress, overwrite=force
            )
            if n == 0:
                raise PrepareError(
                    f"{path} holds none of the expected files ({key}/...): it is not "
                    f"{archive.filename}; download it again"
                )
            markers.mark(step, archive=str(path), files=n)
        markers.mark("convert-started", crowd=crowd)
        info: dict[str, Any] = {"crowd": crowd, "images": {}, "label_histogram": {}}
        for split in SPLITS:
            result = _convert_split(
                root, split, crowd=crowd, workers=workers, progress=progress, force=rerender
            )
            info["images"][split] = result["stems"]
            info["label_histogram"][split] = result["label_histogram"]
        markers.mark("convert", **info)
    report = build_report(data_root, markers.info("convert"), check_counts=check_counts)
    return bookkeeping.finish_labels(
        report, markers, root, mask_files(root), ALLOWED, converted_now, workers, progress
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``data_scripts/prepare_coco.py``."""
    parser = argparse.ArgumentParser(
        description="Prepare COCO 2017: DATA_ROOT/coco/{train2017,val2017,masks} with 81-class "
        "semantic masks (0 background, 1..80 things in category-id order), and the derived "
        "unlabeled split lists.",
        epilog="Overlaps: the smaller instance wins. Crowd regions: 255 (ignore) unless "
        "--crowd category.",
    )
    cli.add_common_arguments(parser)
    parser.add_argument(
        "--crowd",
        choices=CROWD_MODES,
        default="ignore",
        help="label of crowd regions: 255 (ignore, default) or the crowd's category",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``data_scripts/prepare_coco.py``."""
    args = build_parser().parse_args(argv)
    return prepare_coco(args.data_root, args.archives, crowd=args.crowd, **cli.common_options(args))
