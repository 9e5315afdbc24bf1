"""Typed experiment configuration loaded from YAML.

Every experiment is one :class:`Config` made of small dataclasses. YAML files in
``brpg/configs/`` are presets; ``load_config`` reads a preset name or a path, and
``--set key.path=value`` overrides single fields. Unknown keys are errors that name the key
and the closest valid one, so a typo never silently falls back to a default. Numeric fields
are range-checked when the config is loaded (:data:`_RANGES`: steps and batch sizes >= 1,
thresholds in [0, 1], momenta in [0, 1), temperatures > 0, …); the error names the key, the
value and the allowed range.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

PRESET_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message says what and how to fix it."""


@dataclass
class DataConfig:
    """Dataset and augmentation (appendix: data)."""

    name: str = "digits"  # digits | pascal | cityscapes | coco
    root: str = "data/digits"
    labeled_split: str = "splits/1_16/labeled.txt"  # split list, relative to root
    unlabeled_split: str = "splits/1_16/unlabeled.txt"
    val_split: str = "splits/val.txt"
    num_classes: int = 11
    crop_size: int = 64
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = False  # wrong for digits (a flipped 2 is not a 2); True for VOC/Cityscapes/COCO
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    ignore_index: int = 255
    pad_label: int = 255  # the official code pads labels with 0 (appendix Q6); 255 is correct
    num_workers: int = 0
    # DigitScenes generation (only used when name == "digits")
    digits_seed: int = 0
    digits_size: int = 64
    digits_train: int = 2000
    digits_val: int = 500
    digits_knobs: dict[str, Any] = field(default_factory=dict)  # DigitKnobs fields (brpg.data)


@dataclass
class ModelConfig:
    """DeepLabV3+ encoder/decoder (appendix: configurations)."""

    backbone: str = "small"  # small | resnet50 | resnet101 | xception65
    output_stride: int = 8
    deep_stem: bool = True
    multi_grid: bool = True
    zero_init_residual: bool = True
    aspp_rates: tuple[int, ...] = (12, 24, 36)
    decoder_channels: int = 256
    rep_dim: int = 256
    rep_head: bool = True
    dropout: float = 0.1
    width: int = 32  # base width of the small CPU backbone
    pretrained: str | None = None  # path to an ImageNet state dict; nothing is downloaded


@dataclass
class OptimConfig:
    """Optimiser and poly schedule (appendix: optimiser)."""

    name: str = "sgd"  # sgd | adamw
    lr: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 1e-4
    head_lr_mult: float = 10.0
    poly_power: float = 0.9
    warmup_steps: int = 0
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class LossConfig:
    """Supervised loss: ce_weight * CE + ohem_weight * OHEM-CE (appendix: one step)."""

    ce_weight: float = 0.5
    ohem_weight: float = 0.5
    ohem_thresh: float = 0.7
    ohem_min_kept: int = 100_000  # <= 0: no filtering, plain CE (as officially)


@dataclass
class TrainConfig:
    """Loop length, batch, precision, logging and checkpoint cadence."""

    # suponly: the supervised baseline; meanteacher (U2PL/BRPG's EMA teacher, appendix: one step) or
    # unimatch (brpg.frameworks.unimatch): a semi-supervised framework after the warm-up
    framework: Literal["suponly", "meanteacher", "unimatch"] = "suponly"
    brpg: bool = False  # attach the BRPG plug-in (CPG, APO, prototype EMA, L_pro) to the framework
    steps: int = 1000
    batch_size: int = 16
    # micro-batches of train.batch_size per optimiser step; the effective batch per process is
    # batch_size * grad_accum
    grad_accum: int = 1
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    # auto: bf16 autocast on CUDA and on CPUs with native bf16, fp32 on other CPUs
    # (brpg.engine.runtime.amp_dtype); off: fp32 everywhere (the DigitScenes presets, so that a
    # number does not depend on the CPU); bf16: bf16 autocast on any CPU; fp16 (+ GradScaler): CUDA
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"
    channels_last: bool = False  # NHWC weights and activations (faster convolutions on CPUs)
    eval_every: int = 0  # 0: only at the end
    ckpt_every: int = 200
    log_every: int = 20
    # TensorBoard event files beside log.jsonl: auto (on where the tensorboard package is
    # importable) | always | never; log.jsonl is written either way
    tensorboard: str = "auto"
    threads: int = 0  # torch.set_num_threads on CPU; 0 leaves torch's default
    deterministic: bool = False


