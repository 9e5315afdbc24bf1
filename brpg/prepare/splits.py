"""Split lists: fetch them from the official BRPG repository, verify, parse and derive.

The paper's split lists (identical to U2PL/UniMatch for VOC, U2PL's for Cityscapes, the COCO
labeled lists and val) live in the authors' repository under ``data/splits/``. :func:`fetch_splits`
downloads them at a pinned commit (or copies them from a local folder), checks each against the
SHA-256 sums embedded below and writes them to ``DATA_ROOT/splits/<dataset>/...``.

The COCO unlabeled lists are not published; :func:`derive_coco_unlabeled` builds them as
"train2017 minus labeled" and checks the count (118,287 - labeled).

Line formats (appendix: data):

- pascal: one image id per line (``2007_000033``);
- cityscapes: one image path per line (``leftImg8bit/train/<city>/<name>_leftImg8bit.png``);
- coco: image path and mask path (``train2017/000000000009.jpg masks/000000000009.png``).

The published files may lack a final newline; :func:`read_lines` copes with that.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from brpg.prepare.atomic import atomic_write_text
from brpg.prepare.base import PrepareError

log = logging.getLogger("brpg.prepare")

BRPG_REPO = "djh-dzxw/BRPG"
BRPG_COMMIT = "869311470bf25778b9e6afbdf8fa6deed22b3d56"
#: Where the split files live: ``{repo}`` and ``{commit}`` as above, ``{path}`` a key of
#: :data:`SPLIT_SHA256` such as ``pascal/92/labeled.txt``. The ``data/splits/`` folder is the one
#: the authors' README shows; see data_scripts/README.md for how sure we are of it.
SPLITS_URL_TEMPLATE = "https://raw.githubusercontent.com/{repo}/{commit}/data/splits/{path}"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{BRPG_REPO}/{BRPG_COMMIT}/data/splits"

DATASETS = ("pascal", "cityscapes", "coco")

#: SHA-256 of every published split file (from the project's shared/splits/SHA256SUMS).
SPLIT_SHA256: dict[str, str] = {
    "cityscapes/1488/labeled.txt": "1c345bd7ed630b201bc3c3cde2604dce0d65df35c142bbf35ffea8a699485488",
    "cityscapes/1488/unlabeled.txt": "be9e936decc74da8575cd57974e3b0ed4a669317873a5748125330b7d10409dc",
    "cityscapes/186/labeled.txt": "b325a363ec870628cbf3265bf48f9d9bf3e6e87a6e5c004ca989cda6279a0fd4",
    "cityscapes/186/unlabeled.txt": "0adcdcf9cf5db4276dfcdba1c207b2e5439ee465102d923eff3eec61573c5393",
    "cityscapes/372/labeled.txt": "a7fa9c926a15c3983a6b2b884dc455bcfaf59ddc2cbe63f895e1d067d5a7f9b4",
    "cityscapes/372/unlabeled.txt": "de6eeec7ec6d43403138d840e91e671af0033dc09a09cbcd14a7b872963b034f",
    "cityscapes/744/labeled.txt": "489d49d7dde31150a862dbd0aabfa8e787b9278ee51978d7d3d2c8e67d666c66",
    "cityscapes/744/unlabeled.txt": "e7b30bf5cee9103f546818e61fd8e26eb63c3a763fdd2a45343744bb6d96618a",
    "cityscapes/val.txt": "8115b5b627fe0b24001c541804788b8c2bb16076b78ad036a9905d471abd11fd",
    "coco/1_128/labeled.txt": "06067c0fb879b8e6ab8f4bdab3dfa641e8e4da2990200fa156daa33670329d79",
    "coco/1_16/labeled.txt": "71b5fcc00509a793c4f1938c3acd0f5509e62fea899ae1db2dc4b4ed215159e1",
    "coco/1_32/labeled.txt": "781b5990914f7422ee9e1f6325a914f289e077621b77b9cd066c2d01d33a939e",
    "coco/1_64/labeled.txt": "622b84ccbb5dcba32f4f5bb4ffaf1a9cf3e3f1f460b55dc02605fd099ebf1337",
    "coco/val.txt": "5a296a8b638114611e81c3b2257ec1720c8c16300f29ac24fcd8ddf08c9eb6d8",
    "pascal/1323/labeled.txt": "112dcea11e1a1d211e03db87c743989ffb29c16f90ce30da7c118b3c28f8d697",
    "pascal/1323/unlabeled.txt": "669ca8dc16acaf33a9db723d40e914f93d8d4ab5edab121148fbf30861128694",
    "pascal/1464/labeled.txt": "129f1fe991729b1862115b77738c938c149c1f167baa02b4b3186aea9f0d6a84",
    "pascal/1464/unlabeled.txt": "ba34ae09804b56761fbb46667ed6eb962a498205c068521b1105a0944f08ac40",
    "pascal/183/labeled.txt": "5dac0b72efebf63344c90c3700537e6d667c80bfa4c17205d96d459e655ec976",
    "pascal/183/unlabeled.txt": "4a3f4c77c01bae73b342439dbb3eb9f09b102e5ca5680fcfd941785bafd0cc98",
    "pascal/2646/labeled.txt": "4cc769f75d69c74e4eabdb1dff7cb93ac22a4c30a9b759a7cedec3e3c6b7ed28",
    "pascal/2646/unlabeled.txt": "4fd8e0bc7304c99ac884c6876a8f5d23ce6d9468fa55601334982ad4fa631f4f",
    "pascal/366/labeled.txt": "97abd8fe7d52346b2663e6faed73e89560a171788ea0a12c012bff26c74a25d4",
    "pascal/366/unlabeled.txt": "2cb6fe3645fa20e66653209b003e9d8b059e18bc664341515ea352eac2ef273c",
    "pascal/5291/labeled.txt": "989051b20c885ee09c37b5e5d005c067a6cd1bbcf40b06df6eb4af9e41992296",
    "pascal/5291/unlabeled.txt": "7594c243192ee8decac87d733eb977fea16ede88f9b0cf7759c73251e7f0a82c",
    "pascal/662/labeled.txt": "e9bb5d18af8041799389ad0c2274f043161a912837416c2c6403d9d901dee4c1",
    "pascal/662/unlabeled.txt": "a9a7e39271779ccaacced31633d32d55a0dc27f61a451ac5e3a7a1403cdfb5af",
    "pascal/732/labeled.txt": "b2973f8d47b780e0bc53f598a51fb651c21c7485f4d02111296452abb931ce44",
    "pascal/732/unlabeled.txt": "077f8aab596629403bb38177c3c678a17a30eb7132a38f4952237763b311a170",
    "pascal/92/labeled.txt": "7feeb5314d99485739e79c385d3b70145d44dc60190acb4d5df63165c630ef6a",
    "pascal/92/unlabeled.txt": "9ae9c7726c7e06f8ef40cddfea55911128157c5a21c3c5195074e4e45e48031f",
    "pascal/val.txt": "6f8edc37993764f6e212237d39546fb595246244147e8a050813c520aac0ade1",
}

#: Labeled-set sizes of the published splits (appendix: data), per dataset and split folder.
LABELED_COUNTS: dict[str, dict[str, int]] = {
    "pascal": {
        "92": 92,
        "183": 183,
        "366": 366,
        "732": 732,
        "1464": 1464,
        "662": 662,
        "1323": 1323,
        "2646": 2646,
        "5291": 5291,
    },
    "cityscapes": {"186": 186, "372": 372, "744": 744, "1488": 1488},
    "coco": {"1_128": 925, "1_64": 1849, "1_32": 3697, "1_16": 7393},
}
#: Images in each dataset's val list and in its whole training pool.
VAL_COUNTS = {"pascal": 1449, "cityscapes": 500, "coco": 5000}
TRAIN_POOL = {"pascal": 10582, "cityscapes": 2975, "coco": 118287}
#: The classic VOC splits draw their labeled images from the 1,464 fine set; the others are blended.
PASCAL_CLASSIC = ("92", "183", "366", "732", "1464")
PASCAL_BLENDED = ("662", "1323", "2646", "5291")


@dataclass
class Split:
    """One labeled/unlabeled split: the raw lines of both lists (unlabeled may be absent)."""

    name: str
    labeled: list[str]
    unlabeled: list[str] | None


def read_lines(path: Path) -> list[str]:
    """Non-empty, stripped lines of a split file (a missing final newline is fine)."""
    return [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]


def image_of(line: str) -> str:
    """The image part of a split line (the first whitespace-separated field)."""
    return line.split()[0]


def read_splits(split_dir: Path) -> tuple[dict[str, Split], list[str]]:
    """Read every ``<name>/labeled.txt`` (+ ``unlabeled.txt``) and ``val.txt`` under ``split_dir``.

    Returns ``({name: Split}, val_lines)``; raises :class:`PrepareError` if ``val.txt`` is absent.
    """
    split_dir = Path(split_dir)
    val = split_dir / "val.txt"
    if not val.is_file():
        raise PrepareError(
            f"missing split file {val}: run `python data_scripts/fetch_splits.py` first"
        )
    splits: dict[str, Split] = {}
    for labeled in sorted(split_dir.glob("*/labeled.txt")):
        unlabeled = labeled.with_name("unlabeled.txt")
        name = labeled.parent.name
        splits[name] = Split(
            name, read_lines(labeled), read_lines(unlabeled) if unlabeled.is_file() else None
        )
    return splits, read_lines(val)


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a (small) file."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def verify_split_tree(splits_root: Path, datasets: Iterable[str] = DATASETS) -> list[str]:
    """Paths (relative to ``splits_root``) that are missing or differ from :data:`SPLIT_SHA256`."""
    bad = []
    for rel, expected in SPLIT_SHA256.items():
        if rel.split("/")[0] not in datasets:
            continue
        path = Path(splits_root) / rel
        if not path.is_file() or sha256_of(path) != expected:
            bad.append(rel)
    return bad


def _fetch_one(rel: str, base_url: str | None, from_dir: Path | None, timeout: float) -> bytes:
    if from_dir is not None:
        src = Path(from_dir) / rel
        if not src.is_file():
            raise PrepareError(
                f"split file {src} not found: --from-dir must point at a folder laid out like "
                "<dir>/pascal/92/labeled.txt"
            )
        return src.read_bytes()
    url = f"{(base_url or DEFAULT_BASE_URL).rstrip('/')}/{rel}"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310
            return response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise PrepareError(
            f"cannot fetch split file {url} ({exc}). Check the network, pass --base-url with the "
            "folder that holds pascal/, cityscapes/ and coco/, or copy the lists from a local "
            "checkout with --from-dir"
        ) from exc


def fetch_splits(
    data_root: Path,
    *,
    base_url: str | None = None,
    from_dir: Path | None = None,
    datasets: Iterable[str] = DATASETS,
    timeout: float = 60.0,
) -> list[str]:
    """Put the verified split files under ``DATA_ROOT/splits``; return the paths written.

    Files already present with the right SHA-256 are skipped. A file whose content does not match
    its embedded SHA-256 is not written, and a :class:`PrepareError` names it.
    """
    datasets = tuple(datasets)
    unknown = set(datasets) - set(DATASETS)
    if unknown:
        raise PrepareError(f"unknown dataset(s) {sorted(unknown)}; choose from {DATASETS}")
    out_root = Path(data_root) / "splits"
    written = []
    for rel, expected in SPLIT_SHA256.items():
        if rel.split("/")[0] not in datasets:
            continue
        dest = out_root / rel
        if dest.is_file() and sha256_of(dest) == expected:
            continue
        data = _fetch_one(rel, base_url, from_dir, timeout)
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise PrepareError(
                f"split file {rel} has SHA-256 {actual}, expected {expected}: the source is not "
                f"the pinned BRPG commit {BRPG_COMMIT}. Fix --base-url/--from-dir"
            )
        atomic_write_text(dest, data.decode("utf-8"))
        written.append(rel)
    log.info(
        "split lists in %s: %d written, %d already there",
        out_root,
        len(written),
        sum(1 for r in SPLIT_SHA256 if r.split("/")[0] in datasets) - len(written),
    )
    return written


def check_split_lists(
    split_dir: Path,
    needed_files: Callable[[str], list[Path]],
    exists: Callable[[Path], bool] = Path.is_file,
) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """Check that every line of every list under ``split_dir`` names files that exist.

    ``needed_files(line)`` returns the files a line needs (image and mask); ``exists`` tests one
    (pass a set lookup to avoid a million ``stat`` calls on COCO). Returns a summary
    ``{split: {"labeled": n, "unlabeled": m}, "val": {"images": k}}`` and a list of errors, one
    per list file with missing files (naming the first and counting the rest).
    """
    splits, val = read_splits(split_dir)
    summary: dict[str, dict[str, Any]] = {}
    errors: list[str] = []

    def check(path: Path, lines: list[str]) -> None:
        missing = [(line, f) for line in lines for f in needed_files(line) if not exists(f)]
        if missing:
            line, f = missing[0]
            more = f" ({len(missing) - 1} more missing files)" if len(missing) > 1 else ""
            errors.append(
                f"split file {path} names {line!r} but {f} does not exist{more}: re-run the "
                "preparation with --force or re-fetch the splits"
            )

    for name, split in splits.items():
        check(Path(split_dir) / name / "labeled.txt", split.labeled)
        summary[name] = {"labeled": len(split.labeled)}
        if split.unlabeled is not None:
            check(Path(split_dir) / name / "unlabeled.txt", split.unlabeled)
            summary[name]["unlabeled"] = len(split.unlabeled)
    check(Path(split_dir) / "val.txt", val)
    summary["val"] = {"images": len(val)}
    return summary, errors


def expected_count_warnings(dataset: str, summary: dict[str, dict[str, Any]]) -> list[str]:
    """Warnings for published splits whose sizes differ from the paper's (appendix: data)."""
    warnings = []
    for name, want in LABELED_COUNTS[dataset].items():
        got = summary.get(name, {}).get("labeled")
        if got is not None and got != want:
            warnings.append(f"split {dataset}/{name} has {got} labeled images, expected {want}")
        unlabeled = summary.get(name, {}).get("unlabeled")
        if got is not None and unlabeled is not None and got + unlabeled != TRAIN_POOL[dataset]:
            warnings.append(
                f"split {dataset}/{name}: labeled + unlabeled = {got + unlabeled}, "
                f"expected {TRAIN_POOL[dataset]}"
            )
    val = summary.get("val", {}).get("images")
    if val is not None and val != VAL_COUNTS[dataset]:
        warnings.append(f"{dataset} val.txt has {val} images, expected {VAL_COUNTS[dataset]}")
    return warnings


