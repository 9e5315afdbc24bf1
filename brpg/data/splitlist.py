"""A segmentation dataset read from a split list (appendix: data), shared by every benchmark.

A split file holds one item per line, in one of two forms:

* ``<id>`` — one token, filled into ``image_tpl`` / ``mask_tpl`` (PASCAL VOC, DigitScenes):
  ``2007_000032`` -> ``JPEGImages/2007_000032.jpg`` and ``SegmentationClass/2007_000032.png``.
  ``mask_tpl`` may also be a callable ``id -> path``; Cityscapes lines
  (``leftImg8bit/train/x/x_leftImg8bit.png``) use ``image_tpl="{id}"`` and a callable that
  derives the ``gtFine/..._gtFine_labelTrainIds.png`` path.
* ``<image> <mask>`` — two whitespace-separated paths (COCO: ``train2017/x.jpg masks/x.png``).

All paths are relative to ``root``. Blank lines and lines starting with ``#`` are skipped.
Masks are read as class indices (the values of a palette ``P`` or greyscale ``L`` PNG, never
its RGB colours); 255 is the ignore label. Every error names the file at fault and the fix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision import tv_tensors

IGNORE_LABEL = 255
_MASK_MODES = ("P", "L", "I", "I;16", "I;16B", "I;16L")


class DatasetError(ValueError):
    """A dataset file is missing or malformed; the message names the file and the fix."""


PathTemplate = str | Callable[[str], str]


def _fill(tpl: PathTemplate, item_id: str) -> str:
    return tpl(item_id) if callable(tpl) else tpl.format(id=item_id)


def read_split_file(
    split_file: str | Path,
    image_tpl: PathTemplate = "JPEGImages/{id}.jpg",
    mask_tpl: PathTemplate | None = "SegmentationClass/{id}.png",
) -> list[tuple[str, str, str | None]]:
    """Parse a split list into ``(id, image_path, mask_path)`` triples (paths root-relative).

    A one-token line is an id filled into the templates; a two-token line is an explicit
    ``image mask`` pair whose id is the image path. ``mask_tpl=None`` gives ``mask_path=None``
    for id lines (unlabeled lists).
    """
    split_file = Path(split_file)
    if not split_file.is_file():
        raise DatasetError(
            f"split file '{split_file}' does not exist. Check data.*_split (paths are relative "
            f"to data.root) or generate/download the split lists."
        )
    items: list[tuple[str, str, str | None]] = []
    for lineno, raw in enumerate(split_file.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) == 1:
            item_id = parts[0]
            mask = _fill(mask_tpl, item_id) if mask_tpl is not None else None
            items.append((item_id, _fill(image_tpl, item_id), mask))
        elif len(parts) == 2:
            items.append((parts[0], parts[0], parts[1]))
        else:
            raise DatasetError(
                f"{split_file}:{lineno}: expected '<id>' or '<image> <mask>', got {len(parts)} "
                f"fields: {line!r}. Remove the extra fields (paths may not contain spaces)."
            )
    return items


class SplitListDataset(Dataset):
    """Images (and masks) listed in a split file, returned as dicts of tensors.

    ``ds[i]`` is ``{"image": FloatTensor[3,H,W], "mask": LongTensor[H,W], "id": str}`` (no
    ``"mask"`` when ``with_mask=False``). ``transform(image, mask)`` receives a
    ``tv_tensors.Image`` (uint8 [3,H,W]) and a ``tv_tensors.Mask`` (int64 [H,W]) and returns
    the pair (or ``transform(image)`` returns the image when ``with_mask=False``); see
    :mod:`brpg.data.transforms`. Without a transform the image is float in [0, 1].

    Args:
        root: dataset root; every path in the split file is relative to it.
        split_file: the split list; a relative path is taken relative to ``root`` unless it
            exists as given.
        image_tpl, mask_tpl: templates for id lines (``{id}`` is replaced), or callables.
        transform: a joint transform, see above.
        num_classes: when given, mask values must be in ``[0, num_classes)`` or 255.
        with_mask: load masks (False for unlabeled lists; masks may then be absent on disk).
        validate: check at construction that every listed file exists (one ``stat`` each).
        cache: keep every decoded image and mask in memory after its first read (for small
            data sets such as DigitScenes, whose 2,500 decoded scenes take ~40 MB; PNG
            decoding was ~18 % of a DigitScenes step). The arrays returned are the same.
    """

    def __init__(
        self,
        root: str | Path,
        split_file: str | Path,
        image_tpl: PathTemplate = "JPEGImages/{id}.jpg",
        mask_tpl: PathTemplate = "SegmentationClass/{id}.png",
        transform: Callable[..., Any] | None = None,
        num_classes: int | None = None,
        with_mask: bool = True,
        validate: bool = True,
        cache: bool = False,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(
                f"dataset root '{self.root}' does not exist or is not a directory. Set data.root "
                f"to the folder that holds the images (see the dataset's setup notes)."
            )
        split_path = Path(split_file)
        if not split_path.is_absolute() and not split_path.exists():
            split_path = self.root / split_path
        self.split_file = split_path
        self.items = read_split_file(split_path, image_tpl, mask_tpl if with_mask else None)
        self.transform = transform
        self.num_classes = num_classes
        self.with_mask = with_mask
        self._cache: dict[tuple[int, str], np.ndarray] | None = {} if cache else None
        if validate:
            self._check_files_exist()

    @property
    def ids(self) -> list[str]:
        return [item_id for item_id, _, _ in self.items]

    def __len__(self) -> int:
        return len(self.items)

    def _check_files_exist(self) -> None:
        missing: list[str] = []
        for _, image, mask in self.items:
            for rel in (image, mask if self.with_mask else None):
                if rel is not None and not os.path.isfile(self.root / rel):
                    missing.append(rel)
        if missing:
            shown = ", ".join(f"'{self.root / m}'" for m in missing[:3])
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise DatasetError(
                f"{len(missing)} file(s) listed in split file '{self.split_file}' are missing: "
                f"{shown}{more}. Check that data.root points at the dataset and that it is "
                f"complete (or pass validate=False to check lazily)."
            )

    def _open(self, rel: str, kind: str) -> Image.Image:
        path = self.root / rel
        try:
            img = Image.open(path)
            img.load()
        except FileNotFoundError:
            raise DatasetError(
                f"{kind} file '{path}' (listed in '{self.split_file}') does not exist. Restore "
                f"the file or remove its line from the split file."
            ) from None
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise DatasetError(
                f"cannot read {kind} file '{path}' (listed in '{self.split_file}'): {err}. The "
                f"file is corrupt or not an image; re-download/re-generate it."
            ) from err
        return img

    def load_image(self, index: int) -> np.ndarray:
        """The raw image ``index`` as uint8 ``[H,W,3]``."""
        return self._cached(index, "image", self._read_image)

    def _read_image(self, index: int) -> np.ndarray:
        img = self._open(self.items[index][1], "image")
        return np.array(img.convert("RGB"), dtype=np.uint8)

    def _cached(self, index: int, kind: str, read: Callable[[int], np.ndarray]) -> np.ndarray:
        if self._cache is None:
            return read(index)
        key = (index, kind)
        if key not in self._cache:
            self._cache[key] = read(index)
        return self._cache[key].copy()  # a caller that writes into it must not poison the cache

    def load_mask(self, index: int) -> np.ndarray:
        """The raw class-index mask ``index`` as ``[H,W]`` (uint8 for P/L PNGs, int32 for 16/32-bit
        ones), validated against ``num_classes``."""
        return self._cached(index, "mask", self._read_mask)

    def _read_mask(self, index: int) -> np.ndarray:
        rel = self.items[index][2]
        if rel is None:
            raise DatasetError(f"'{self.split_file}' lists no mask for item {self.items[index][0]}")
        img = self._open(rel, "mask")
        path = self.root / rel
        if img.mode not in _MASK_MODES:
            raise DatasetError(
                f"mask '{path}' has PIL mode {img.mode}; masks must store class indices as a "
                f"palette (P) or greyscale (L) PNG, not colours. Convert it to class indices."
            )
        mask_hw = np.array(img)  # uint8 keeps resize/crop cheap (nearest needs no float cast)
        if mask_hw.dtype != np.uint8:
            mask_hw = mask_hw.astype(np.int32)
        if self.num_classes is not None and mask_hw.size and mask_hw.max() >= self.num_classes:
            values = np.unique(mask_hw)
            bad = values[(values >= self.num_classes) & (values != IGNORE_LABEL)]
            if bad.size:
                raise DatasetError(
                    f"mask '{path}' has label values {bad.tolist()[:10]} outside [0, "
                    f"{self.num_classes}) and not the ignore label {IGNORE_LABEL}. Check "
                    f"data.num_classes, or that the mask holds train ids / class indices."
                )
        return mask_hw

    def __getitem__(self, index: int) -> dict[str, Any]:
        item_id = self.items[index][0]
        image_hw3 = self.load_image(index)
        image = tv_tensors.Image(torch.from_numpy(image_hw3).permute(2, 0, 1).contiguous())
        if not self.with_mask:
            out = self.transform(image) if self.transform is not None else image.float() / 255
            return {"image": out.as_subclass(torch.Tensor), "id": item_id}
        mask_hw = self.load_mask(index)
        if mask_hw.shape != image_hw3.shape[:2]:
            raise DatasetError(
                f"mask '{self.root / self.items[index][2]}' is {mask_hw.shape[1]}x"
                f"{mask_hw.shape[0]} (WxH) but image '{self.root / self.items[index][1]}' is "
                f"{image_hw3.shape[1]}x{image_hw3.shape[0]}; they must have the same size."
            )
        mask = tv_tensors.Mask(torch.from_numpy(mask_hw))
        if self.transform is not None:
            image, mask = self.transform(image, mask)
        else:
            image = image.float() / 255
        return {
            "image": image.as_subclass(torch.Tensor),
            "mask": mask.as_subclass(torch.Tensor).long(),
            "id": item_id,
        }

    def __repr__(self) -> str:
        return (
            f"SplitListDataset(root='{self.root}', split='{self.split_file}', n={len(self)}, "
            f"with_mask={self.with_mask})"
        )