@dataclass
class SemiConfig:
    """Semi-supervised framework settings (appendix: timeline, one step); used unless
    ``train.framework`` is suponly. Step counts replace the official epochs: ``sup_only_steps`` is
    S·L (one epoch officially).
    """

    sup_only_steps: int = 0  # supervised warm-up; then teacher := student (appendix: timeline)
    unlabeled_batch_size: int = 0  # 0: the same as train.batch_size
    ema_decay: float = 0.99  # cap of the teacher EMA decay min(1 - 1/(t+1), cap) (appendix)
    ema_buffers: bool = False  # official: the teacher's BN statistics come from its own forwards
    copy_buffers: bool = False  # also copy BN statistics at teacher := student (official: no)
    teacher_bn_warmup: bool = True  # official: teacher train-mode forward on x_l in the warm-up
    strong_aug: bool = True  # colour jitter, grayscale, blur (appendix: data)
    cutmix_p: float = 0.5  # one coin per batch (appendix: one step)
    unsup_weight: float = 1.0  # lambda_u (appendix: one step)
    drop_percent: float = 80.0  # entropy percentile at step 0, rising to 100 (appendix: one step)
    faithful_unsup_scale: bool = True  # U2PL's extra B*H*W/#kept factor (appendix Q4)
    entropy_teacher: str = "train"  # train: official 2nd teacher forward | eval: weak-view logits
    # model evaluated after the warm-up: teacher | student. UniMatch with the self teacher has
    # no teacher: validate() asks for student rather than switching silently, so that the saved
    # config says which model the reported mIoU is of
    eval_model: str = "teacher"
    # UniMatch (semi.framework=unimatch): pseudo-labels counted where confidence >= conf_thresh
    conf_thresh: float = 0.95
    fp_dropout: float = 0.5  # Dropout2d on the encoder features of the perturbed pass
    # (w_x, w_s1, w_s2, w_fp): loss = (w_x L_x + w_s1 L_s1 + w_s2 L_s2 + w_fp L_fp) / 2
    unimatch_weights: tuple[float, float, float, float] = (1.0, 0.25, 0.25, 0.5)
    # self: the model's own train-mode weak-view predictions make the pseudo-labels (UniMatch);
    # ema: the EMA teacher's, in eval mode
    unimatch_teacher: str = "self"


