"""PASCAL VOC 2012 + SBD ("VOC aug") preparation (appendix: data).

Inputs, in ``--archives`` (default ``DATA_ROOT/archives``):

- ``VOCtrainval_11-May-2012.tar``: ``VOCdevkit/VOC2012/{JPEGImages,SegmentationClass,
  ImageSets/Segmentation}``;
- ``benchmark.tgz`` (SBD): ``benchmark_RELEASE/dataset/{img,cls,inst}``, ``train.txt``,
  ``val.txt``; ``cls/<id>.mat`` holds a struct ``GTcls`` whose field ``Segmentation`` is the
  ``HxW`` uint8 label map.

Output, in ``DATA_ROOT/VOC2012``:

- ``JPEGImages/<id>.jpg`` (all VOC images, plus any SBD image VOC lacks);
- ``SegmentationClassAug/<id>.png``: palette PNGs with values 0-20 and 255 (ignore), for every
  id of train_aug and val. An id that VOC annotates gets VOC's own mask (with its 255 object
  borders); the others get the SBD mask converted from ``.mat``;
- ``ImageSets/Segmentation/{train,val,train_aug}.txt``, where
  ``train_aug = (VOC train ∪ SBD train ∪ SBD val) − VOC val`` (10,582 ids). The classic splits
  draw their labeled ids from VOC train (1,464), the blended ones from train_aug;
- ``DATA_ROOT/reports/pascal.json``: the validation report.

SBD is extracted to ``DATA_ROOT/.prepare/staging/sbd`` and removed once converted (keep it with
``--keep-staging``).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from brpg.prepare import (
    atomic,
    base,
    bookkeeping,
    checksums,
    cli,
    downloads,
    extraction,
    label_png,
    parallel,
)
from brpg.prepare.base import IGNORE_LABEL, STATE_DIRNAME, Archive, PrepareError
from brpg.prepare.bookkeeping import Markers
from brpg.prepare.splits import (
    PASCAL_BLENDED,
    PASCAL_CLASSIC,
    check_split_lists,
    expected_count_warnings,
    read_lines,
    read_splits,
)

log = logging.getLogger("brpg.prepare")

VOC_ARCHIVE = Archive(
    filename="VOCtrainval_11-May-2012.tar",
    url="http://host.robots.ox.ac.uk/pascal/VOC/voc2012/VOCtrainval_11-May-2012.tar",
    md5="6cd6e144f989b92b3379bac3b3de84fd",
    checksum_source="torchvision.datasets.voc DATASET_YEAR_DICT['2012']['md5']",
    size_hint="1.9 GB",
)
SBD_ARCHIVE = Archive(
    filename="benchmark.tgz",
    url="http://www.eecs.berkeley.edu/Research/Projects/CS/vision/grouping/semantic_contours/"
    "benchmark.tgz",
    md5="82b4d87ceb2ed10f6038a1cba92111cb",
    checksum_source="torchvision.datasets.SBDataset.md5",
    size_hint="1.4 GB",
)

NUM_CLASSES = 21
VOC_PREFIX = "VOCdevkit/VOC2012/"
SBD_PREFIX = "benchmark_RELEASE/dataset/"
#: Sizes of the official lists; a difference is reported as a warning.
EXPECTED = {"voc_train": 1464, "val": 1449, "sbd_train": 8498, "sbd_val": 2857, "train_aug": 10582}

#: allowed[v] is True for the label values a VOC mask may hold: classes 0-20 and 255 (ignore).
ALLOWED = np.zeros(256, dtype=bool)
ALLOWED[:NUM_CLASSES] = True
ALLOWED[IGNORE_LABEL] = True


def _select_voc(name: str) -> str | None:
    """Map a VOC tar member to its path under ``DATA_ROOT/VOC2012`` (or skip it)."""
    if not name.startswith(VOC_PREFIX):
        return None
    rel = name[len(VOC_PREFIX) :]
    wanted = (
        (rel.startswith("JPEGImages/") and rel.endswith(".jpg"))
        or (rel.startswith("SegmentationClass/") and rel.endswith(".png"))
        or (rel.startswith("ImageSets/Segmentation/") and rel.endswith(".txt"))
    )
    return rel if wanted else None


def _select_sbd(name: str) -> str | None:
    """Map an SBD tgz member to its path under the staging folder (or skip it)."""
    if not name.startswith(SBD_PREFIX):
        return None
    rel = name[len(SBD_PREFIX) :]
    wanted = (
        rel in ("train.txt", "val.txt")
        or (rel.startswith("cls/") and rel.endswith(".mat"))
        or (rel.startswith("img/") and rel.endswith(".jpg"))
    )
    return rel if wanted else None


def load_sbd_mask(path: Path) -> np.ndarray:
    """Read the ``GTcls.Segmentation`` label map of an SBD ``cls/*.mat`` file as uint8."""
    import scipy.io  # slow to import: only when converting, not for --help

    try:
        mat = scipy.io.loadmat(str(path), squeeze_me=True, struct_as_record=False)
        seg = np.asarray(mat["GTcls"].Segmentation)
    except (KeyError, AttributeError, ValueError, OSError, TypeError) as exc:
        raise PrepareError(
            f"cannot read SBD mask {path} ({type(exc).__name__}: {exc}); expected a MATLAB file "
            "with struct GTcls and field Segmentation. Download benchmark.tgz again"
        ) from exc
    if seg.ndim != 2:
        raise PrepareError(f"SBD mask {path} is not a 2-D label map (shape {seg.shape})")
    if seg.min() < 0 or seg.max() > 255:
        raise PrepareError(
            f"{path} holds label values outside 0..255; download benchmark.tgz again"
        )
    return seg.astype(np.uint8)


@dataclass(frozen=True)
class MaskTask:
    """Produce ``out`` (a SegmentationClassAug PNG) from ``src`` (VOC PNG or SBD .mat)."""

    src: str
    kind: str  # "voc" or "sbd"
    image: str
    out: str
    force: bool


_FIX = "the archive is not the official release or is corrupt: download it again"


def convert_mask(task: MaskTask) -> np.ndarray:
    """Write one SegmentationClassAug mask (or re-check an existing one); return its histogram."""
    out = Path(task.out)
    if out.is_file() and not task.force:
        label = label_png.read_label_png(out)
        source: Path = out
    else:
        source = Path(task.src)
        label = label_png.read_label_png(source) if task.kind == "voc" else load_sbd_mask(source)
    label_png.check_label_values(label, ALLOWED, source, _FIX)
    label_png.check_same_size(Path(task.image), (label.shape[1], label.shape[0]), source)
    if source != out:
        label_png.save_label_png(out, label)
    return label_png.label_histogram(label)


def _read_required(path: Path, archive: Path) -> list[str]:
    if not path.is_file():
        raise PrepareError(
            f"{archive} did not contain {path.name} (looked for {path}): it is not the expected "
            "package; download it again"
        )
    return read_lines(path)


def _build_tasks(
    voc_root: Path, staging: Path, train_aug: list[str], val: list[str], force: bool
) -> list[MaskTask]:
    voc_masks = voc_root / "SegmentationClass"
    tasks = []
    for image_id in train_aug + val:
        image = voc_root / "JPEGImages" / f"{image_id}.jpg"
        if not image.is_file():
            sbd_image = staging / "img" / f"{image_id}.jpg"
            if not sbd_image.is_file():
                raise PrepareError(
                    f"image {image_id}.jpg is in neither {image.parent} nor {sbd_image.parent}; "
                    "the archives are incomplete: download them again and re-run with --force"
                )
            atomic.atomic_write_bytes(image, sbd_image.read_bytes())
        voc_mask = voc_masks / f"{image_id}.png"
        if voc_mask.is_file():
            src, kind = voc_mask, "voc"
        else:
            src, kind = staging / "cls" / f"{image_id}.mat", "sbd"
            if not src.is_file():
                raise PrepareError(
                    f"no mask for {image_id}: neither {voc_mask} nor {src} exists; the archives "
                    "are incomplete: download them again and re-run with --force"
                )
        out = voc_root / "SegmentationClassAug" / f"{image_id}.png"
        tasks.append(MaskTask(str(src), kind, str(image), str(out), force))
    return tasks


def _convert(
    voc_root: Path,
    staging: Path,
    archives: tuple[Path, Path],
    *,
    workers: int,
    progress: bool,
    force: bool,
) -> dict[str, Any]:
    seg_sets = voc_root / "ImageSets" / "Segmentation"
    voc_train = _read_required(seg_sets / "train.txt", archives[0])
    val = _read_required(seg_sets / "val.txt", archives[0])
    sbd_train = _read_required(staging / "train.txt", archives[1])
    sbd_val = _read_required(staging / "val.txt", archives[1])
    train_aug = sorted((set(voc_train) | set(sbd_train) | set(sbd_val)) - set(val))
    tasks = _build_tasks(voc_root, staging, train_aug, sorted(set(val)), force)
    hist = {"train_aug": np.zeros(256, np.int64), "val": np.zeros(256, np.int64)}
    results = parallel.parallel_map(
        convert_mask, tasks, workers=workers, desc="SegmentationClassAug", progress=progress
    )
    for index, h in enumerate(results):
        hist["train_aug" if index < len(train_aug) else "val"] += h
    atomic.atomic_write_text(seg_sets / "train_aug.txt", "\n".join(train_aug) + "\n")
    return {
        "counts": {
            "voc_train": len(voc_train),
            "val": len(val),
            "sbd_train": len(sbd_train),
            "sbd_val": len(sbd_val),
            "train_aug": len(train_aug),
        },
        "label_histogram": {k: label_png.histogram_dict(v) for k, v in hist.items()},
    }


def _split_report(
    split_dir: Path,
    voc_root: Path,
    known: tuple[set[str], set[str]],
    voc_train: set[str],
    train_aug: set[str],
    check_counts: bool,
) -> tuple[dict[str, Any], list[str], list[str]]:
    """Check the split lists: files exist, classic ones inside VOC train, union is train_aug."""
    if not (split_dir / "val.txt").is_file():
        return (
            {},
            [],
            [
                f"no split lists in {split_dir}: run data_scripts/fetch_splits.py, then re-run this "
                "script to check them"
            ],
        )

    def needed(line: str) -> list[Path]:
        return [
            voc_root / "JPEGImages" / f"{line}.jpg",
            voc_root / "SegmentationClassAug" / f"{line}.png",
        ]

    images, masks = known

    def exists(path: Path) -> bool:
        return path.stem in (images if path.suffix == ".jpg" else masks)

    summary, errors = check_split_lists(split_dir, needed, exists)
    warnings = expected_count_warnings("pascal", summary) if check_counts else []
    splits, _ = read_splits(split_dir)
    for name, split in splits.items():
        labeled = set(split.labeled)
        summary[name]["setting"] = (
            "classic"
            if name in PASCAL_CLASSIC
            else "blended"
            if name in PASCAL_BLENDED
            else "custom"
        )
        summary[name]["labeled_in_voc_train"] = len(labeled & voc_train)
        if name in PASCAL_CLASSIC and not labeled <= voc_train:
            errors.append(
                f"classic split {split_dir / name} has labeled ids outside VOC train: the split "
                "lists and VOC2012 do not match; re-fetch the splits"
            )
        if split.unlabeled is not None:
            both = labeled | set(split.unlabeled)
            if labeled & set(split.unlabeled):
                errors.append(f"split {split_dir / name}: labeled and unlabeled lists overlap")
            if both != train_aug:
                warnings.append(
                    f"split {split_dir / name}: labeled ∪ unlabeled has {len(both)} ids, "
                    f"{len(both ^ train_aug)} differ from train_aug"
                )
    return summary, errors, warnings


def build_report(
    data_root: Path, convert_info: dict[str, Any], *, check_counts: bool = True
) -> dict[str, Any]:
    """Validation report of a prepared VOC tree: counts, splits, histograms, missing/extra files."""
    voc_root = data_root / "VOC2012"
    seg_sets = voc_root / "ImageSets" / "Segmentation"
    train_aug = read_lines(seg_sets / "train_aug.txt")
    val = read_lines(seg_sets / "val.txt")
    voc_train = read_lines(seg_sets / "train.txt")
    images = {Path(p).stem for p in bookkeeping.list_files(voc_root / "JPEGImages", ".jpg")}
    masks = {
        Path(p).stem for p in bookkeeping.list_files(voc_root / "SegmentationClassAug", ".png")
    }
    wanted = set(train_aug) | set(val)
    errors = [
        f"{voc_root / 'JPEGImages' / (i + '.jpg')} is missing" for i in sorted(wanted - images)
    ]
    errors += [
        f"{voc_root / 'SegmentationClassAug' / (i + '.png')} is missing; re-run with --force"
        for i in sorted(wanted - masks)
    ]
    warnings = []
    counts = convert_info.get("counts", {})
    if check_counts:
        for key, want in EXPECTED.items():
            if key in counts and counts[key] != want:
                warnings.append(f"{key} has {counts[key]} ids, expected {want}")
    split_dir = data_root / "splits" / "pascal"
    splits, split_errors, split_warnings = _split_report(
        split_dir, voc_root, (images, masks), set(voc_train), set(train_aug), check_counts
    )
    return {
        "dataset": "pascal",
        "root": str(voc_root),
        "sets": {
            "train_aug": {
                "images": len(set(train_aug) & images),
                "masks": len(set(train_aug) & masks),
            },
            "val": {"images": len(set(val) & images), "masks": len(set(val) & masks)},
        },
        "source_counts": counts,
        "splits": splits,
        "label_histogram": convert_info.get("label_histogram", {}),
        "extra": {
            "masks": sorted(masks - wanted),
            "images_not_in_any_set": len(images - wanted),
        },
        "warnings": warnings + split_warnings,
        "errors": errors + split_errors,
    }


def mask_files(voc_root: Path) -> list[str]:
    """The SegmentationClassAug PNGs under ``voc_root``, relative to it."""
    masks = bookkeeping.list_files(voc_root / "SegmentationClassAug", ".png")
    return sorted(f"SegmentationClassAug/{rel}" for rel in masks)


@bookkeeping.reports_failure("pascal")
def prepare_pascal(
    data_root: Path,
    archives_dir: Path | None = None,
    *,
    download: bool = False,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    verify: bool = True,
    keep_staging: bool = False,
    check_counts: bool = True,
    voc: Archive = VOC_ARCHIVE,
    sbd: Archive = SBD_ARCHIVE,
) -> dict[str, Any]:
    """Build ``DATA_ROOT/VOC2012`` (JPEGImages, SegmentationClassAug, train_aug) from VOC + SBD.

    Finished steps (recorded in ``DATA_ROOT/.prepare/pascal``) are skipped unless ``force``; the
    validation report is rebuilt on every run and returned. ``check_counts`` compares counts with
    the official release (off for the small test fixtures). Raises :class:`PrepareError` on bad
    input.
    """
    data_root = Path(data_root)
    archives_dir = Path(archives_dir) if archives_dir else data_root / "archives"
    workers = workers or base.default_workers()
    markers = Markers(data_root, "pascal")
    if force:
        markers.clear()
    voc_root = data_root / "VOC2012"
    staging = data_root / STATE_DIRNAME / "staging" / "sbd"
    paths = (archives_dir / voc.filename, archives_dir / sbd.filename)

    converted_now = not markers.done("convert")
    if converted_now:
        for archive, step, dest, select in (
            (voc, "extract-voc", voc_root, _select_voc),
            (sbd, "extract-sbd", staging, _select_sbd),
        ):
            if markers.done(step):
                continue
            path = downloads.obtain_archive(
                archives_dir, archive, fetch=download, progress=progress
            )
            if verify:
                checksums.verify_archive(path, archive, data_root, progress=progress)
            n = extraction.extract(
                path, dest, select, workers=workers, progress=progress, overwrite=force
            )
            if n == 0:
                raise PrepareError(
                    f"{path} holds none of the expected files; it is not {archive.filename} "
                    "from the official site: download it again"
                )
            markers.mark(step, archive=str(path), files=n)
        info = _convert(voc_root, staging, paths, workers=workers, progress=progress, force=force)
        markers.mark("convert", **info)
    if converted_now and not keep_staging:
        shutil.rmtree(staging, ignore_errors=True)
        with contextlib.suppress(OSError):
            staging.parent.rmdir()  # only if empty
        markers.clear("extract-sbd")
    report = build_report(data_root, markers.info("convert"), check_counts=check_counts)
    return bookkeeping.finish_labels(
        report, markers, voc_root, mask_files(voc_root), ALLOWED, converted_now, workers, progress
    )


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``data_scripts/prepare_pascal.py``."""
    parser = argparse.ArgumentParser(
        description="Prepare PASCAL VOC 2012 + SBD: DATA_ROOT/VOC2012/{JPEGImages,"
        "SegmentationClassAug} and ImageSets/Segmentation/train_aug.txt (10,582 ids).",
        epilog=f"Archives: {VOC_ARCHIVE.filename} ({VOC_ARCHIVE.url}) and "
        f"{SBD_ARCHIVE.filename} ({SBD_ARCHIVE.url}).",
    )
    cli.add_common_arguments(parser)
    parser.add_argument(
        "--keep-staging", action="store_true", help="keep the extracted SBD files after conversion"
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``data_scripts/prepare_pascal.py``."""
    args = build_parser().parse_args(argv)
    return prepare_pascal(
        args.data_root, args.archives, keep_staging=args.keep_staging, **cli.common_options(args)
    )
