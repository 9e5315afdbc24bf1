"""DigitScenes: a small semantic-segmentation benchmark that trains on a CPU in minutes.

Each scene is a ``size x size`` RGB image (default 64 x 64) with 2-4 handwritten digits from
``sklearn.datasets.load_digits`` (1,797 real 8 x 8 scans, shipped inside scikit-learn, so
nothing is downloaded) on a textured background. There are 11 classes: 0 = background and
``k + 1`` = digit ``k`` (:data:`DIGIT_CLASSES`).

How a scene is drawn (:func:`render_scene`), all from one seeded numpy ``Generator``:

1. The background is a random *paint*: a flat colour, gradient, stripes, checker board or
   smooth colour noise (:data:`PAINT_KINDS`), so colour alone never identifies a class.
2. Distractors (``distractors`` knob): random scribbles, blobs and rings, painted into the
   background and labeled 0, so "any stroke is a digit" is wrong.
3. Digits: each glyph is padded by one pixel, upsampled bicubically to ``glyph_size`` pixels
   (with a random aspect ratio, ``aspect_jitter``), and thresholded at ``stroke_threshold``
   into a shape with soft (anti-aliased) edges.
   It is painted with a random paint whose base colour differs from what lies under it by at
   least ``min_contrast``. Later digits are drawn over earlier ones (occlusion); the mask
   follows the visible digit, and a placement is rejected if it hides more than
   ``occlusion`` of an earlier digit.
4. Boundary pixels are **labeled** (version 3): a pixel belongs to a digit where the digit's
   soft coverage is at least 0.5, and its RGB value is the anti-aliased mix of the digit's and
   the background's paint, so pixels at an edge are genuinely ambiguous and both trained on
   and evaluated. An optional VOC-style ignore band (``ignore_band=r``: pixels whose
   ``(2r+1) x (2r+1)`` neighbourhood holds another label become 255) is kept as a knob; it is
   off by default because on 64-px scenes of thin strokes the 1-px band (version 2's default)
   covered ~14 % of all label pixels and about half of each digit, exactly the pixels BRPG's
   low-confidence prototypes are about.
5. Gaussian pixel noise (``noise_std``).

All knobs, with their defaults, are the fields of :class:`DigitKnobs`; they are keyword
arguments of :func:`ensure_digit_scenes` and part of the cache key.

**Multi-modal classes** (what the paper's APO is for, appendix: clustering and APO). The digits in
:data:`MULTIMODAL_DIGITS` (1, 4 and 7, i.e. classes 2, 5 and 8) are drawn in one of the first
``n_modes`` :data:`APPEARANCE_MODES`, chosen uniformly per instance; every other digit is
always ``"solid"``:

* ``"solid"``: the glyph filled with its paint;
* ``"hollow"``: a bolder glyph whose outline ring (about ``glyph_size / 12`` pixels) is
  painted while its inside shows what lies beneath; the mask covers the whole glyph
  (outline and inside), like a hollow font;
* ``"bold"`` (only with ``n_modes=3``): a much thicker stroke.

The 1,797 source digits are split once (by ``seed``) into disjoint train/val pools
(``train_fraction``), so val scenes contain handwriting never seen in training.

**Cache** (:func:`ensure_digit_scenes`), in the PASCAL VOC layout::

    root/JPEGImages/{id}.png           RGB images; lossless PNG (not JPEG, despite the folder
                                       name) so the pixels are exactly what was generated
    root/SegmentationClass/{id}.png    palette PNGs, VOC colours (:data:`PALETTE`), 255 ignore
    root/splits/train.txt, val.txt     ids train_00000..., val_00000...
    root/splits/{1_16,1_8,1_4,1_2,full}/labeled.txt, unlabeled.txt
    root/meta.json                     generation parameters + version (the cache key)
    root/annotations.json              source pools and per-scene instances (digit, mode, box)

Labeled subsets are nested (1/16 ⊂ 1/8 ⊂ 1/4 ⊂ 1/2 ⊂ full, ``max(1, n // d)`` scenes);
unlabeled is the rest of the train scenes (empty for ``full``). Read it back with
:class:`~brpg.data.splitlist.SplitListDataset` (:func:`build_digit_datasets`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from brpg import distributed
from brpg.config import DataConfig
from brpg.data.splitlist import DatasetError, SplitListDataset
from brpg.data.transforms import build_eval_transform, build_train_transform
from brpg.prepare.label_png import voc_colour_map

GENERATOR_VERSION = 3  # 3: boundary pixels labeled (ignore_band 0); 2: 1-px 255 band
NUM_CLASSES = 11
IGNORE_LABEL = 255
DIGIT_CLASSES: tuple[str, ...] = ("background", *(str(k) for k in range(10)))
APPEARANCE_MODES: tuple[str, ...] = ("solid", "hollow", "bold")
MULTIMODAL_DIGITS: tuple[int, ...] = (1, 4, 7)  # digits; their class ids are k + 1
PAINT_KINDS: tuple[str, ...] = ("flat", "gradient", "stripes", "checker", "noise")
SPLIT_FRACTIONS: dict[str, int] = {"1_16": 16, "1_8": 8, "1_4": 4, "1_2": 2, "full": 1}
IMAGE_TPL = "JPEGImages/{id}.png"
MASK_TPL = "SegmentationClass/{id}.png"


PALETTE: np.ndarray = voc_colour_map()  # [256, 3] uint8; class c -> PALETTE[c]


def colorize(mask: Any) -> np.ndarray:
    """Class-index mask ``[..., H, W]`` (numpy or torch) -> uint8 RGB ``[..., H, W, 3]``."""
    if hasattr(mask, "detach"):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.size and (mask.min() < 0 or mask.max() > 255):
        raise ValueError(f"colorize expects labels in [0, 255], got [{mask.min()}, {mask.max()}]")
    return PALETTE[mask.astype(np.intp)]


@dataclass(frozen=True)
class DigitKnobs:
    """Difficulty knobs of DigitScenes (all part of the cache key)."""

    digits_per_scene: tuple[int, int] = (2, 4)  # inclusive range
    glyph_size: tuple[int, int] = (20, 32)  # height in px of the 8x8 glyph area, inclusive
    aspect_jitter: float = 0.15  # width = height * U(1 - j, 1 + j)
    occlusion: float = 0.2  # max fraction of an earlier digit a later one may hide (0: none)
    texture_strength: float = 0.3  # how far a paint's 2nd colour moves from its base (0: flat)
    noise_std: float = 0.03  # Gaussian pixel noise, in [0, 1] intensity units
    stroke_threshold: float = 0.35  # glyph intensity (0..1) above which a pixel is ink
    ignore_band: int = 0  # radius of a VOC-style 255 band around label edges (0: none; 1: v2's)
    min_contrast: float = 0.3  # min RGB distance / sqrt(3) between a digit and what is under it
    mode_digits: tuple[int, ...] = MULTIMODAL_DIGITS  # digits drawn in several modes
    n_modes: int = 2  # the first n of APPEARANCE_MODES are used for mode_digits (1: all solid)
    distractors: tuple[int, int] = (0, 2)  # scribbles / blobs / rings per scene, inclusive
    train_fraction: float = 0.75  # share of the 1,797 source digits in the train pool

    def __post_init__(self) -> None:
        lo, hi = self.digits_per_scene
        if not 1 <= lo <= hi:
            raise ValueError(f"digits_per_scene must be 1 <= lo <= hi, got {(lo, hi)}")
        if not 6 <= self.glyph_size[0] <= self.glyph_size[1]:
            raise ValueError(f"glyph_size must be 6 <= lo <= hi, got {self.glyph_size}")
        if not 1 <= self.n_modes <= len(APPEARANCE_MODES):
            raise ValueError(f"n_modes must be in 1..{len(APPEARANCE_MODES)}, got {self.n_modes}")
        if not 0 <= self.occlusion <= 1:
            raise ValueError(f"occlusion must be in [0, 1], got {self.occlusion}")
        if not 0 < self.stroke_threshold < 1:
            raise ValueError(f"stroke_threshold must be in (0, 1), got {self.stroke_threshold}")
        if not 0 < self.train_fraction < 1:
            raise ValueError(f"train_fraction must be in (0, 1), got {self.train_fraction}")
        if any(not 0 <= d <= 9 for d in self.mode_digits):
            raise ValueError(f"mode_digits must be digits 0..9, got {self.mode_digits}")

    @classmethod
    def make(cls, **knobs: Any) -> DigitKnobs:
        """Build from keyword arguments; an unknown name raises ``TypeError`` listing the valid ones."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(knobs) - set(names))
        if unknown:
            raise TypeError(f"unknown DigitScenes knob(s) {unknown}; valid knobs: {names}")
        fixed = {k: tuple(v) if isinstance(v, list) else v for k, v in knobs.items()}
        return cls(**fixed)


