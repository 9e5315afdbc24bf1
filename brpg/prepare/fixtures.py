"""Miniature copies of the real dataset archives, for tests and the book (no binary fixtures).

Each builder writes a few tiny images into archives with the *real* internal layout:
``VOCtrainval_11-May-2012.tar`` + SBD's ``benchmark.tgz``, the two Cityscapes zips, and COCO's
``train2017.zip`` / ``val2017.zip`` / ``annotations_trainval2017.zip``; ``write_*_splits`` writes
split lists in the published formats. :func:`prepare_fixture` runs the real preparation
pipeline (``brpg.prepare.<dataset>``) on them, which gives a complete, tiny ``DATA_ROOT`` that
the benchmark loaders (:mod:`brpg.data.benchmarks`) read exactly like the real one.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
from PIL import Image

# --------------------------------------------------------------------------- generic helpers


def jpeg_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A small random RGB JPEG."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def rgb_png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A small random RGB PNG (Cityscapes images are PNGs)."""
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def label_png_bytes(label: np.ndarray, palette: bool = True) -> bytes:
    """A label map as a palette (or grayscale) PNG."""
    image = Image.fromarray(label.astype(np.uint8))
    if palette:
        image.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def mat_bytes(label: np.ndarray) -> bytes:
    """An SBD-style ``cls/*.mat``: struct ``GTcls`` with field ``Segmentation``."""
    buf = io.BytesIO()
    scipy.io.savemat(
        buf,
        {
            "GTcls": {
                "Segmentation": label.astype(np.uint8),
                "CategoriesPresent": np.unique(label).astype(np.uint8),
            }
        },
    )
    return buf.getvalue()


def write_tar(path: Path, files: dict[str, bytes], *, gz: bool = False) -> Path:
    """Write a tar (``.tgz`` with ``gz``) holding ``files`` (name -> content), with dir entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dirs = sorted({str(Path(n).parent) for n in files if "/" in n})
    with tarfile.open(path, "w:gz" if gz else "w") as tar:
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def write_zip(path: Path, files: dict[str, bytes]) -> Path:
    """Write a zip holding ``files`` (name -> content), with directory entries."""
    path.parent.mkdir(parents=True, exist_ok=True)
    dirs = sorted({n.rsplit("/", 1)[0] + "/" for n in files if "/" in n})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for d in dirs:
            zf.writestr(d, b"")
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def md5_of(path: Path) -> str:
    """MD5 of a file."""
    return hashlib.md5(Path(path).read_bytes()).hexdigest()


# --------------------------------------------------------------------------- PASCAL VOC + SBD

VOC_TRAIN = ["2007_000032", "2007_000039"]
VOC_VAL = ["2007_000033", "2007_000042"]
SBD_TRAIN = ["2007_000039", "2008_000002", "2008_000003", "2007_000033"]  # 000033 is VOC val
SBD_VAL = ["2008_000008"]
VOC_UNUSED = ["2009_000001"]  # in JPEGImages, in no segmentation set
SBD_ONLY_IMAGE = "2008_000008"  # only SBD has its JPEG
TRAIN_AUG = sorted({*VOC_TRAIN, *SBD_TRAIN, *SBD_VAL} - set(VOC_VAL))
PASCAL_W, PASCAL_H = 10, 8


def voc_label(seed: int) -> np.ndarray:
    """A VOC-style mask: classes 0-20 with a 255 border."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 21, (PASCAL_H, PASCAL_W), dtype=np.uint8)
    label[0, :] = 255
    return label


def sbd_label(seed: int) -> np.ndarray:
    """An SBD-style mask: classes 0-20, no ignore."""
    rng = np.random.default_rng(100 + seed)
    return rng.integers(0, 21, (PASCAL_H, PASCAL_W), dtype=np.uint8)


