"""Data: split-list datasets, joint transforms, resampling and the DigitScenes benchmark (appendix: data)."""

from brpg.data.digits import (
    APPEARANCE_MODES,
    DIGIT_CLASSES,
    MULTIMODAL_DIGITS,
    PALETTE,
    DigitKnobs,
    build_digit_datasets,
    colorize,
    ensure_digit_scenes,
)
from brpg.data.sampling import oversample, oversample_indices
from brpg.data.splitlist import DatasetError, SplitListDataset, read_split_file
from brpg.data.transforms import (
    SegTransform,
    build_eval_transform,
    build_train_transform,
)

__all__ = [
    "APPEARANCE_MODES",
    "DIGIT_CLASSES",
    "MULTIMODAL_DIGITS",
    "PALETTE",
    "DatasetError",
    "DigitKnobs",
    "SegTransform",
    "SplitListDataset",
    "build_digit_datasets",
    "build_eval_transform",
    "build_train_transform",
    "colorize",
    "ensure_digit_scenes",
    "oversample",
    "oversample_indices",
    "read_split_file",
]