@dataclass
class ProtoConfig:
    """BRPG prototypes: CPG memories, clustering + APO, EMA bank, L_pro (appendix: CPG, L_pro,
    clustering and APO, prototype EMA).

    Used when ``train.brpg`` is true. Step counts replace epochs: the sampling window is
    ``[sample_start_step, sample_start_step + sample_steps)`` (Ds·L and Dl·L officially), the
    one-shot clustering runs at its end, and L_pro + prototype EMA from then on (appendix:
    timeline).
    """

    sample_start_step: int = 0  # Ds·L; must be >= semi.sup_only_steps
    sample_steps: int = 1  # Dl·L
    memory: str = "cpg"  # cpg: high + low memories | random: one memory, no split (ablation)
    high_threshold: float = 0.8  # tau_h for labeled pixels (appendix: CPG)
    low_threshold: float = 0.0
    unlabeled_threshold: float = 0.8  # teacher confidence for unlabeled high rows
    threshold_type: str = "fix"  # fix | csp (class-specific adaptive, appendix: CPG)
    csp_momentum: float = 0.999
    csp_min: float = 0.0
    csp_max: float = 1.0
    sample_pixel_num: int = 5000  # per-image row budget per step (appendix: CPG)
    queue_len: int = 30000  # rows kept per class and memory
    back_queue: bool = False  # COCO 'back' queue + clustering-time fallbacks (appendix: CPG)
    back_per_class: int = 5000  # back rows sampled per present GT class per step and process
    back_len: int = 0  # back rows kept per class (most confident p_gt); 0: 2·queue_len
    min_rows: int = 10  # a memory with fewer rows falls back on the back queue (appendix: CPG)
    num_high: int = 2  # base prototypes per class from the high memory
    num_low: int = 2
    apo: bool = True  # adaptive prototype optimisation (appendix: clustering and APO)
    add_num: int = 1
    add_proportion: float = 0.05
    dispersion: str = "cos_sim"  # cos_sim | l2 | l2_norm
    kmeans_iters: int = 100
    kmeans_n_init: int = 3
    kmeans_subsample: int = 0  # 0: full-batch k-means; N: seed and iterate on N points, refine
    recluster_every: int = 0  # 0: one-shot clustering (official); N: keep sampling, re-cluster
    ema_momentum: float = 0.99  # alpha of the prototype EMA (appendix: prototype EMA)
    tau: float = 0.1  # temperature of the prototype logits (appendix: L_pro)
    loss_weight: float = 1.0  # lambda_pro
    # official effective weight 1/4 (1/world_size on its 4 GPUs, appendix Q3): true multiplies
    # L_pro by 1/4 on any number of GPUs and with any batch policy
    faithful_loss_scale: bool = False
    grid_num: int = 32  # labeled grid (grid_num + 1)^2 per image (appendix: L_pro)
    unsup_sample_num: int = 1000  # unlabeled L_pro samples per image
    thr_start: float = 0.8  # unlabeled L_pro threshold ramp (appendix: timeline, Q5)
    thr_end: float = 0.95
    thr_delay_steps: int = 0  # official: 5 epochs, hard-coded
    thr_clamp_low: bool = False  # official: below thr_start before the delay


@dataclass
class EvalConfig:
    """Evaluation protocol (appendix: evaluation): center_crop | full | sliding."""

    protocol: str = "full"
    crop_size: int = 513
    stride: int = 513
    batch_size: int = 16


