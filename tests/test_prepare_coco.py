"""End-to-end tests of prepare_coco on miniature zips (masks rendered with pycocotools).

Machine: exact. Files, masks rendered by pycocotools, and checksums.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from brpg.prepare import coco, extraction, label_png
from brpg.prepare.base import PrepareError

pytest.importorskip("pycocotools")

try:
    from tests import fixtures_prepare as fx
except ImportError:  # tests/ not a package
    import fixtures_prepare as fx


def _archives(archive_dir: Path, **kwargs: object) -> tuple:
    paths = fx.make_coco_archives(archive_dir, **kwargs)
    return tuple(
        replace(spec, md5=fx.md5_of(paths[key]), url=None)
        for spec, key in zip(coco.ARCHIVES, ("annotations", "train2017", "val2017"), strict=True)
    )


def _prepare(root: Path, archives: tuple, **kwargs: object) -> dict:
    options = {"workers": 1, "progress": False, "check_counts": False, **kwargs}
    return coco.prepare_coco(root, root / "archives", archives=archives, **options)


def _mask(root: Path, image_id: int) -> np.ndarray:
    return label_png.read_label_png(root / "coco" / "masks" / f"{image_id:012d}.png")


def test_category_mapping() -> None:
    assert len(coco.COCO_THING_IDS) == 80
    assert coco.CATEGORY_TO_INDEX[1] == 1 and coco.CATEGORY_TO_INDEX[90] == 80
    assert coco.CATEGORY_TO_INDEX[13] == 12  # id 12 is a gap
    assert list(coco.CATEGORY_TO_INDEX.values()) == list(range(1, 81))


def test_prepare_coco_end_to_end(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.write_coco_splits(tmp_path)
    report = _prepare(tmp_path, archives, workers=2)
    root = tmp_path / "coco"
    for split, ids in (("train2017", (1, 2, 3)), ("val2017", (4, 5))):
        for i in ids:
            assert (root / split / f"{i:012d}.jpg").is_file()
            assert _mask(tmp_path, i).shape == (fx.COCO_H, fx.COCO_W)
    assert (root / "annotations/instances_val2017.json").is_file()
    assert not (root / "annotations/captions_train2017.json").exists()

    m1 = _mask(tmp_path, 1)  # overlap: the smaller toothbrush (80) wins over the person (1)
    assert m1[2, 2] == 1 and m1[6, 6] == 80 and m1[14, 18] == 0
    m2 = _mask(tmp_path, 2)  # crowd = 255, the bicycle (2) inside the crowd wins
    assert m2[1, 12] == 255 and m2[6, 16] == 2 and m2[1, 2] == 0
    assert (_mask(tmp_path, 3) == 0).all()  # no annotation: background
    m4 = _mask(tmp_path, 4)  # compressed RLE dog (18 -> 17)
    assert (m4[3:9, 2:8] == 17).all() and m4.sum() == 17 * 36
    assert _mask(tmp_path, 5)[7, 8] == 6  # polygon bus

    # unlabeled = train2017 minus labeled, same line format
    unlabeled = (tmp_path / "splits/coco/1_2/unlabeled.txt").read_text().split("\n")
    assert [u for u in unlabeled if u] == [
        "train2017/000000000002.jpg masks/000000000002.png",
        "train2017/000000000003.jpg masks/000000000003.png",
    ]
    assert report["ok"]
    assert report["sets"]["train2017"] == {"images": 3, "masks": 3}
    assert report["sets"]["val2017"] == {"images": 2, "masks": 2}
    assert report["splits"]["1_2"]["unlabeled_derived"] == 2
    assert report["label_histogram"]["val2017"]["17"] == 36
    assert report["crowd"] == "ignore"
    assert json.loads((tmp_path / "reports/coco.json").read_text()) == report
    assert not fx.temp_files(tmp_path)


def test_crowd_as_category_keeps_255_out(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    _prepare(tmp_path, archives)
    report = _prepare(tmp_path, archives, crowd="category")  # re-renders, no re-extraction
    m2 = _mask(tmp_path, 2)
    assert m2[1, 12] == 3 and m2[6, 16] == 2
    assert "255" not in report["label_histogram"]["train2017"]


def test_rerun_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archives = _archives(tmp_path / "archives")
    _prepare(tmp_path, archives)
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: pytest.fail("re-extracted"))
    monkeypatch.setattr(coco, "convert_mask", lambda *a: pytest.fail("re-converted"))
    assert _prepare(tmp_path, archives)["ok"]


def test_missing_archive(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"annotations_trainval2017\.zip.*images\.cocodataset"):
        coco.prepare_coco(tmp_path, progress=False)


def test_checksum_mismatch(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    archives = (archives[0], replace(archives[1], md5="1" * 32), archives[2])
    with pytest.raises(PrepareError, match=r"checksum mismatch for .*train2017\.zip"):
        _prepare(tmp_path, archives)
    assert not (tmp_path / "coco/train2017").exists()


def test_category_outside_coco(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives", bad_category=True)
    with pytest.raises(PrepareError, match="category_id 12, outside the 80 COCO classes"):
        _prepare(tmp_path, archives)


def test_size_mismatch(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives", size_mismatch=True)
    with pytest.raises(PrepareError, match=r"size mismatch: .*000000000002\.jpg is 22x16"):
        _prepare(tmp_path, archives)
    assert not (tmp_path / "coco/masks/000000000002.png").exists()


def test_split_naming_missing_image(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.write_coco_splits(tmp_path, missing=True)
    with pytest.raises(PrepareError, match=r"labeled\.txt names 1 image.*000000999999"):
        _prepare(tmp_path, archives)


def test_wrong_annotation_file(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    ann = {"images": [], "annotations": [], "categories": [{"id": 1}, {"id": 183}]}
    fx.write_zip(
        tmp_path / "archives/annotations_trainval2017.zip",
        {f"annotations/instances_{s}.json": json.dumps(ann).encode() for s in coco.SPLITS},
    )
    with pytest.raises(PrepareError, match="not the 80 COCO thing categories"):
        _prepare(tmp_path, archives, verify=False)


def test_failed_run_rewrites_a_stale_ok_report(tmp_path: Path) -> None:
    """The unlabeled-list derivation fails on the count check: the report says so."""
    archives = _archives(tmp_path / "archives")
    fx.write_coco_splits(tmp_path)
    path = tmp_path / "reports/coco.json"
    assert _prepare(tmp_path, archives)["ok"] and json.loads(path.read_text())["ok"]
    with pytest.raises(PrepareError, match="train2017 holds 3 images, expected 118287"):
        _prepare(tmp_path, archives, check_counts=True)
    report = json.loads(path.read_text())
    assert report["ok"] is False
    assert any("expected 118287" in e for e in report["errors"])
    assert report["sets"]["train2017"] == {"images": 3, "masks": 3}  # the rest is there too
    # a failure before any report is built (a bad archive on a --force run) rewrites it too
    bad = (archives[0], replace(archives[1], md5="1" * 32), archives[2])
    with pytest.raises(PrepareError, match="checksum mismatch"):
        _prepare(tmp_path, bad, force=True)
    report = json.loads(path.read_text())
    assert report["ok"] is False and "checksum mismatch" in report["errors"][0]


@pytest.mark.parametrize("value", [99, 5])  # outside the classes, and a plausible class
def test_rerun_catches_a_changed_mask(tmp_path: Path, value: int) -> None:
    archives = _archives(tmp_path / "archives")
    _prepare(tmp_path, archives)
    mask = tmp_path / "coco/masks/000000000001.png"
    label_png.save_label_png(mask, np.full_like(_mask(tmp_path, 1), value))
    with pytest.raises(PrepareError, match=r"000000000001\.png changed since it was converted"):
        _prepare(tmp_path, archives)
    assert json.loads((tmp_path / "reports/coco.json").read_text())["ok"] is False
    assert _prepare(tmp_path, archives, force=True)["ok"]  # --force renders it again
    assert _mask(tmp_path, 1)[6, 6] == 80


def test_truncated_zip_is_named_as_a_zip(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.truncate(tmp_path / "archives/val2017.zip", 0.6)
    with pytest.raises(PrepareError, match=r"val2017\.zip is not a readable zip archive") as info:
        _prepare(tmp_path, archives, verify=False)
    assert "tar" not in str(info.value).lower()
