"""End-to-end tests of prepare_pascal on miniature VOC + SBD archives.

Machine: exact. Files, masks and checksums.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from brpg.prepare import atomic, extraction, label_png, pascal
from brpg.prepare.base import PrepareError

try:
    from tests import fixtures_prepare as fx
except ImportError:  # tests/ not a package
    import fixtures_prepare as fx


def _archives(archive_dir: Path, **kwargs: object) -> dict[str, object]:
    """Fixture archives plus Archive specs carrying their MD5s (as the real ones carry theirs)."""
    paths = fx.make_pascal_archives(archive_dir, **kwargs)
    return {
        "voc": replace(pascal.VOC_ARCHIVE, md5=fx.md5_of(paths["voc"]), url=None),
        "sbd": replace(pascal.SBD_ARCHIVE, md5=fx.md5_of(paths["sbd"]), url=None),
    }


def _prepare(root: Path, archives: dict[str, object], **kwargs: object) -> dict:
    options = {"workers": 1, "progress": False, "check_counts": False, **kwargs}
    return pascal.prepare_pascal(root, root / "archives", **archives, **options)


def test_prepare_pascal_end_to_end(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.write_pascal_splits(tmp_path)
    report = _prepare(tmp_path, archives, workers=2)
    voc = tmp_path / "VOC2012"

    # train_aug = (VOC train ∪ SBD train ∪ SBD val) − VOC val, written as a list
    train_aug = (voc / "ImageSets/Segmentation/train_aug.txt").read_text().split()
    assert train_aug == fx.TRAIN_AUG
    assert "2007_000033" not in train_aug  # SBD train but VOC val

    # every train_aug + val id has an image and a palette mask
    for image_id in fx.TRAIN_AUG + fx.VOC_VAL:
        assert (voc / "JPEGImages" / f"{image_id}.jpg").is_file()
        with Image.open(voc / "SegmentationClassAug" / f"{image_id}.png") as im:
            assert im.mode == "P" and im.size == (fx.PASCAL_W, fx.PASCAL_H)
    assert (voc / "JPEGImages" / f"{fx.SBD_ONLY_IMAGE}.jpg").is_file()  # copied from SBD

    # VOC's own mask wins for an id both annotate; SBD .mat otherwise
    aug = voc / "SegmentationClassAug"
    np.testing.assert_array_equal(
        label_png.read_label_png(aug / "2007_000039.png"), fx.voc_label(1)
    )
    k = fx.SBD_TRAIN.index("2008_000002")
    np.testing.assert_array_equal(
        label_png.read_label_png(aug / "2008_000002.png"), fx.sbd_label(k)
    )

    # the report, also on disk
    on_disk = json.loads((tmp_path / "reports" / "pascal.json").read_text())
    assert on_disk == report and report["ok"] is True
    assert report["sets"]["train_aug"] == {"images": 5, "masks": 5}
    assert report["sets"]["val"] == {"images": 2, "masks": 2}
    assert report["splits"]["1"] == {
        "labeled": 1,
        "unlabeled": 4,
        "setting": "custom",  # only the published names are classic/blended
        "labeled_in_voc_train": 1,
    }
    assert report["splits"]["3"]["labeled_in_voc_train"] == 2
    assert report["splits"]["val"] == {"images": 2}
    hist = report["label_histogram"]
    assert sum(hist["train_aug"].values()) == 5 * fx.PASCAL_W * fx.PASCAL_H
    assert hist["val"]["255"] == 2 * fx.PASCAL_W  # the VOC border row
    assert set(map(int, hist["train_aug"])) <= set(range(21)) | {255}
    assert report["extra"]["images_not_in_any_set"] == 1  # VOC_UNUSED
    # staging removed, nothing half-written
    assert not (tmp_path / ".prepare" / "staging").exists()
    assert not fx.temp_files(tmp_path)


def test_prepare_pascal_rerun_skips_finished_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archives = _archives(tmp_path / "archives")
    _prepare(tmp_path, archives)
    mask = tmp_path / "VOC2012/SegmentationClassAug/2008_000002.png"
    before = mask.stat().st_mtime_ns
    for path in (tmp_path / "archives").iterdir():  # archives no longer needed
        path.unlink()
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: pytest.fail("re-extracted"))
    monkeypatch.setattr(pascal, "convert_mask", lambda *a: pytest.fail("re-converted"))
    report = _prepare(tmp_path, archives)
    assert report["ok"] and mask.stat().st_mtime_ns == before


def test_missing_archive_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(PrepareError) as info:
        pascal.prepare_pascal(tmp_path, tmp_path / "nowhere", progress=False)
    msg = str(info.value)
    assert "VOCtrainval_11-May-2012.tar" in msg and "--download" in msg
    assert "host.robots.ox.ac.uk" in msg


def test_checksum_mismatch_extracts_nothing(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    archives["sbd"] = replace(archives["sbd"], md5="0" * 32)
    with pytest.raises(PrepareError, match=r"checksum mismatch for .*benchmark\.tgz"):
        _prepare(tmp_path, archives)
    assert not (tmp_path / ".prepare" / "staging" / "sbd").exists()
    assert not (tmp_path / "VOC2012" / "SegmentationClassAug").exists()


def test_truncated_archive(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.truncate(tmp_path / "archives" / "benchmark.tgz", 0.5)
    with pytest.raises(PrepareError, match="checksum mismatch"):  # caught by the MD5 first
        _prepare(tmp_path, archives)
    with pytest.raises(PrepareError, match=r"benchmark\.tgz is truncated or corrupt"):
        _prepare(tmp_path, archives, verify=False)
    assert not fx.temp_files(tmp_path)


def test_mask_with_out_of_range_label(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives", bad_value_id="2008_000003")
    with pytest.raises(PrepareError, match=r"2008_000003\.mat holds label values \[42\]"):
        _prepare(tmp_path, archives)
    assert not (tmp_path / "VOC2012/SegmentationClassAug/2008_000003.png").exists()
    assert not (tmp_path / ".prepare/pascal/convert.json").exists()


def test_image_mask_size_mismatch(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives", size_mismatch_id="2008_000002")
    with pytest.raises(PrepareError, match=r"size mismatch: .*2008_000002\.jpg is 10x8 but"):
        _prepare(tmp_path, archives)


def test_split_naming_missing_image(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.write_pascal_splits(tmp_path, missing_id="2011_999999")
    with pytest.raises(PrepareError, match=r"labeled\.txt names '2011_999999'.*does not exist"):
        _prepare(tmp_path, archives)
    report = json.loads((tmp_path / "reports" / "pascal.json").read_text())
    assert report["ok"] is False


def test_disk_full_during_conversion_then_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    archives = _archives(tmp_path / "archives")
    full = fx.FullDisk(budget=300, fail_if=lambda p: "SegmentationClassAug" in str(p))
    monkeypatch.setattr(atomic, "_open_for_write", full)
    with pytest.raises(PrepareError, match="disk full while writing .*SegmentationClassAug"):
        _prepare(tmp_path, archives)
    assert full.failures == 1
    assert not fx.temp_files(tmp_path)
    assert not (tmp_path / ".prepare/pascal/convert.json").exists()
    monkeypatch.undo()
    report = _prepare(tmp_path, archives)
    assert report["ok"] and report["sets"]["train_aug"]["masks"] == 5


def test_wrong_tar_is_named(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    fx.write_tar(tmp_path / "archives" / "VOCtrainval_11-May-2012.tar", {"other/x.txt": b"x"})
    with pytest.raises(PrepareError, match="holds none of the expected files"):
        _prepare(tmp_path, archives, verify=False)


def test_rerun_catches_a_changed_mask(tmp_path: Path) -> None:
    archives = _archives(tmp_path / "archives")
    _prepare(tmp_path, archives)
    rel = pascal.mask_files(tmp_path / "VOC2012")[0]
    out = tmp_path / "VOC2012" / rel
    label_png.save_label_png(out, np.full_like(label_png.read_label_png(out), 99))
    with pytest.raises(PrepareError, match="changed since it was converted"):
        _prepare(tmp_path, archives)
    assert json.loads((tmp_path / "reports/pascal.json").read_text())["ok"] is False


def test_a_corrupt_tar_header_is_not_marked_done(tmp_path: Path) -> None:
    """With the checksum skipped, a VOC tar whose middle member header is corrupt must fail the
    extraction step without marking it done, so that the good archive, put back, is read again
    without --force."""
    import tarfile

    archives = _archives(tmp_path / "archives")
    fx.write_pascal_splits(tmp_path)
    voc_tar = tmp_path / "archives" / pascal.VOC_ARCHIVE.filename
    good = voc_tar.read_bytes()
    with tarfile.open(voc_tar) as tar:
        middle = tar.getmembers()[len(tar.getmembers()) // 2].offset
    bad = bytearray(good)
    bad[middle + 148 : middle + 156] = b"garbage!"  # the header's checksum field
    voc_tar.write_bytes(bytes(bad))
    with pytest.raises(PrepareError, match=f"tar header at byte {middle:,}"):
        _prepare(tmp_path, archives, verify=False)
    markers = tmp_path / ".prepare" / "pascal"
    assert not (markers / "extract-voc.json").exists()  # the step is not done
    voc_tar.write_bytes(good)
    report = _prepare(tmp_path, archives, verify=False)
    assert report["ok"], report
    assert (markers / "extract-voc.json").exists() or (markers / "convert.json").exists()