def coco_line(image_name: str) -> str:
    """The split line of a train2017 image file name: ``train2017/<n>.jpg masks/<n>.png``."""
    stem = image_name.rsplit(".", 1)[0]
    return f"train2017/{stem}.jpg masks/{stem}.png"


def derive_coco_unlabeled(
    splits_dir: Path,
    train_images: Iterable[str],
    *,
    expected_train: int | None = TRAIN_POOL["coco"],
) -> dict[str, int]:
    """Write ``<split>/unlabeled.txt`` = train2017 minus labeled for every COCO split folder.

    ``train_images`` are the train2017 file names (``000000000009.jpg``). Raises
    :class:`PrepareError` if their number is not ``expected_train``, if a labeled image is not in
    train2017, or if the count does not come out as ``train - labeled``. Returns
    ``{split: unlabeled count}``.
    """
    train = sorted(set(train_images))
    if expected_train is not None and len(train) != expected_train:
        raise PrepareError(
            f"train2017 holds {len(train)} images, expected {expected_train}: the extraction is "
            "incomplete; re-run prepare_coco.py"
        )
    all_lines = {coco_line(name): name for name in train}
    counts = {}
    for labeled_path in sorted(Path(splits_dir).glob("*/labeled.txt")):
        labeled = set(read_lines(labeled_path))
        stray = sorted(labeled - all_lines.keys())
        if stray:
            raise PrepareError(
                f"{labeled_path} names {len(stray)} image(s) not in train2017, e.g. {stray[0]!r}: "
                "the split does not match this COCO release; re-fetch the splits"
            )
        unlabeled = [line for line in all_lines if line not in labeled]
        if len(unlabeled) != len(train) - len(labeled):
            raise PrepareError(f"{labeled_path} has duplicate lines; re-fetch the splits")
        atomic_write_text(labeled_path.with_name("unlabeled.txt"), "\n".join(unlabeled) + "\n")
        counts[labeled_path.parent.name] = len(unlabeled)
    return counts