def make_pascal_archives(
    archive_dir: Path,
    *,
    bad_value_id: str | None = None,
    size_mismatch_id: str | None = None,
) -> dict[str, Path]:
    """Write a miniature VOC tar and SBD tgz into ``archive_dir``.

    ``bad_value_id`` gets a mask value 42 in its SBD ``.mat``; ``size_mismatch_id`` an SBD mask
    one row taller than its image.
    """
    voc = "VOCdevkit/VOC2012/"
    files: dict[str, bytes] = {}
    for k, image_id in enumerate(VOC_TRAIN + VOC_VAL + SBD_TRAIN + VOC_UNUSED):
        files[f"{voc}JPEGImages/{image_id}.jpg"] = jpeg_bytes(PASCAL_W, PASCAL_H, k)
    for k, image_id in enumerate(VOC_TRAIN + VOC_VAL):
        files[f"{voc}SegmentationClass/{image_id}.png"] = label_png_bytes(voc_label(k))
        files[f"{voc}SegmentationObject/{image_id}.png"] = label_png_bytes(voc_label(k))
    files[f"{voc}Annotations/{VOC_TRAIN[0]}.xml"] = b"<annotation/>"
    seg = f"{voc}ImageSets/Segmentation/"
    files[f"{seg}train.txt"] = ("\n".join(VOC_TRAIN) + "\n").encode()
    files[f"{seg}val.txt"] = ("\n".join(VOC_VAL) + "\n").encode()
    files[f"{seg}trainval.txt"] = ("\n".join(VOC_TRAIN + VOC_VAL) + "\n").encode()
    voc_tar = write_tar(Path(archive_dir) / "VOCtrainval_11-May-2012.tar", files)

    sbd = "benchmark_RELEASE/dataset/"
    files = {f"{sbd}train.txt": ("\n".join(SBD_TRAIN) + "\n").encode()}
    files[f"{sbd}val.txt"] = "\n".join(SBD_VAL).encode()  # no final newline
    for k, image_id in enumerate(SBD_TRAIN + SBD_VAL):
        label = sbd_label(k)
        if image_id == bad_value_id:
            label[2, 3] = 42
        if image_id == size_mismatch_id:
            label = np.vstack([label, label[:1]])
        files[f"{sbd}cls/{image_id}.mat"] = mat_bytes(label)
        files[f"{sbd}inst/{image_id}.mat"] = mat_bytes(label)
        files[f"{sbd}img/{image_id}.jpg"] = jpeg_bytes(PASCAL_W, PASCAL_H, 50 + k)
    sbd_tgz = write_tar(Path(archive_dir) / "benchmark.tgz", files, gz=True)
    return {"voc": voc_tar, "sbd": sbd_tgz}


def write_pascal_splits(data_root: Path, *, missing_id: str | None = None) -> None:
    """Write fixture split lists: a classic and a blended split plus val."""
    root = Path(data_root) / "splits" / "pascal"
    classic = VOC_TRAIN[:1] + ([missing_id] if missing_id else [])
    lists = {
        "1/labeled.txt": classic,
        "1/unlabeled.txt": [i for i in TRAIN_AUG if i not in classic],
        "3/labeled.txt": TRAIN_AUG[:3],
        "3/unlabeled.txt": TRAIN_AUG[3:],
        "val.txt": VOC_VAL,
    }
    for rel, ids in lists.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(ids))


# --------------------------------------------------------------------------- Cityscapes

CITYSCAPES_W, CITYSCAPES_H = 16, 8
CITIES = {"train": {"aachen": 2, "bochum": 1}, "val": {"frankfurt": 2}, "test": {"berlin": 1}}


def cityscapes_names(split: str) -> list[str]:
    """Frame stems (``<city>_000000_<frame>``) of a fixture split."""
    return [f"{city}_000000_{k:06d}" for city, n in sorted(CITIES[split].items()) for k in range(n)]


def cityscapes_label_ids(seed: int) -> np.ndarray:
    """A labelIds map using every id 0-33 (and a few repeats)."""
    rng = np.random.default_rng(seed)
    ids = np.concatenate([np.arange(34), rng.integers(0, 34, CITYSCAPES_W * CITYSCAPES_H - 34)])
    return rng.permutation(ids).reshape(CITYSCAPES_H, CITYSCAPES_W).astype(np.uint8)