@dataclass
class Config:
    name: str = "unnamed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    semi: SemiConfig = field(default_factory=SemiConfig)
    proto: ProtoConfig = field(default_factory=ProtoConfig)

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))

    def hash(self) -> str:
        """A short stable hash of the resolved config (for run provenance)."""
        blob = json.dumps(self.to_dict(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _closest(key: str, valid: list[str]) -> str:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.0)
    return f" Did you mean '{match[0]}'?" if match else ""


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML value to the annotated type ``tp``, or raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        return _coerce(value, non_none[0], where)
    if origin is typing.Literal:
        if value is False and "off" in args:  # YAML reads an unquoted off/no/false as False
            return "off"  # so `--set train.amp=off` means what it says
        if value not in args:
            # an unquoted on/yes/true is a YAML boolean too; say so, or `True` looks like a typo
            hint = (
                " (YAML reads an unquoted on/off, yes/no, true/false as a boolean)"
                if isinstance(value, bool)
                else ""
            )
            raise ConfigError(f"{where}={value!r} is not one of: {', '.join(map(str, args))}{hint}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}: {value!r}")
        return tuple(_coerce(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    return value


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown config key '{path}'.{_closest(str(key), names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    return cls(**kwargs)


class ConfigWarning(UserWarning):
    """A config read with a key of an older version, translated (the warning says how)."""


def translate_legacy_method(data: dict[str, Any]) -> dict[str, Any]:
    """``train.method`` (suponly | semi | meanteacher | brpg) and ``semi.framework``, the keys
    before issue 14, as ``train.framework`` + ``train.brpg``, with a :class:`ConfigWarning`
    that names the new keys (old presets, run directories and checkpoints still load)."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: expected a mapping of sections, got {data!r}")
    train, semi = data.get("train") or {}, data.get("semi") or {}
    if not isinstance(train, dict) or not isinstance(semi, dict):
        return data  # _build names the section that is not a mapping
    if "method" not in train and "framework" not in semi:
        return data
    data = json.loads(json.dumps(data))  # deep copy of plain data
    train, semi = data.setdefault("train", {}), data.setdefault("semi", {})
    method = train.pop("method", None)
    old_fw = semi.pop("framework", None)
    if method is None:  # only semi.framework: it named the framework of a semi run
        method = "semi" if train.get("framework", "suponly") != "suponly" else "suponly"
    if method not in ("suponly", "semi", "meanteacher", "brpg"):
        raise ConfigError(
            f"train.method={method!r} is an old key (suponly | semi | meanteacher | brpg); use"
            " train.framework (suponly | meanteacher | unimatch) and train.brpg (true | false)"
        )
    if method == "meanteacher" and old_fw not in (None, "meanteacher"):
        raise ConfigError(
            f"train.method=meanteacher with semi.framework={old_fw!r}: write"
            f" train.framework={old_fw} (and train.brpg) instead of these old keys"
        )
    framework = "suponly"
    if method != "suponly":
        current = train.get("framework", "suponly")
        framework = old_fw or (current if current != "suponly" else "meanteacher")
    train["framework"], train["brpg"] = framework, method == "brpg"
    old = f"train.method={method}" + (f", semi.framework={old_fw}" if old_fw else "")
    warnings.warn(
        f"{old} are old config keys, read as train.framework={framework},"
        f" train.brpg={str(method == 'brpg').lower()}: write these instead",
        ConfigWarning,
        stacklevel=3,
    )
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    """Build a :class:`Config` from a nested dict; unknown keys raise :class:`ConfigError`, the
    keys of older versions are translated with a warning (:func:`translate_legacy_method`)."""
    cfg = _build(Config, translate_legacy_method(data), "")
    validate(cfg)
    return cfg


_CHOICES = {
    "train.tensorboard": ("auto", "always", "never"),
    "semi.unimatch_teacher": ("self", "ema"),
    "semi.entropy_teacher": ("train", "eval"),
    "semi.eval_model": ("teacher", "student"),
    "proto.memory": ("cpg", "random"),
    "proto.threshold_type": ("fix", "csp"),
    "proto.dispersion": ("cos_sim", "l2", "l2_norm"),
    "model.output_stride": (8, 16),
}


@dataclass(frozen=True)
class Range:
    """An interval of allowed values; ``None`` is unbounded. ``hint`` ends the error message."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo itself is excluded
    hi_open: bool = False
    hint: str = ""

    def __contains__(self, value: float) -> bool:
        if self.lo is not None and (value <= self.lo if self.lo_open else value < self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def __str__(self) -> str:
        def num(x: float) -> str:
            return f"{x:g}"

        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {num(self.lo)}" if self.lo is not None else ""
        left = f"{'(' if self.lo_open else '['}{'-inf' if self.lo is None else num(self.lo)}"
        return f"in {left}, {num(self.hi)}{')' if self.hi_open else ']'}"


def _ranges() -> dict[str, Range]:
    ge0, ge1, pos = Range(0), Range(1), Range(0, lo_open=True)
    unit, momentum = Range(0, 1), Range(0, 1, hi_open=True)
    return {
        "data.num_classes": ge1,
        "data.crop_size": ge1,
        "data.scale_range": pos,
        "data.std": pos,
        "data.num_workers": ge0,
        "data.digits_seed": ge0,
        "data.digits_size": ge1,
        "data.digits_train": ge1,
        "data.digits_val": ge1,
        "model.aspp_rates": ge1,
        "model.decoder_channels": ge1,
        "model.rep_dim": ge1,
        "model.dropout": momentum,
        "model.width": ge1,
        "optim.lr": pos,
        "optim.momentum": momentum,
        "optim.weight_decay": ge0,
        "optim.head_lr_mult": pos,
        "optim.poly_power": ge0,
        "optim.warmup_steps": ge0,
        "optim.betas": momentum,
        "loss.ce_weight": ge0,
        "loss.ohem_weight": ge0,
        "loss.ohem_thresh": unit,
        "train.steps": Range(1, hint="(optimiser steps of the run)"),
        "train.batch_size": ge1,
        "train.grad_accum": Range(
            1,
            hint="(the number of micro-batches of train.batch_size per optimiser step); use 1 to"
            " step after every batch",
        ),
        "train.seed": ge0,
        "train.eval_every": Range(0, hint="(0: evaluate only at the end)"),
        "train.ckpt_every": Range(0, hint="(0: no periodic checkpoints)"),
        "train.log_every": ge1,
        "train.threads": Range(0, hint="(0: torch's default)"),
        "semi.sup_only_steps": ge0,
        "semi.unlabeled_batch_size": Range(0, hint="(0: the same as train.batch_size)"),
        "semi.ema_decay": momentum,
        "semi.cutmix_p": unit,
        "semi.unsup_weight": ge0,
        "semi.drop_percent": Range(0, 100),
        "semi.conf_thresh": unit,
        "semi.fp_dropout": momentum,
        "semi.unimatch_weights": ge0,
        "proto.sample_start_step": ge0,
        "proto.sample_steps": Range(1, hint="(the memories must not be empty)"),
        "proto.high_threshold": unit,
        "proto.low_threshold": unit,
        "proto.unlabeled_threshold": unit,
        "proto.csp_momentum": momentum,
        "proto.csp_min": unit,
        "proto.csp_max": unit,
        "proto.sample_pixel_num": ge1,
        "proto.queue_len": ge1,
        "proto.back_per_class": ge1,
        "proto.back_len": Range(0, hint="(0: 2·queue_len)"),
        "proto.min_rows": ge0,
        "proto.num_high": ge1,
        "proto.num_low": ge0,
        "proto.add_num": ge0,
        "proto.add_proportion": unit,
        "proto.kmeans_iters": ge1,
        "proto.kmeans_n_init": ge1,
        "proto.kmeans_subsample": Range(
            0,
            hint="(0: full-batch k-means; N: the number of points per memory to seed and iterate"
            " on before refining on all)",
        ),
        "proto.recluster_every": Range(0, hint="(0: one-shot clustering, as officially)"),
        "proto.ema_momentum": momentum,
        "proto.tau": pos,
        "proto.loss_weight": ge0,
        "proto.grid_num": ge1,
        "proto.unsup_sample_num": ge0,
        "proto.thr_start": unit,
        "proto.thr_end": unit,
        "proto.thr_delay_steps": ge0,
        "eval.crop_size": ge1,
        "eval.stride": ge1,
        "eval.batch_size": ge1,
    }


# Every numeric field (or tuple of numbers) has a range here, or is listed in _UNRANGED.
_RANGES: dict[str, Range] = _ranges()
_UNRANGED = {
    "data.mean": "any per-channel mean",
    "data.ignore_index": "a label value (any integer, e.g. -100 or 255)",
    "data.pad_label": "a label value",
    "model.output_stride": "checked in _CHOICES",
    "loss.ohem_min_kept": "any integer; <= 0 turns the OHEM filter off",
}


def _check_ranges(cfg: Config) -> None:
    for path, allowed in _RANGES.items():
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        hint = f" {allowed.hint}" if allowed.hint else ""
        if isinstance(value, tuple):
            bad = [v for v in value if v not in allowed]
            if bad:
                raise ConfigError(
                    f"{path}={list(value)}: every value must be {allowed}, got {bad[0]!r}{hint}"
                )
        elif value not in allowed:
            raise ConfigError(f"{path}={value!r} must be {allowed}{hint}")
    d, p = cfg.data, cfg.proto
    if d.scale_range[0] > d.scale_range[1]:
        raise ConfigError(f"data.scale_range={list(d.scale_range)}: the minimum comes first")
    if p.csp_min > p.csp_max:
        raise ConfigError(
            f"proto.csp_min={p.csp_min} must be <= proto.csp_max={p.csp_max} (the clamp of the"
            " class-specific thresholds)"
        )


def validate(cfg: Config) -> None:
    """Checks: enumerated values, numeric ranges (:data:`_RANGES`) and the order of the
    training phases (appendix: timeline)."""
    for path, choices in _CHOICES.items():
        section, key = path.split(".")
        value = getattr(getattr(cfg, section), key)
        if value not in choices:
            raise ConfigError(
                f"{path}={value!r} is not one of: {', '.join(str(c) for c in choices)}"
            )
    _check_ranges(cfg)
    s, p = cfg.semi, cfg.proto
    if cfg.train.brpg and cfg.train.framework == "suponly":
        raise ConfigError(
            "train.brpg=true needs a semi-supervised framework: set train.framework=meanteacher"
            " or train.framework=unimatch"
        )
    if cfg.train.framework == "unimatch":
        if s.unimatch_teacher == "self" and s.eval_model != "student":
            raise ConfigError(
                "train.framework=unimatch with semi.unimatch_teacher=self has no EMA teacher to"
                " evaluate: set semi.eval_model=student (or semi.unimatch_teacher=ema)"
            )
        if s.unimatch_teacher == "ema" and not s.ema_buffers:
            raise ConfigError(
                "semi.unimatch_teacher=ema needs semi.ema_buffers=true: the eval-mode teacher"
                " runs no train-mode forward of its own, so its BatchNorm statistics must follow"
                " the model's"
            )
    if cfg.train.brpg:
        if p.sample_start_step < s.sup_only_steps:
            raise ConfigError(
                f"proto.sample_start_step={p.sample_start_step} comes before the end of the "
                f"warm-up (semi.sup_only_steps={s.sup_only_steps}): the unlabeled memory rows need "
                "the teacher; set proto.sample_start_step >= semi.sup_only_steps"
            )
        if p.back_queue and p.memory != "cpg":
            raise ConfigError("proto.back_queue needs proto.memory=cpg (it refills high/low)")


def list_presets() -> list[str]:
    """Preset names; files starting with ``_`` are shared bases, not presets."""
    return sorted(p.stem for p in PRESET_DIR.glob("*.yaml") if not p.stem.startswith("_"))


def _read_yaml(name_or_path: str | Path) -> tuple[dict[str, Any], str]:
    path = Path(name_or_path)
    if not path.suffix:
        preset = PRESET_DIR / f"{name_or_path}.yaml"
        if preset.exists():
            path = preset
        elif not path.exists():
            presets = list_presets()
            raise ConfigError(
                f"no preset or file named '{name_or_path}'.{_closest(str(name_or_path), presets)}"
                f" Presets: {', '.join(presets)}"
            )
    if not path.exists():
        raise ConfigError(f"config file '{path}' does not exist")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data, str(path)


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _load_dict(name_or_path: str | Path, seen: tuple[str, ...] = ()) -> dict[str, Any]:
    data, path = _read_yaml(name_or_path)
    if path in seen:
        raise ConfigError(f"circular 'base:' chain through {path}")
    base = data.pop("base", None)
    if base is not None:
        data = _merge(_load_dict(base, (*seen, path)), data)
    return data


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``key.path=value``; the value is read as YAML (``0.1``, ``true``, ``[1, 2]``)."""
    if "=" not in item:
        raise ConfigError(f"override '{item}' must look like key.path=value (e.g. train.steps=100)")
    key, raw = item.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy of plain data
    for item in overrides:
        keys, value = parse_override(item)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    return data


def load_config(name_or_path: str | Path, overrides: list[str] | None = None) -> Config:
    """Load a preset name (``digits_suponly_1_16``) or a YAML path, apply ``key=value`` overrides.

    A YAML file may start with ``base: other_preset`` to inherit from another preset.
    """
    data = _load_dict(name_or_path)
    data = apply_overrides(data, overrides or [])
    return config_from_dict(data)


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