# ----------------------------------------------------------------------------- source digits


@dataclass
class DigitPool:
    """Source glyphs of one split: ``glyphs`` float32 [N, 8, 8] in [0, 1], ``digits`` [N],
    ``source`` [N] (indices into ``load_digits``), ``by_digit[k]`` (positions of digit k)."""

    glyphs: np.ndarray
    digits: np.ndarray
    source: np.ndarray
    by_digit: list[np.ndarray]


def source_pools(seed: int, train_fraction: float = 0.75) -> dict[str, DigitPool]:
    """Split the 1,797 ``load_digits`` scans into disjoint ``train`` / ``val`` pools."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # [1797, 8, 8]
    perm = np.random.default_rng([seed, 7919]).permutation(len(images))
    n_train = int(round(train_fraction * len(images)))
    pools = {}
    for name, idx in (("train", perm[:n_train]), ("val", perm[n_train:])):
        idx = np.sort(idx)
        digits = data.target[idx].astype(np.int64)
        pools[name] = DigitPool(
            images[idx], digits, idx, [np.flatnonzero(digits == k) for k in range(10)]
        )
    return pools


# ----------------------------------------------------------------------------- painting


def paint(
    rng: np.random.Generator, h: int, w: int, base: np.ndarray, strength: float
) -> np.ndarray:
    """A random texture ``[h, w, 3]`` mixing colour ``base`` with a second colour that is
    ``strength`` of the way from ``base`` to a random colour (:data:`PAINT_KINDS`)."""
    kind = PAINT_KINDS[rng.integers(len(PAINT_KINDS))]
    other = base + strength * (rng.random(3) - base)
    yy = np.arange(h, dtype=np.float32)[:, None]  # [h, 1]
    xx = np.arange(w, dtype=np.float32)[None, :]  # [1, w]
    theta = rng.uniform(0, np.pi)
    proj = np.cos(theta) * xx + np.sin(theta) * yy  # [h, w]
    if kind == "flat":
        return np.broadcast_to(base.astype(np.float32), (h, w, 3)).copy()
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(np.ptp(proj)), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(3, 9)
        t = (((proj / period + rng.random()) % 1.0) < 0.5).astype(np.float32)
    elif kind == "checker":
        p = int(rng.integers(2, 8))
        oy, ox = rng.integers(0, p, size=2)
        t = (((yy + oy) // p + (xx + ox) // p) % 2).astype(np.float32)
    else:  # smooth colour noise: a coarse random grid, upsampled bilinearly
        k = int(rng.integers(3, 9))
        coarse = rng.random((k, k)).astype(np.float32)
        t = np.asarray(Image.fromarray(coarse, "F").resize((w, h), Image.BILINEAR))
    t = t[..., None]  # [h, w, 1]
    return (base * (1 - t) + other * t).astype(np.float32)


def _blend(canvas: np.ndarray, alpha: np.ndarray, colour: np.ndarray) -> None:
    """In place: ``canvas = canvas * (1 - alpha) + colour * alpha`` (alpha [h, w])."""
    a = alpha[..., None]
    canvas *= 1 - a
    canvas += colour * a


def _soft(value: np.ndarray, threshold: float, width: float = 0.08) -> np.ndarray:
    """Anti-aliased step: 0 below ``threshold - width/2``, 1 above ``threshold + width/2``."""
    return np.clip((value - threshold) / width + 0.5, 0.0, 1.0).astype(np.float32)


_DISK = ndimage.generate_binary_structure(2, 1)  # 4-connected cross


def glyph_alpha(
    glyph_8x8: np.ndarray, h: int, w: int, mode: str = "solid", threshold: float = 0.35
) -> tuple[np.ndarray, np.ndarray]:
    """Render one glyph: ``(alpha [H, W] float32, region [H, W] bool)`` with ``H ≈ h * 10/8``.

    The 8 x 8 glyph (values in [0, 1]) is padded by one pixel and upsampled bicubically, so the
    glyph area becomes ``h x w``. ``region`` is the label area; ``alpha`` is the painted
    coverage (equal to the region up to soft edges, except inside a ``"hollow"`` glyph).
    """
    g = np.pad(glyph_8x8.astype(np.float32), 1)  # [10, 10]
    H, W = max(3, round(h * 10 / 8)), max(3, round(w * 10 / 8))
    up = np.asarray(Image.fromarray(g, "F").resize((W, H), Image.BICUBIC))  # [H, W]
    # hollow glyphs are a little bolder (room for an inside), bold ones much bolder
    threshold = {"solid": 0.0, "hollow": -0.1, "bold": -0.22}[mode] + threshold
    alpha = _soft(up, max(threshold, 0.05))
    region = alpha >= 0.5
    if mode == "hollow":
        ring = max(1, round(h / 12))
        inner = ndimage.binary_erosion(region, _DISK, iterations=ring)
        alpha = np.where(inner, 0.0, alpha).astype(np.float32)
    return alpha, region


def _scribble_alpha(rng: np.random.Generator, size: int) -> np.ndarray:
    """A random quadratic Bezier stroke ``[size, size]``, 1.5-4 px thick."""
    p = rng.uniform(-0.1 * size, 1.1 * size, size=(3, 2))  # control points (y, x)
    t = np.linspace(0, 1, 48)[:, None]
    pts = (1 - t) ** 2 * p[0] + 2 * (1 - t) * t * p[1] + t**2 * p[2]  # [48, 2]
    grid = np.arange(size, dtype=np.float32)
    d2 = (grid[None, :, None] - pts[:, 0, None, None]) ** 2 + (
        grid[None, None, :] - pts[:, 1, None, None]
    ) ** 2  # [48, size, size]
    dist = np.sqrt(d2.min(axis=0))
    radius = rng.uniform(0.75, 2.0)
    return np.clip(radius - dist + 0.5, 0, 1).astype(np.float32)


def _blob_alpha(rng: np.random.Generator, size: int, ring: bool) -> np.ndarray:
    """A random rotated ellipse (or elliptical ring) ``[size, size]``."""
    cy, cx = rng.uniform(0, size, size=2)
    ry, rx = rng.uniform(0.05 * size, 0.18 * size, size=2)
    th = rng.uniform(0, np.pi)
    yy = np.arange(size, dtype=np.float32)[:, None] - cy
    xx = np.arange(size, dtype=np.float32)[None, :] - cx
    u = (np.cos(th) * xx + np.sin(th) * yy) / rx
    v = (-np.sin(th) * xx + np.cos(th) * yy) / ry
    r = np.sqrt(u**2 + v**2) * min(rx, ry)  # approx. distance-like radius in px
    edge = min(rx, ry)
    if ring:
        width = rng.uniform(1.0, 2.5)
        return np.clip(width / 2 - np.abs(r - edge) + 0.5, 0, 1).astype(np.float32)
    return np.clip(edge - r + 0.5, 0, 1).astype(np.float32)


def _random_colour(rng: np.random.Generator, under: np.ndarray, min_contrast: float) -> np.ndarray:
    """A random RGB colour at least ``min_contrast`` (RGB distance / sqrt 3) from ``under``."""
    best, best_d = None, -1.0
    for _ in range(12):
        c = rng.random(3)
        d = float(np.linalg.norm(c - under)) / np.sqrt(3)
        if d >= min_contrast:
            return c
        if d > best_d:
            best, best_d = c, d
    return best  # type: ignore[return-value]


def boundary_band(label_hw: np.ndarray, radius: int = 1) -> np.ndarray:
    """Pixels whose ``(2r+1) x (2r+1)`` neighbourhood (edge-replicated) holds another label,
    bool [H, W]; ``radius=1`` is the 3 x 3 test (a 1-pixel band on each side of an edge)."""
    if radius <= 0:
        return np.zeros(label_hw.shape, dtype=bool)
    padded = np.pad(label_hw, radius, mode="edge")
    h, w = label_hw.shape
    n = 2 * radius + 1
    shifts = [padded[dy : dy + h, dx : dx + w] for dy in range(n) for dx in range(n)]
    stack = np.stack(shifts)  # [n*n, H, W]
    return stack.min(axis=0) != stack.max(axis=0)


# ----------------------------------------------------------------------------- one scene


def render_scene(
    rng: np.random.Generator, pool: DigitPool, size: int, knobs: DigitKnobs
) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]]]:
    """Draw one scene: ``(image [size, size, 3] uint8, mask [size, size] uint8, instances)``.

    ``instances`` lists the digits actually placed: source index, digit, mode, box
    ``[top, left, h, w]`` and glyph area in pixels (before occlusion and the boundary band).
    """
    k = knobs
    canvas = paint(rng, size, size, rng.random(3), k.texture_strength)  # [H, W, 3]
    for _ in range(int(rng.integers(k.distractors[0], k.distractors[1] + 1))):
        kind = rng.integers(3)
        alpha = _scribble_alpha(rng, size) if kind == 0 else _blob_alpha(rng, size, kind == 2)
        _blend(canvas, alpha, paint(rng, size, size, rng.random(3), k.texture_strength))

    label = np.zeros((size, size), dtype=np.uint8)  # [H, W]
    owner = np.full((size, size), -1, dtype=np.int16)  # instance id of each pixel
    areas: list[int] = []
    instances: list[dict[str, Any]] = []
    for _ in range(int(rng.integers(k.digits_per_scene[0], k.digits_per_scene[1] + 1))):
        digit = int(rng.integers(10))
        pos = int(rng.choice(pool.by_digit[digit]))
        mode = "solid"
        if digit in k.mode_digits and k.n_modes > 1:
            mode = APPEARANCE_MODES[int(rng.integers(k.n_modes))]
        gh = int(rng.integers(k.glyph_size[0], k.glyph_size[1] + 1))
        gw = max(6, round(gh * rng.uniform(1 - k.aspect_jitter, 1 + k.aspect_jitter)))
        alpha, region = glyph_alpha(pool.glyphs[pos], gh, gw, mode, k.stroke_threshold)
        h, w = region.shape
        if h > size or w > size:
            continue
        placed = None
        visible = np.bincount(owner[owner >= 0], minlength=len(areas))  # per earlier digit
        for _try in range(30):
            top, left = int(rng.integers(0, size - h + 1)), int(rng.integers(0, size - w + 1))
            hidden = owner[top : top + h, left : left + w][region]
            hidden = np.bincount(hidden[hidden >= 0], minlength=len(areas))
            if all(
                visible[i] - hidden[i] >= (1 - k.occlusion) * areas[i] for i in range(len(areas))
            ):
                placed = (top, left)
                break
        if placed is None:
            continue
        top, left = placed
        box = (slice(top, top + h), slice(left, left + w))
        under = canvas[box][region].mean(axis=0)
        colour = paint(rng, h, w, _random_colour(rng, under, k.min_contrast), k.texture_strength)
        _blend(canvas[box], alpha, colour)
        label[box][region] = digit + 1
        owner[box][region] = len(areas)
        areas.append(int(region.sum()))
        instances.append(
            {
                "source": int(pool.source[pos]),
                "digit": digit,
                "mode": mode,
                "box": [top, left, h, w],
                "area": areas[-1],
            }
        )
    label[boundary_band(label, k.ignore_band)] = IGNORE_LABEL
    if k.noise_std > 0:
        canvas += rng.normal(0.0, k.noise_std, size=canvas.shape).astype(np.float32)
    image = (np.clip(canvas, 0, 1) * 255 + 0.5).astype(np.uint8)
    return image, label, instances


def save_mask_png(mask_hw: np.ndarray, path: str | Path) -> None:
    """Write a uint8 class-index mask as a palette PNG with the VOC colours."""
    im = Image.fromarray(mask_hw.astype(np.uint8))
    im.putpalette(PALETTE.reshape(-1).tolist())  # L -> P, values unchanged
    im.save(path, format="PNG")


# ----------------------------------------------------------------------------- the cache


def _params(seed: int, n_train: int, n_val: int, size: int, knobs: DigitKnobs) -> dict[str, Any]:
    params = {
        "version": GENERATOR_VERSION,
        "seed": seed,
        "n_train": n_train,
        "n_val": n_val,
        "size": size,
        "knobs": dataclasses.asdict(knobs),
    }
    return json.loads(json.dumps(params))  # tuples -> lists, as read back from disk


def _scene_ids(split: str, n: int) -> list[str]:
    return [f"{split}_{i:05d}" for i in range(n)]


def _render_chunk(
    args: tuple[Path, str, DigitPool, list[int], int, int, DigitKnobs],
) -> dict[str, list[dict[str, Any]]]:
    out_dir, split, pool, indices, seed, size, knobs = args
    code = {"train": 0, "val": 1}[split]
    records = {}
    for i in indices:
        scene_id = f"{split}_{i:05d}"
        rng = np.random.default_rng([seed, code, i])  # one stream per scene: order-free
        image, mask, instances = render_scene(rng, pool, size, knobs)
        Image.fromarray(image).save(out_dir / IMAGE_TPL.format(id=scene_id), format="PNG")
        save_mask_png(mask, out_dir / MASK_TPL.format(id=scene_id))
        records[scene_id] = instances
    return records


def labeled_splits(train_ids: list[str], seed: int) -> dict[str, tuple[list[str], list[str]]]:
    """Nested ``{name: (labeled, unlabeled)}`` for :data:`SPLIT_FRACTIONS`.

    One seeded permutation is cut at ``max(1, n // d)``, so 1/16 ⊂ 1/8 ⊂ 1/4 ⊂ 1/2 ⊂ full;
    unlabeled is the rest of ``train_ids``. Both lists keep the order of ``train_ids``.
    """
    n = len(train_ids)
    order = np.random.default_rng([seed, 104729]).permutation(n)
    out = {}
    for name, denom in SPLIT_FRACTIONS.items():
        chosen = np.zeros(n, dtype=bool)
        chosen[order[: n if denom == 1 else max(1, n // denom)]] = True
        out[name] = (
            [train_ids[i] for i in np.flatnonzero(chosen)],
            [train_ids[i] for i in np.flatnonzero(~chosen)],
        )
    return out


def _write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{line}\n" for line in lines))


def generate_digit_scenes(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    size: int = 64,
    knobs: DigitKnobs | None = None,
    workers: int = 1,
) -> Path:
    """Render the whole benchmark into ``out_dir`` (no caching; see :func:`ensure_digit_scenes`).

    The output depends only on the arguments (not on ``workers``): scene ``i`` of a split is
    drawn from its own ``Generator([seed, split, i])``. ``meta.json`` is written last.
    """
    knobs = knobs or DigitKnobs()
    out = Path(out_dir)
    (out / "JPEGImages").mkdir(parents=True, exist_ok=True)
    (out / "SegmentationClass").mkdir(parents=True, exist_ok=True)
    pools = source_pools(seed, knobs.train_fraction)
    jobs = []
    for split, n in (("train", n_train), ("val", n_val)):
        chunks = max(1, min(workers * 4, n // 50))
        jobs += [
            (out, split, pools[split], idx.tolist(), seed, size, knobs)
            for idx in np.array_split(np.arange(n), chunks)
        ]
    records: dict[str, list[dict[str, Any]]] = {}
    if workers > 1:
        import multiprocessing as mp

        with mp.get_context("fork").Pool(workers) as pool:
            for rec in pool.imap(_render_chunk, jobs):
                records.update(rec)
    else:
        for job in jobs:
            records.update(_render_chunk(job))

    train_ids, val_ids = _scene_ids("train", n_train), _scene_ids("val", n_val)
    _write_lines(out / "splits" / "train.txt", train_ids)
    _write_lines(out / "splits" / "val.txt", val_ids)
    split_sizes = {}
    for name, (labeled, unlabeled) in labeled_splits(train_ids, seed).items():
        _write_lines(out / "splits" / name / "labeled.txt", labeled)
        _write_lines(out / "splits" / name / "unlabeled.txt", unlabeled)
        split_sizes[name] = len(labeled)
    annotations = {
        "source_pools": {name: p.source.tolist() for name, p in pools.items()},
        "scenes": {key: records[key] for key in sorted(records)},
    }
    (out / "annotations.json").write_text(json.dumps(annotations, separators=(",", ":")))
    meta = {
        "name": "DigitScenes",
        "params": _params(seed, n_train, n_val, size, knobs),
        "num_classes": NUM_CLASSES,
        "classes": list(DIGIT_CLASSES),
        "ignore_label": IGNORE_LABEL,
        "image_tpl": IMAGE_TPL,
        "mask_tpl": MASK_TPL,
        "labeled_sizes": split_sizes,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1))
    return out


def _cache_ok(root: Path, params: dict[str, Any]) -> bool:
    """True if ``root`` holds a complete cache generated with exactly ``params``."""
    try:
        meta = json.loads((root / "meta.json").read_text())
    except (OSError, ValueError):
        return False
    if meta.get("params") != params:
        return False
    needed = [root / "splits" / "train.txt", root / "splits" / "val.txt", root / "annotations.json"]
    needed += [
        root / "splits" / s / f for s in SPLIT_FRACTIONS for f in ("labeled.txt", "unlabeled.txt")
    ]
    if not all(p.is_file() for p in needed):
        return False
    for split in ("train", "val"):
        for scene_id in (root / "splits" / f"{split}.txt").read_text().split():
            if not (root / IMAGE_TPL.format(id=scene_id)).is_file():
                return False
            if not (root / MASK_TPL.format(id=scene_id)).is_file():
                return False
    return True


def ensure_digit_scenes(
    root: str | Path,
    seed: int = 0,
    n_train: int = 2000,
    n_val: int = 500,
    size: int = 64,
    *,
    workers: int | None = None,
    **knobs: Any,
) -> Path:
    """Return ``root`` holding DigitScenes for these parameters, generating it if needed.

    Regenerates only when ``root/meta.json`` records different parameters (or version) or a
    file is missing. Generation writes into a temporary sibling folder that is renamed into
    place, so an interrupted run never leaves a half-written cache. ``knobs`` are the fields
    of :class:`DigitKnobs`; ``workers`` (default: up to 2 processes) does not change the output.
    """
    root = Path(root)
    k = DigitKnobs.make(**knobs)
    params = _params(seed, n_train, n_val, size, k)
    if _cache_ok(root, params):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with distributed.exclusive_lock(root):
        if _cache_ok(root, params):  # another process finished it meanwhile
            return root
        if root.exists() and any(root.iterdir()) and not (root / "meta.json").exists():
            raise DatasetError(
                f"'{root}' exists and is not a DigitScenes cache (no meta.json); refusing to "
                f"overwrite it. Point data.root at an empty or new folder."
            )
        if workers is None:
            workers = min(2, os.cpu_count() or 1) if n_train + n_val >= 400 else 1
        tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            generate_digit_scenes(tmp, seed, n_train, n_val, size, k, workers)
            if root.exists():
                old = root.parent / f".{root.name}.old-{os.getpid()}"
                shutil.rmtree(old, ignore_errors=True)
                root.rename(old)
                tmp.rename(root)
                shutil.rmtree(old, ignore_errors=True)
            else:
                tmp.rename(root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def scenes_fingerprint(root: str | Path) -> str:
    """SHA-256 (first 16 hex digits) of a DigitScenes cache's *decoded* pixels and split lists.

    Two caches with the same fingerprint train and score identically, whatever machine generated
    them (file bytes are not hashed: another zlib could compress the same pixels differently).
    Run summaries record it, so that a study spread over machines and sessions can check that
    every run saw the same scenes. Reads every scene once (about a second for 2,500 scenes).
    """
    root = Path(root)
    h = hashlib.sha256()
    for split in sorted(p.relative_to(root) for p in (root / "splits").rglob("*.txt")):
        h.update(str(split).encode() + b"\0" + (root / split).read_bytes())
    for split in ("train", "val"):
        for scene_id in (root / "splits" / f"{split}.txt").read_text().split():
            for tpl in (IMAGE_TPL, MASK_TPL):
                with Image.open(root / tpl.format(id=scene_id)) as im:
                    pixels = np.asarray(im)
                h.update(scene_id.encode() + str(pixels.shape).encode() + pixels.tobytes())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- datasets


def digit_dataset(
    root: str | Path, split_file: str, transform: Any = None, with_mask: bool = True
) -> SplitListDataset:
    """A :class:`SplitListDataset` over a DigitScenes cache (``split_file`` relative to root)."""
    return SplitListDataset(
        root,
        split_file,
        image_tpl=IMAGE_TPL,
        mask_tpl=MASK_TPL,
        transform=transform,
        num_classes=NUM_CLASSES,
        with_mask=with_mask,
        cache=True,  # 2,500 decoded 64-px scenes are ~40 MB; decoding PNGs was ~18 % of a step
    )


def build_digit_datasets(
    cfg: DataConfig,
    train_transform: Any = None,
    unlabeled_transform: Any = None,
    eval_transform: Any = None,
    unlabeled_with_mask: bool = False,
    **knobs: Any,
) -> tuple[SplitListDataset, SplitListDataset, SplitListDataset]:
    """``(labeled, unlabeled, val)`` DigitScenes datasets for ``cfg`` (generated if needed).

    Uses ``cfg.root``, ``cfg.digits_{seed,train,val,size}`` and the split paths
    ``cfg.{labeled,unlabeled,val}_split``. Transforms default to
    :func:`build_train_transform` (labeled and unlabeled) and :func:`build_eval_transform`.
    The unlabeled set is empty for the ``full`` split; it carries masks only if
    ``unlabeled_with_mask`` (for diagnostics such as pseudo-label accuracy).
    """
    if cfg.num_classes != NUM_CLASSES:
        raise DatasetError(
            f"DigitScenes has {NUM_CLASSES} classes but data.num_classes={cfg.num_classes}; "
            f"set data.num_classes={NUM_CLASSES}."
        )
    root = ensure_digit_scenes(
        cfg.root, cfg.digits_seed, cfg.digits_train, cfg.digits_val, cfg.digits_size, **knobs
    )
    train_t = train_transform or build_train_transform(cfg)
    labeled = digit_dataset(root, cfg.labeled_split, train_t)
    unlabeled = digit_dataset(
        root, cfg.unlabeled_split, unlabeled_transform or train_t, with_mask=unlabeled_with_mask
    )
    val = digit_dataset(root, cfg.val_split, eval_transform or build_eval_transform(cfg))
    return labeled, unlabeled, val