def make_cityscapes_archives(
    archive_dir: Path, *, bad_value: bool = False, size_mismatch: bool = False
) -> dict[str, Path]:
    """Write miniature ``leftImg8bit_trainvaltest.zip`` and ``gtFine_trainvaltest.zip``."""
    images: dict[str, bytes] = {"license.txt": b"fixture", "README": b"fixture"}
    labels: dict[str, bytes] = {"license.txt": b"fixture", "README": b"fixture"}
    seed = 0
    for split in ("train", "val", "test"):
        for stem in cityscapes_names(split):
            city = stem.split("_")[0]
            images[f"leftImg8bit/{split}/{city}/{stem}_leftImg8bit.png"] = rgb_png_bytes(
                CITYSCAPES_W, CITYSCAPES_H, seed
            )
            label = cityscapes_label_ids(seed)
            if bad_value and seed == 1:
                label[0, 0] = 40
            if size_mismatch and seed == 2:
                label = label[:, :-1]
            base = f"gtFine/{split}/{city}/{stem}_gtFine_"
            labels[base + "labelIds.png"] = label_png_bytes(label, palette=False)
            labels[base + "instanceIds.png"] = label_png_bytes(label, palette=False)
            labels[base + "color.png"] = rgb_png_bytes(CITYSCAPES_W, CITYSCAPES_H, seed)
            labels[base + "polygons.json"] = b"{}"
            seed += 1
    return {
        "images": write_zip(Path(archive_dir) / "leftImg8bit_trainvaltest.zip", images),
        "labels": write_zip(Path(archive_dir) / "gtFine_trainvaltest.zip", labels),
    }


def make_gtcoarse_zip(path: Path) -> Path:
    """A zip laid out like ``gtCoarse.zip`` (coarse labels), to be put where gtFine belongs."""
    label = label_png_bytes(cityscapes_label_ids(0), palette=False)
    return write_zip(
        path,
        {
            "gtCoarse/train/aachen/aachen_000000_000000_gtCoarse_labelIds.png": label,
            "gtCoarse/train_extra/augsburg/augsburg_000000_000000_gtCoarse_labelIds.png": label,
        },
    )


def write_cityscapes_splits(data_root: Path, *, missing: bool = False) -> None:
    """Fixture split lists in the published format (image paths)."""
    root = Path(data_root) / "splits" / "cityscapes"

    def path(split: str, stem: str) -> str:
        return f"leftImg8bit/{split}/{stem.split('_')[0]}/{stem}_leftImg8bit.png"

    train = [path("train", s) for s in cityscapes_names("train")]
    labeled = train[:1] + ([path("train", "aachen_000000_999999")] if missing else [])
    for rel, lines in {
        "1/labeled.txt": labeled,
        "1/unlabeled.txt": train[1:],
        "val.txt": [path("val", s) for s in cityscapes_names("val")],
    }.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("\n".join(lines) + "\n")


# --------------------------------------------------------------------------- COCO

COCO_THING_IDS = [i for i in range(1, 91) if i not in (12, 26, 29, 30, 45, 66, 68, 69, 71, 83)]
COCO_W, COCO_H = 20, 16


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def coco_annotations() -> dict[str, dict[str, Any]]:
    """instances_{train,val}2017 contents for the fixture (images 1-3 train, 4-5 val).

    - image 1: a large person (id 1 -> 1) and, on top of it, a small toothbrush (90 -> 80); the
      small one has the *lower* annotation id, so only the area rule makes it win;
    - image 2: a crowd of cars (3 -> 3, uncompressed RLE over columns 10-19) with one bicycle
      (2 -> 2) inside it;
    - image 3: no annotation (all background);
    - image 4: a compressed-RLE dog (18 -> 17); image 5: a polygon bus (6 -> 6).
    """
    from pycocotools import mask as mask_utils

    categories = [{"id": i, "name": f"c{i}", "supercategory": "thing"} for i in COCO_THING_IDS]

    def image(i: int) -> dict[str, Any]:
        return {"id": i, "file_name": f"{i:012d}.jpg", "height": COCO_H, "width": COCO_W}

    dog = np.zeros((COCO_H, COCO_W), dtype=np.uint8, order="F")
    dog[3:9, 2:8] = 1
    dog_rle = mask_utils.encode(np.asfortranarray(dog))
    dog_rle["counts"] = dog_rle["counts"].decode("ascii")
    train = [
        {"id": 20, "image_id": 1, "category_id": 1, "iscrowd": 0, "area": 120.0,
         "segmentation": _rect(0, 0, 12, 10), "bbox": [0, 0, 12, 10]},
        {"id": 10, "image_id": 1, "category_id": 90, "iscrowd": 0, "area": 16.0,
         "segmentation": _rect(4, 4, 8, 8), "bbox": [4, 4, 4, 4]},
        {"id": 30, "image_id": 2, "category_id": 3, "iscrowd": 1, "area": 160.0,
         "segmentation": {"counts": [160, 160], "size": [COCO_H, COCO_W]}, "bbox": [10, 0, 10, 16]},
        {"id": 31, "image_id": 2, "category_id": 2, "iscrowd": 0, "area": 16.0,
         "segmentation": _rect(14, 4, 18, 8), "bbox": [14, 4, 4, 4]},
    ]  # fmt: skip
    val = [
        {"id": 40, "image_id": 4, "category_id": 18, "iscrowd": 0, "area": 36.0,
         "segmentation": dog_rle, "bbox": [2, 3, 6, 6]},
        {"id": 50, "image_id": 5, "category_id": 6, "iscrowd": 0, "area": 30.0,
         "segmentation": _rect(5, 5, 11, 10), "bbox": [5, 5, 6, 5]},
    ]  # fmt: skip
    return {
        "train2017": {"images": [image(i) for i in (1, 2, 3)], "annotations": train,
                      "categories": categories},
        "val2017": {"images": [image(i) for i in (4, 5)], "annotations": val,
                    "categories": categories},
    }  # fmt: skip


