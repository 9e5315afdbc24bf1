"""End-to-end tests of prepare_cityscapes on miniature zips.

Machine: exact. Files, label ids and checksums.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from brpg.prepare import cityscapes, extraction, label_png
from brpg.prepare.base import PrepareError

try:
    from tests import fixtures_prepare as fx
except ImportError:  # tests/ not a package
    import fixtures_prepare as fx


def _fixture_archives(archive_dir: Path) -> tuple:
    """The Archive specs with the fixture zips' MD5 in place of the published checksums."""
    return tuple(
        replace(spec, md5=fx.md5_of(path), sha1=None)
        if (path := archive_dir / spec.filename).is_file()
        else spec
        for spec in cityscapes.ARCHIVES
    )


def _prepare(root: Path, **kwargs: object) -> dict:
    options = {"workers": 1, "progress": False, "check_counts": False, **kwargs}
    options.setdefault("archives", _fixture_archives(root / "archives"))
    return cityscapes.prepare_cityscapes(root, root / "archives", **options)


def test_train_id_table() -> None:
    lut = cityscapes.train_id_lut()
    assert lut[7] == 0 and lut[8] == 1 and lut[11] == 2 and lut[23] == 10 and lut[33] == 18
    assert sorted(int(v) for v in set(lut.tolist()) - {255}) == list(range(19))
    assert all(lut[i] == 255 for i in (0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30, 34))


