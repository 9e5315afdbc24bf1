"""Cityscapes preparation (appendix: data): fine labels mapped to the 19 training classes.

Cityscapes needs a (free) login, so this script cannot download it. Get, from
https://www.cityscapes-dataset.com/downloads/ :

- ``leftImg8bit_trainvaltest.zip`` (11 GB, packageID=3): ``leftImg8bit/{train,val,test}/<city>/
  <city>_<seq>_<frame>_leftImg8bit.png``;
- ``gtFine_trainvaltest.zip`` (241 MB, packageID=1): ``gtFine/{train,val,test}/<city>/
  ..._gtFine_{labelIds,instanceIds,color}.png`` and ``_polygons.json``;

and put both in ``--archives`` (default ``DATA_ROOT/archives``). A wrong package (``gtCoarse.zip``,
the two zips swapped, ``leftImg8bit_trainextra.zip``) is recognised and named.

Output, in ``DATA_ROOT/cityscapes``: ``leftImg8bit/{train,val}/...`` and
``gtFine/{train,val}/<city>/..._gtFine_labelTrainIds.png`` made from ``..._gtFine_labelIds.png``
with the official trainId table (19 classes, everything else 255). The test split is not
extracted (it has no labels). The report goes to ``DATA_ROOT/reports/cityscapes.json``.
"""

from __future__ import annotations

import argparse
import logging
import zipfile
from dataclasses import dataclass, replace
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
from brpg.prepare.splits import check_split_lists, expected_count_warnings

log = logging.getLogger("brpg.prepare")

_CHECKSUM_SOURCE = (
    "community-sourced: the Cityscapes site shows its checksums only after login; the MD5s are "
    "those of NVIDIA/semantic-segmentation (PREPARE_DATASETS.md), the SHA-1s those of the "
    "PyTorch-Encoding-style scripts/prepare_cityscapes.py of junfu1115/DANet. If your package "
    "differs, pass the md5 the Cityscapes download page shows with --md5 FILE=MD5 (it replaces "
    "both), or skip the check with --skip-checksum"
)
LEFT_ARCHIVE = Archive(
    filename="leftImg8bit_trainvaltest.zip",
    url="https://www.cityscapes-dataset.com/file-handling/?packageID=3",
    md5="0a6e97e94b616a514066c9e2adb0c97f",
    sha1="2c0b77ce9933cc635adda307fbba5566f5d9d404",
    checksum_source=_CHECKSUM_SOURCE,
    size_hint="11 GB",
)
GTFINE_ARCHIVE = Archive(
    filename="gtFine_trainvaltest.zip",
    url="https://www.cityscapes-dataset.com/file-handling/?packageID=1",
    md5="4237c19de34c8a376e9ba46b495d6f66",
    sha1="99f532cb1af174f5fcc4c5bc8feea8c66246ddbc",
    checksum_source=_CHECKSUM_SOURCE,
    size_hint="241 MB",
)
ARCHIVES = (GTFINE_ARCHIVE, LEFT_ARCHIVE)

HOW_TO_GET = (
    "Cityscapes needs a free account: register at https://www.cityscapes-dataset.com/register/, "
    "then download leftImg8bit_trainvaltest.zip (11 GB, packageID=3) and gtFine_trainvaltest.zip "
    "(241 MB, packageID=1) from https://www.cityscapes-dataset.com/downloads/ (or with "
    "`csDownload` from the cityscapesscripts package) and put both zips in that folder, "
    "unchanged."
)

SPLITS = ("train", "val")
NUM_CLASSES = 19

#: Official Cityscapes label id -> train id (cityscapesScripts helpers/labels.py); 255 = ignore.
LABEL_ID_TO_TRAIN_ID: dict[int, int] = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
#: Label ids a labelIds PNG may hold: 0-33, and 255 (license plate, id -1, as uint8).
ALLOWED_LABEL_IDS = np.zeros(256, dtype=bool)
ALLOWED_LABEL_IDS[:34] = True
ALLOWED_LABEL_IDS[255] = True
ALLOWED_TRAIN_IDS = np.zeros(256, dtype=bool)
ALLOWED_TRAIN_IDS[:NUM_CLASSES] = True
ALLOWED_TRAIN_IDS[IGNORE_LABEL] = True