def make_coco_archives(
    archive_dir: Path, *, size_mismatch: bool = False, bad_category: bool = False
) -> dict[str, Path]:
    """Write miniature ``train2017.zip``, ``val2017.zip`` and ``annotations_trainval2017.zip``."""
    anns = coco_annotations()
    if bad_category:
        anns["train2017"]["annotations"][0]["category_id"] = 12  # a gap in COCO's ids
    out = {}
    for split, ids in (("train2017", (1, 2, 3)), ("val2017", (4, 5))):
        files = {}
        for i in ids:
            w = COCO_W + (2 if size_mismatch and i == 2 else 0)
            files[f"{split}/{i:012d}.jpg"] = jpeg_bytes(w, COCO_H, i)
        out[split] = write_zip(Path(archive_dir) / f"{split}.zip", files)
    ann_files = {
        f"annotations/instances_{split}.json": json.dumps(data).encode()
        for split, data in anns.items()
    }
    ann_files["annotations/captions_train2017.json"] = b"{}"
    out["annotations"] = write_zip(Path(archive_dir) / "annotations_trainval2017.zip", ann_files)
    return out


def write_coco_splits(data_root: Path, *, missing: bool = False) -> None:
    """Fixture COCO split lists: one labeled list (1 image) and val."""
    root = Path(data_root) / "splits" / "coco"
    labeled = ["train2017/000000000001.jpg masks/000000000001.png"]
    if missing:
        labeled.append("train2017/000000999999.jpg masks/000000999999.png")
    (root / "1_2").mkdir(parents=True, exist_ok=True)
    (root / "1_2" / "labeled.txt").write_text("\n".join(labeled))
    (root / "val.txt").write_text(
        "val2017/000000000004.jpg masks/000000000004.png\n"
        "val2017/000000000005.jpg masks/000000000005.png\n"
    )


# --------------------------------------------------------------------------- prepared DATA_ROOT

FIXTURE_DATASETS = ("pascal", "cityscapes", "coco")


def prepare_fixture(data_root: Path, dataset: str) -> dict[str, Any]:
    """Build ``dataset``'s miniature archives and split lists, then run its real preparation.

    Gives a tiny ``DATA_ROOT`` (``VOC2012/``, ``cityscapes/`` or ``coco/`` plus
    ``splits/<dataset>/``) laid out exactly like a real prepared one. The archives go to
    ``DATA_ROOT/archives``; checksums are skipped (the fixtures are not the official files) and
    so are the comparisons with the official counts. COCO needs ``pycocotools``. Returns the
    validation report of :func:`brpg.prepare.pascal.prepare_pascal` (or its siblings).
    """
    data_root = Path(data_root)
    archives = data_root / "archives"
    options: dict[str, Any] = {"workers": 1, "progress": False, "check_counts": False}
    if dataset == "pascal":
        from brpg.prepare.pascal import prepare_pascal

        make_pascal_archives(archives)
        write_pascal_splits(data_root)
        return prepare_pascal(data_root, archives, verify=False, **options)
    if dataset == "cityscapes":
        from brpg.prepare.cityscapes import prepare_cityscapes

        make_cityscapes_archives(archives)
        write_cityscapes_splits(data_root)
        return prepare_cityscapes(data_root, archives, verify=False, **options)
    if dataset == "coco":
        from brpg.prepare.coco import prepare_coco

        make_coco_archives(archives)
        write_coco_splits(data_root)
        return prepare_coco(data_root, archives, verify=False, **options)
    raise ValueError(f"unknown fixture dataset {dataset!r}; expected one of {FIXTURE_DATASETS}")
