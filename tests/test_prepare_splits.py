"""Split lists: the real published lists in ../shared/splits (counts, SHA-256), fetching
(local folder and HTTP), verification and the derived COCO unlabeled lists.

Machine: exact. Split lists and their SHA-256 sums.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from brpg.prepare import splits
from brpg.prepare.base import PrepareError

try:
    from tests.fixtures_prepare import serve_files
except ImportError:  # tests/ not a package
    from fixtures_prepare import serve_files

SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "splits"
needs_shared = pytest.mark.skipif(
    not (SHARED_SPLITS / "SHA256SUMS").is_file(),
    reason=f"the published split lists are not at {SHARED_SPLITS} (../shared absent)",
)


def _sums_file() -> dict[str, str]:
    out = {}
    for line in (SHARED_SPLITS / "SHA256SUMS").read_text().splitlines():
        digest, rel = line.split()
        out[rel.removeprefix("./")] = digest
    return out


@needs_shared
def test_embedded_sums_match_sha256sums_and_files() -> None:
    assert _sums_file() == splits.SPLIT_SHA256
    assert splits.verify_split_tree(SHARED_SPLITS) == []


@needs_shared
def test_pascal_counts() -> None:
    found, val = splits.read_splits(SHARED_SPLITS / "pascal")
    assert {k: len(v.labeled) for k, v in found.items()} == splits.LABELED_COUNTS["pascal"]
    assert len(val) == 1449
    pools = set()
    fine = set(found["1464"].labeled)
    for name, split in found.items():
        labeled, unlabeled = set(split.labeled), set(split.unlabeled or [])
        assert len(labeled) == len(split.labeled) and not labeled & unlabeled
        assert len(labeled | unlabeled) == 10582
        pools.add(frozenset(labeled | unlabeled))
        if name in splits.PASCAL_CLASSIC:
            assert labeled <= fine
        else:  # blended: 662 and 1323 happen to lie inside the fine set, 2646/5291 contain it
            assert labeled <= fine if int(name) < 1464 else fine <= labeled
    assert len(pools) == 1 and not set(val) & next(iter(pools))  # one pool, disjoint from val


@needs_shared
def test_cityscapes_counts() -> None:
    found, val = splits.read_splits(SHARED_SPLITS / "cityscapes")
    assert {k: len(v.labeled) for k, v in found.items()} == splits.LABELED_COUNTS["cityscapes"]
    assert len(val) == 500
    for split in found.values():
        assert len(set(split.labeled) | set(split.unlabeled or [])) == 2975
        assert all(
            line.startswith("leftImg8bit/train/") and line.endswith("_leftImg8bit.png")
            for line in split.labeled
        )
    assert all(line.startswith("leftImg8bit/val/") for line in val)


@needs_shared
def test_coco_counts_and_line_format() -> None:
    found, val = splits.read_splits(SHARED_SPLITS / "coco")
    assert {k: len(v.labeled) for k, v in found.items()} == splits.LABELED_COUNTS["coco"]
    assert all(v.unlabeled is None for v in found.values())  # not published
    assert len(val) == 5000
    for line in found["1_128"].labeled + val:
        image, mask = line.split()
        assert image.split("/")[0] in ("train2017", "val2017")
        assert mask == f"masks/{Path(image).stem}.png"


@needs_shared
def test_derive_coco_unlabeled_real_counts(tmp_path: Path) -> None:
    coco_dir = tmp_path / "coco"
    labeled_names = set()
    for name in splits.LABELED_COUNTS["coco"]:
        (coco_dir / name).mkdir(parents=True)
        data = (SHARED_SPLITS / "coco" / name / "labeled.txt").read_bytes()
        (coco_dir / name / "labeled.txt").write_bytes(data)
        labeled_names |= {Path(line.split()[0]).name for line in data.decode().splitlines()}
    filler = (f"{900000000000 + k:012d}.jpg" for k in range(200000))
    train = set(labeled_names)
    while len(train) < 118287:
        train.add(next(filler))
    counts = splits.derive_coco_unlabeled(coco_dir, train)
    assert counts == {k: 118287 - n for k, n in splits.LABELED_COUNTS["coco"].items()}
    lines = (coco_dir / "1_128" / "unlabeled.txt").read_text().splitlines()
    assert len(lines) == 118287 - 925 and lines[0].endswith(".png")
    with pytest.raises(PrepareError, match="train2017 holds 118286 images, expected 118287"):
        splits.derive_coco_unlabeled(coco_dir, sorted(train)[1:])


def test_derive_coco_unlabeled_rejects_foreign_labeled(tmp_path: Path) -> None:
    (tmp_path / "1_2").mkdir()
    (tmp_path / "1_2" / "labeled.txt").write_text(
        "train2017/000000000077.jpg masks/000000000077.png"
    )
    with pytest.raises(PrepareError, match="names 1 image.*not in train2017"):
        splits.derive_coco_unlabeled(tmp_path, ["000000000001.jpg"], expected_train=None)


def test_read_lines_without_final_newline(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("a\nb\n\nc")
    assert splits.read_lines(tmp_path / "a.txt") == ["a", "b", "c"]


@needs_shared
def test_fetch_from_dir_then_idempotent(tmp_path: Path) -> None:
    written = splits.fetch_splits(tmp_path, from_dir=SHARED_SPLITS)
    assert sorted(written) == sorted(splits.SPLIT_SHA256)
    assert splits.verify_split_tree(tmp_path / "splits") == []
    assert splits.fetch_splits(tmp_path, from_dir=SHARED_SPLITS) == []


@needs_shared
def test_fetch_over_http_with_base_url(tmp_path: Path) -> None:
    files = {f"base/{rel}": (SHARED_SPLITS / rel).read_bytes() for rel in splits.SPLIT_SHA256}
    with serve_files(files) as (url, log):
        written = splits.fetch_splits(tmp_path, base_url=f"{url}/base/", datasets=["cityscapes"])
    assert len(written) == 9 and all(r.startswith("cityscapes/") for r in written)
    assert {entry["path"] for entry in log} == {f"base/{r}" for r in written}


@needs_shared
def test_fetch_rejects_tampered_file(tmp_path: Path) -> None:
    files = {rel: (SHARED_SPLITS / rel).read_bytes() for rel in splits.SPLIT_SHA256}
    files["pascal/92/labeled.txt"] += b"2012_999999\n"
    with serve_files(files) as (url, _):
        with pytest.raises(PrepareError, match=r"pascal/92/labeled\.txt has SHA-256"):
            splits.fetch_splits(tmp_path, base_url=url, datasets=["pascal"])
    assert not (tmp_path / "splits/pascal/92/labeled.txt").exists()


def test_fetch_from_dir_mismatch_and_missing(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "cityscapes").mkdir(parents=True)
    (src / "cityscapes" / "val.txt").write_text("not the real list\n")
    with pytest.raises(PrepareError, match="not found"):
        splits.fetch_splits(tmp_path / "out", from_dir=src, datasets=["cityscapes"])
    for rel in splits.SPLIT_SHA256:
        if rel.startswith("coco/"):
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            (src / rel).write_text("train2017/x.jpg masks/x.png\n")
    with pytest.raises(PrepareError, match="SHA-256"):
        splits.fetch_splits(tmp_path / "out", from_dir=src, datasets=["coco"])
    assert not (tmp_path / "out" / "splits" / "coco").exists()


def test_unreachable_base_url(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="--from-dir"):
        splits.fetch_splits(tmp_path, base_url="http://127.0.0.1:9/x", datasets=["coco"])


def test_url_template_pins_commit() -> None:
    url = splits.SPLITS_URL_TEMPLATE.format(
        repo=splits.BRPG_REPO, commit=splits.BRPG_COMMIT, path="pascal/val.txt"
    )
    assert url == f"{splits.DEFAULT_BASE_URL}/pascal/val.txt"
    assert "869311470bf25778b9e6afbdf8fa6deed22b3d56/data/splits/" in url
    assert hashlib.sha256(b"").hexdigest() not in splits.SPLIT_SHA256.values()