def train_id_lut() -> np.ndarray:
    """256-entry uint8 lookup table label id -> train id (255 for every unlisted id)."""
    lut = np.full(256, IGNORE_LABEL, dtype=np.uint8)
    for label_id, train_id in LABEL_ID_TO_TRAIN_ID.items():
        lut[label_id] = train_id
    return lut


_LUT = train_id_lut()


def _is_image(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 4
        and parts[0] == "leftImg8bit"
        and parts[1] in SPLITS
        and name.endswith("_leftImg8bit.png")
    )


def _is_label(name: str) -> bool:
    parts = name.split("/")
    return (
        len(parts) == 4
        and parts[0] == "gtFine"
        and parts[1] in SPLITS
        and name.endswith("_gtFine_labelIds.png")
    )


def check_package(path: Path, kind: str) -> None:
    """Raise :class:`PrepareError` unless ``path`` is the ``kind`` package ("images"/"labels").

    Only the zip's central directory is read, so this is fast even for the 11 GB image zip.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
    except (zipfile.BadZipFile, OSError) as exc:
        raise PrepareError(
            f"{path} is not a readable zip ({exc}): it is truncated or corrupt; download it again"
        ) from exc
    tops = {n.split("/")[0] for n in names}
    want_top, test = ("leftImg8bit", _is_image) if kind == "images" else ("gtFine", _is_label)
    found = {split for split in SPLITS if any(test(n) and n.split("/")[1] == split for n in names)}
    if found == set(SPLITS):
        return
    if "gtCoarse" in tops:
        hint = "it holds gtCoarse/ (the coarse annotations, gtCoarse.zip)"
    elif kind == "labels" and "leftImg8bit" in tops:
        hint = "it holds leftImg8bit/ images: the two zips look swapped"
    elif kind == "images" and "gtFine" in tops:
        hint = "it holds gtFine/ labels: the two zips look swapped"
    elif any(n.startswith("leftImg8bit/train_extra/") for n in names):
        hint = "it holds leftImg8bit/train_extra (leftImg8bit_trainextra.zip)"
    elif want_top not in tops:
        hint = f"it has no {want_top}/ folder (top-level entries: {sorted(tops)[:5]})"
    else:
        hint = f"it lacks {want_top}/{'/'.join(sorted(set(SPLITS) - found))} files"
    expected = GTFINE_ARCHIVE if kind == "labels" else LEFT_ARCHIVE
    raise PrepareError(
        f"{path} is the wrong Cityscapes package: {hint}. BRPG needs {expected.filename} "
        f"({expected.url}); download it and put it at {path}"
    )


@dataclass(frozen=True)
class LabelTask:
    """Map ``src`` (labelIds) to ``out`` (labelTrainIds), checking it against ``image``."""

    src: str
    image: str
    out: str
    force: bool


def convert_label(task: LabelTask) -> np.ndarray:
    """Write one labelTrainIds PNG (or re-check an existing one); return its histogram."""
    out, src = Path(task.out), Path(task.src)
    if out.is_file() and not task.force:
        train_ids = label_png.read_label_png(out)
        label_png.check_label_values(
            train_ids, ALLOWED_TRAIN_IDS, out, "delete it and re-run with --force"
        )
        shape_source: Path = out
    else:
        label_ids = label_png.read_label_png(src)
        label_png.check_label_values(
            label_ids,
            ALLOWED_LABEL_IDS,
            src,
            "Cityscapes label ids are 0-33: the file is not a gtFine labelIds map or is corrupt; "
            "download gtFine_trainvaltest.zip again",
        )
        train_ids = _LUT[label_ids]
        shape_source = src
    label_png.check_same_size(
        Path(task.image), (train_ids.shape[1], train_ids.shape[0]), shape_source
    )
    if shape_source != out:
        label_png.save_label_png(out, train_ids)
    return label_png.label_histogram(train_ids)


def image_to_label(image_rel: str) -> str:
    """``leftImg8bit/<split>/<city>/<x>_leftImg8bit.png`` -> ``gtFine/.../<x>_gtFine_labelTrainIds.png``."""
    parts = image_rel.split("/")
    stem = parts[-1][: -len("_leftImg8bit.png")]
    return "/".join(["gtFine", *parts[1:-1], f"{stem}_gtFine_labelTrainIds.png"])


def _convert(root: Path, *, workers: int, progress: bool, force: bool) -> dict[str, Any]:
    histograms = {}
    counts = {}
    for split in SPLITS:
        sources = sorted(bookkeeping.list_files(root / "gtFine" / split, "_gtFine_labelIds.png"))
        tasks = []
        for rel in sources:
            src = root / "gtFine" / split / rel
            stem = src.name[: -len("_gtFine_labelIds.png")]
            image = root / "leftImg8bit" / split / Path(rel).parent / f"{stem}_leftImg8bit.png"
            if not image.is_file():
                raise PrepareError(
                    f"label {src} has no image {image}: the two zips do not belong together; "
                    "download both again"
                )
            out = src.with_name(f"{stem}_gtFine_labelTrainIds.png")
            tasks.append(LabelTask(str(src), str(image), str(out), force))
        hist = np.zeros(256, np.int64)
        for h in parallel.parallel_map(
            convert_label, tasks, workers=workers, desc=f"labelTrainIds {split}", progress=progress
        ):
            hist += h
        histograms[split] = label_png.histogram_dict(hist)
        counts[split] = len(tasks)
    return {"counts": counts, "label_histogram": histograms}


def build_report(
    data_root: Path, convert_info: dict[str, Any], *, check_counts: bool = True
) -> dict[str, Any]:
    """Validation report: images/labels per split, missing/extra files, split lists, histograms."""
    root = data_root / "cityscapes"
    errors: list[str] = []
    warnings: list[str] = []
    sets = {}
    extra: dict[str, list[str]] = {}
    expected = {"train": 2975, "val": 500}
    known: set[str] = set()
    for split in SPLITS:
        images = {
            f"leftImg8bit/{split}/{p}"
            for p in bookkeeping.list_files(root / "leftImg8bit" / split, "_leftImg8bit.png")
        }
        labels = {
            f"gtFine/{split}/{p}"
            for p in bookkeeping.list_files(root / "gtFine" / split, "_gtFine_labelTrainIds.png")
        }
        known |= images | labels
        wanted_labels = {image_to_label(i) for i in images}
        errors += [
            f"{root / lab} is missing; re-run with --force"
            for lab in sorted(wanted_labels - labels)
        ]
        extra[split] = sorted(labels - wanted_labels)
        sets[split] = {"images": len(images), "labels": len(labels & wanted_labels)}
        if check_counts and len(images) != expected[split]:
            warnings.append(f"{split} has {len(images)} images, expected {expected[split]}")
    split_dir = data_root / "splits" / "cityscapes"
    splits: dict[str, Any] = {}
    if (split_dir / "val.txt").is_file():
        splits, split_errors = check_split_lists(
            split_dir,
            lambda line: [root / line, root / image_to_label(line)],
            lambda path: path.relative_to(root).as_posix() in known,
        )
        errors += split_errors
        if check_counts:
            warnings += expected_count_warnings("cityscapes", splits)
    else:
        warnings.append(
            f"no split lists in {split_dir}: run data_scripts/fetch_splits.py, then re-run this "
            "script to check them"
        )
    return {
        "dataset": "cityscapes",
        "root": str(root),
        "sets": sets,
        "splits": splits,
        "label_histogram": convert_info.get("label_histogram", {}),
        "extra": {"labels_without_image": extra},
        "warnings": warnings,
        "errors": errors,
    }


def label_files(root: Path) -> list[str]:
    """The labelTrainIds PNGs under ``root`` (``DATA_ROOT/cityscapes``), relative to it."""
    return sorted(
        f"gtFine/{split}/{rel}"
        for split in SPLITS
        for rel in bookkeeping.list_files(root / "gtFine" / split, "_gtFine_labelTrainIds.png")
    )


@bookkeeping.reports_failure("cityscapes")
def prepare_cityscapes(
    data_root: Path,
    archives_dir: Path | None = None,
    *,
    workers: int | None = None,
    progress: bool = True,
    force: bool = False,
    md5: dict[str, str] | None = None,
    verify: bool = True,
    check_counts: bool = True,
    archives: tuple[Archive, Archive] = ARCHIVES,
) -> dict[str, Any]:
    """Build ``DATA_ROOT/cityscapes`` (leftImg8bit + gtFine labelTrainIds) from the two zips.

    The zips are checked for the right package, then (unless ``verify`` is False) against the
    community-sourced MD5 and SHA-1 of ``archives`` (gtFine, leftImg8bit); ``md5`` maps archive
    file names to checksums the user copied from the Cityscapes site, which replace them. CRCs
    are checked while extracting. Returns the validation report; raises :class:`PrepareError`
    on bad input.
    """
    data_root = Path(data_root)
    archives_dir = Path(archives_dir) if archives_dir else data_root / "archives"
    workers = workers or base.default_workers()
    md5 = dict(md5 or {})
    gtfine, left = archives
    unknown = set(md5) - {left.filename, gtfine.filename}
    if unknown:
        raise PrepareError(
            f"--md5 given for {sorted(unknown)}; expected {left.filename} or {gtfine.filename}"
        )
    markers = Markers(data_root, "cityscapes")
    if force:
        markers.clear()
    root = data_root / "cityscapes"
    converted_now = not markers.done("convert")
    if converted_now:
        jobs = (
            (gtfine, "labels", "extract-gtfine", _is_label),
            (left, "images", "extract-leftimg8bit", _is_image),
        )
        pending = [job for job in jobs if not markers.done(job[2])]
        paths = {
            job[0].filename: downloads.require_archive(archives_dir, job[0], HOW_TO_GET)
            for job in pending
        }
        for archive, kind, _, _ in pending:
            check_package(paths[archive.filename], kind)
        for archive, _, step, wanted in pending:
            path = paths[archive.filename]
            if archive.filename in md5:  # the user's, from the Cityscapes site, replaces ours
                user_md5 = replace(
                    archive,
                    md5=md5[archive.filename],
                    sha1=None,
                    checksum_source=f"the md5 given with --md5 {archive.filename}=...",
                )
                checksums.verify_archive(path, user_md5, data_root, progress=progress)
            elif verify:
                checksums.verify_archive(path, archive, data_root, progress=progress)
            else:
                log.info("checksum of %s skipped; checking its CRCs while extracting", path.name)
            n = extraction.extract(
                path,
                root,
                lambda name, wanted=wanted: name if wanted(name) else None,
                workers=workers,
                progress=progress,
                overwrite=force,
            )
            markers.mark(step, archive=str(path), files=n)
        info = _convert(root, workers=workers, progress=progress, force=force)
        markers.mark("convert", **info)
    report = build_report(data_root, markers.info("convert"), check_counts=check_counts)
    return bookkeeping.finish_labels(
        report,
        markers,
        root,
        label_files(root),
        ALLOWED_TRAIN_IDS,
        converted_now,
        workers,
        progress,
    )


def _parse_md5(values: list[str]) -> dict[str, str]:
    out = {}
    for value in values:
        name, sep, digest = value.partition("=")
        if not sep or len(digest) != 32:
            raise PrepareError(f"--md5 expects FILE=32-hex-digits, got {value!r}")
        out[name] = digest.lower()
    return out


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``data_scripts/prepare_cityscapes.py``."""
    parser = argparse.ArgumentParser(
        description="Prepare Cityscapes: DATA_ROOT/cityscapes/{leftImg8bit,gtFine} with "
        "*_gtFine_labelTrainIds.png (19 classes, 255 ignore).",
        epilog=HOW_TO_GET,
    )
    cli.add_common_arguments(
        parser,
        download=False,
        skip_checksum_help="do not verify the archives against the built-in checksums "
        "(a --md5 is still checked)",
    )
    parser.add_argument(
        "--md5",
        action="append",
        default=[],
        metavar="FILE=MD5",
        help="verify an archive against the md5 shown on the Cityscapes download page instead "
        "of the built-in community-sourced checksums (repeatable), e.g. "
        "--md5 gtFine_trainvaltest.zip=<32 hex digits>",
    )
    return parser


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Entry point of ``data_scripts/prepare_cityscapes.py``."""
    args = build_parser().parse_args(argv)
    return prepare_cityscapes(
        args.data_root, args.archives, md5=_parse_md5(args.md5), **cli.common_options(args)
    )