def build_parser() -> argparse.ArgumentParser:
    """Command-line options of ``data_scripts/fetch_splits.py``."""
    parser = argparse.ArgumentParser(
        description="Fetch the BRPG split lists at a pinned commit, verify their SHA-256 and "
        "write them to DATA_ROOT/splits/. COCO unlabeled lists are derived by prepare_coco.py "
        "(or here, if DATA_ROOT/coco/train2017 already exists)."
    )
    parser.add_argument("--data-root", type=Path, default=Path("data"), help="default: ./data")
    parser.add_argument(
        "--base-url",
        default=None,
        help=f"URL of the folder holding pascal/, cityscapes/, coco/ (default: {DEFAULT_BASE_URL})",
    )
    parser.add_argument(
        "--from-dir",
        type=Path,
        default=None,
        help="copy the lists from a local folder (e.g. ../shared/splits) instead of downloading",
    )
    parser.add_argument(
        "--datasets", nargs="+", default=list(DATASETS), choices=DATASETS, help="default: all"
    )
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of ``data_scripts/fetch_splits.py``."""
    args = build_parser().parse_args(argv)
    fetch_splits(
        args.data_root, base_url=args.base_url, from_dir=args.from_dir, datasets=args.datasets
    )
    train_dir = args.data_root / "coco" / "train2017"
    if "coco" in args.datasets:
        if train_dir.is_dir():
            counts = derive_coco_unlabeled(
                args.data_root / "splits" / "coco", (p.name for p in train_dir.glob("*.jpg"))
            )
            log.info("COCO unlabeled lists derived: %s", counts)
        else:
            log.info(
                "COCO unlabeled lists will be derived by prepare_coco.py (%s absent)", train_dir
            )