def test_prepare_cityscapes_end_to_end(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives")
    fx.write_cityscapes_splits(tmp_path)
    report = _prepare(tmp_path, workers=2)
    root = tmp_path / "cityscapes"
    lut = cityscapes.train_id_lut()
    seed = 0
    for split in ("train", "val"):
        for stem in fx.cityscapes_names(split):
            city = stem.split("_")[0]
            assert (root / f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png").is_file()
            out = root / f"gtFine/{split}/{city}/{stem}_gtFine_labelTrainIds.png"
            np.testing.assert_array_equal(
                label_png.read_label_png(out), lut[fx.cityscapes_label_ids(seed)]
            )
            seed += 1
    assert not (root / "leftImg8bit/test").exists()  # test split not extracted
    assert not list(root.rglob("*_color.png"))  # only labelIds are extracted
    assert report["ok"]
    assert report["sets"] == {
        "train": {"images": 3, "labels": 3},
        "val": {"images": 2, "labels": 2},
    }
    assert report["splits"]["1"] == {"labeled": 1, "unlabeled": 2}
    assert report["splits"]["val"] == {"images": 2}
    assert set(map(int, report["label_histogram"]["train"])) == set(range(19)) | {255}
    assert json.loads((tmp_path / "reports/cityscapes.json").read_text()) == report


def test_rerun_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives")
    _prepare(tmp_path)
    monkeypatch.setattr(extraction, "extract", lambda *a, **k: pytest.fail("re-extracted"))
    monkeypatch.setattr(cityscapes, "convert_label", lambda *a: pytest.fail("re-converted"))
    assert _prepare(tmp_path)["ok"]


def test_missing_archives_explain_login(tmp_path: Path) -> None:
    with pytest.raises(PrepareError) as info:
        _prepare(tmp_path)
    msg = str(info.value)
    assert "gtFine_trainvaltest.zip" in msg and str(tmp_path / "archives") in msg
    assert "cityscapes-dataset.com/downloads" in msg and "register" in msg


def test_gtcoarse_instead_of_gtfine(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives")
    fx.make_gtcoarse_zip(tmp_path / "archives" / "gtFine_trainvaltest.zip")
    with pytest.raises(PrepareError, match=r"wrong Cityscapes package: it holds gtCoarse/"):
        _prepare(tmp_path)
    assert not (tmp_path / "cityscapes").exists()


def test_zip_without_gtfine(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives")
    fx.write_zip(tmp_path / "archives" / "gtFine_trainvaltest.zip", {"README": b"x"})
    with pytest.raises(PrepareError, match=r"gtFine_trainvaltest\.zip is the wrong .*no gtFine/"):
        _prepare(tmp_path)


def test_swapped_zips(tmp_path: Path) -> None:
    paths = fx.make_cityscapes_archives(tmp_path / "archives")
    tmp = paths["images"].with_suffix(".tmp")
    paths["images"].rename(tmp)
    paths["labels"].rename(paths["images"])
    tmp.rename(paths["labels"])
    with pytest.raises(PrepareError, match="swapped"):
        _prepare(tmp_path)


def test_truncated_zip(tmp_path: Path) -> None:
    paths = fx.make_cityscapes_archives(tmp_path / "archives")
    fx.truncate(paths["labels"], 0.7)
    with pytest.raises(PrepareError, match=r"gtFine_trainvaltest\.zip .*truncated or corrupt"):
        _prepare(tmp_path)


def test_user_md5_is_checked(tmp_path: Path) -> None:
    paths = fx.make_cityscapes_archives(tmp_path / "archives")
    with pytest.raises(PrepareError, match="checksum mismatch"):
        _prepare(tmp_path, md5={"gtFine_trainvaltest.zip": "0" * 32})
    good = {p.name: fx.md5_of(p) for p in paths.values()}
    assert _prepare(tmp_path, md5=good)["ok"]


def test_label_id_out_of_range(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives", bad_value=True)
    with pytest.raises(PrepareError, match=r"labelIds\.png holds label values \[40\]"):
        _prepare(tmp_path)
    assert not (tmp_path / ".prepare/cityscapes/convert.json").exists()


def test_size_mismatch(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives", size_mismatch=True)
    with pytest.raises(PrepareError, match=r"size mismatch: .*_leftImg8bit\.png is 16x8 but"):
        _prepare(tmp_path)


def test_split_naming_missing_image(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives")
    fx.write_cityscapes_splits(tmp_path, missing=True)
    with pytest.raises(PrepareError, match=r"names '.*aachen_000000_999999_leftImg8bit\.png'"):
        _prepare(tmp_path)


def test_published_checksums_are_verified_by_default(tmp_path: Path) -> None:
    gtfine, left = cityscapes.ARCHIVES
    assert (gtfine.md5, gtfine.sha1) == (
        "4237c19de34c8a376e9ba46b495d6f66",
        "99f532cb1af174f5fcc4c5bc8feea8c66246ddbc",
    )
    assert (left.md5, left.sha1) == (
        "0a6e97e94b616a514066c9e2adb0c97f",
        "2c0b77ce9933cc635adda307fbba5566f5d9d404",
    )
    assert gtfine.checksum_source.startswith("community-sourced")
    paths = fx.make_cityscapes_archives(tmp_path / "archives")
    # the fixture zips are not the real packages: the built-in sums reject them
    with pytest.raises(PrepareError, match=r"checksum mismatch.*community-sourced.*--md5"):
        _prepare(tmp_path, archives=cityscapes.ARCHIVES)
    assert not (tmp_path / "cityscapes/gtFine").exists()
    # --md5 replaces the built-in sums of its zip; --skip-checksum skips them
    good = {p.name: fx.md5_of(p) for p in paths.values()}
    assert _prepare(tmp_path, archives=cityscapes.ARCHIVES, md5=good)["ok"]
    assert _prepare(tmp_path, archives=cityscapes.ARCHIVES, verify=False, force=True)["ok"]
    args = cityscapes.build_parser().parse_args(["--skip-checksum"])
    assert args.skip_checksum


def test_rerun_catches_a_changed_label(tmp_path: Path) -> None:
    fx.make_cityscapes_archives(tmp_path / "archives")
    _prepare(tmp_path)
    rel = next(r for r in cityscapes.label_files(tmp_path / "cityscapes") if "/val/" in r)
    out = tmp_path / "cityscapes" / rel
    label_png.save_label_png(out, np.full_like(label_png.read_label_png(out), 99))
    with pytest.raises(PrepareError, match="changed since it was converted"):
        _prepare(tmp_path)
    assert json.loads((tmp_path / "reports/cityscapes.json").read_text())["ok"] is False
