"""The trainer (SupOnly, mean teacher, UniMatch, BRPG on either) with exact resume and DDP.

One :class:`Trainer` owns a run directory::

    run_dir/
      config.yaml      the resolved config
      log.jsonl        one JSON object per logged step / evaluation
      events.out.tfevents.*  the same numbers for TensorBoard (train.tensorboard)
      last.pt          the latest checkpoint (atomic: temp file + rename)
      summary.json     written at the end: val_miou, per_class_iou, val_mbiou (Boundary IoU),
                       per_class_biou, steps, wall_s, config, commit

``train.framework`` picks the step: ``suponly`` (:func:`~brpg.frameworks.supervised.suponly_step`)
throughout, or ``meanteacher`` / ``unimatch`` (with the BRPG plug-in when ``train.brpg``): the
supervised warm-up, then the framework's step:
:func:`brpg.frameworks.mean_teacher.semi_step` (mean teacher) or :func:`brpg.frameworks.unimatch.unimatch_step`
(UniMatch), both returning ``(loss, logs, ema_rows)``. The phases are in
:mod:`brpg.timeline`. The checkpoint holds the teacher (if any), the CPG memories (during
the sampling window) and the prototype bank, so a resume is exact in every phase.

Training is counted in steps. Every random draw of step ``s`` (dropout, augmentation of its
samples) is seeded from ``(seed, s, rank)``, and the batches come from a step-indexed stream
(:mod:`brpg.engine.batches`), so ``k`` steps + kill + resume to ``N`` gives the same weights
as ``N`` steps straight (tested with a real SIGKILL).

Gradient accumulation (``train.grad_accum = g``): one optimiser step consumes ``g`` micro-batches
of ``train.batch_size`` (labeled stream positions ``g·s .. g·s + g - 1``, likewise for the
unlabeled stream after the warm-up), backpropagates ``loss / g`` of each (under DDP only the last
one all-reduces), then steps the optimiser, the LR schedule and the teacher EMA once and applies
the prototype-EMA rows of the ``g`` micro-batches in order (the CPG memories take the rows of
every micro-batch). Steps, phases, checkpoints and logs (means over the micro-batches) stay
counted in optimiser steps; ``g = 1`` is the plain loop.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from brpg import distributed
from brpg.config import Config, save_config
from brpg.data.build import build_eval_loader, build_train_datasets
from brpg.engine import runtime
from brpg.engine.batches import _mix, step_loader
from brpg.engine.checkpoint import (
    capture_rng_state,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from brpg.engine.inference import evaluate
from brpg.engine.optim import build_optimizer, build_scheduler
from brpg.engine.tensorboard import TensorBoardLog, tensorboard_enabled
from brpg.frameworks.mean_teacher import semi_step
from brpg.frameworks.semi_method import SemiMethod
from brpg.frameworks.supervised import suponly_step
from brpg.frameworks.unimatch import unimatch_step
from brpg.models import build_model
from brpg.timeline import phase_of

CKPT_NAME = "last.pt"


class RunDirError(RuntimeError):
    """The run directory is not usable as asked (exists without --resume, or nothing to resume)."""


# Settings that may differ on resume: they say where and how fast a run trains, or what it logs,
# not what it computes. Every other change (train.steps included: it moves the LR schedule and
# every ramp) makes the resumed run another experiment than the one started, so it is refused
# unless asked for explicitly (``allow_config_change``).
RESUME_FREE_KEYS = frozenset(
    {
        "name",
        "data.root",
        "data.num_workers",
        "train.device",
        "train.threads",
        "train.log_every",
        "train.ckpt_every",
        "train.eval_every",
        "eval.batch_size",
    }
)


def changed_keys(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two ``Config.to_dict()`` (sorted)."""
    out = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += [f"{key}.{k}" for k in changed_keys(a, b)]
        elif a != b:
            out.append(key)
    return out


def _mean_logs(logs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-key means of the micro-batches' logs (one micro-batch: its logs, untouched)."""
    if len(logs) == 1:
        return logs[0]
    return {k: torch.stack([rec[k].float() for rec in logs]).mean() for k in logs[0]}


def _dataset_version(cfg: Config) -> int | None:
    """The DigitScenes generator version of a digits run (v2 and v3 results never mix)."""
    if cfg.data.name != "digits":
        return None
    from brpg.data.digits import GENERATOR_VERSION

    return GENERATOR_VERSION


def _data_fingerprint(cfg: Config) -> str | None:
    """The DigitScenes cache's pixel fingerprint (:func:`brpg.data.digits.scenes_fingerprint`)
    of a digits run: runs compared across machines must have seen the same scenes."""
    if cfg.data.name != "digits":
        return None
    from brpg.data.build import resolve_data_root
    from brpg.data.digits import scenes_fingerprint

    return scenes_fingerprint(resolve_data_root(cfg.data.root))


class Trainer:
    """Trains one config into one run directory; ``fit()`` returns the summary dict."""

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        progress_interval: float = 0.1,
        allow_config_change: bool = False,
    ) -> None:
        self.cfg = cfg
        self.allow_config_change = allow_config_change
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.progress_interval = progress_interval  # seconds between progress-bar updates
        t = cfg.train
        if t.threads > 0:
            torch.set_num_threads(t.threads)
        self.device = distributed.resolve_device(t.device)
        self.dist = distributed.init_distributed(self.device)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        distributed.seed_everything(t.seed)
        self.amp_dtype = runtime.amp_dtype(t.amp, self.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and self.device.type == "cuda"
        )

        ckpt_path = self.run_dir / CKPT_NAME
        if resume and latest_checkpoint(self.run_dir) is None:
            raise RunDirError(
                f"--resume: no checkpoint in {self.run_dir}; start without --resume to train anew"
            )
        if not resume and ckpt_path.exists():
            raise RunDirError(
                f"{self.run_dir} already holds a run ({ckpt_path.name}); pass --resume to continue"
                " it, or --out to choose another directory"
            )
        if self.dist.is_main and not resume:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.run_dir / "config.yaml")

        semi = t.framework != "suponly"
        self.labeled, self.unlabeled, self.val = build_train_datasets(cfg, unlabeled=semi)
        model = build_model(cfg.model, cfg.data.num_classes).to(self.device)
        if t.channels_last:  # the teacher is a copy of the student, so it follows
            model = model.to(memory_format=torch.channels_last)
        if self.dist.enabled and self.device.type == "cuda":
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        self.method = SemiMethod(cfg, model, self.device) if semi else None
        self.optimizer = build_optimizer(model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, t.steps)
        if self.dist.enabled:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        self.model = model
        # The supervised loss reads no representation; only the mean teacher alone skips the
        # rep head in it. It runs for SupOnly (a rep head there is trained for its BN
        # statistics, e.g. the book's warm model), for BRPG (its BN statistics and weight
        # decay shape the features sampled later), under DDP (every parameter in the graph)
        # and before the teacher's BN warm-up forward (whose dropout draws follow the head's).
        self._warmup_rep = (
            self.dist.enabled
            or self.method is None
            or self.method.plugin is not None
            or (self.method.teacher is not None and cfg.semi.teacher_bn_warmup)
        )
        self.step = 0
        self.best_miou = -1.0
        self.wall_before = 0.0  # training seconds spent before the last resume
        self._t0: float | None = None  # when this process started training
        if resume:
            self._load(latest_checkpoint(self.run_dir))
        self.tensorboard: TensorBoardLog | None = None
        if self.dist.is_main and tensorboard_enabled(t.tensorboard):
            # a resumed run hides the events the killed process wrote after its checkpoint
            purge = self.step + 1 if resume else None
            self.tensorboard = TensorBoardLog(self.run_dir, purge_step=purge)

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": distributed.unwrap_model(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "method": None if self.method is None else self.method.state_dict(),
            "step": self.step,
            "best_miou": self.best_miou,
            "wall_s": self.wall_before
            + (0.0 if self._t0 is None else time.perf_counter() - self._t0),
            "rng": capture_rng_state(),
            "config": self.cfg.to_dict(),
        }

    def _load(self, path: Path | None) -> None:
        assert path is not None
        state = load_checkpoint(path, map_location=self.device)
        self._check_resume_config(state.get("config"), path)
        distributed.unwrap_model(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        if self.method is not None:
            self.method.load_state_dict(state["method"])
        self.step = int(state["step"])
        self.best_miou = float(state["best_miou"])
        self.wall_before = float(state["wall_s"])
        restore_rng_state(state["rng"])
        self._truncate_log()

    def _check_resume_config(self, saved: dict[str, Any] | None, path: Path) -> None:
        """Refuse to resume with a config other than the checkpoint's (:data:`RESUME_FREE_KEYS`
        aside) unless ``allow_config_change``."""
        if saved is None or self.allow_config_change:
            return
        now = self.cfg.to_dict()
        changed = [k for k in changed_keys(saved, now) if k not in RESUME_FREE_KEYS]
        if changed:

            def at(d: Any, key: str) -> Any:
                for part in key.split("."):
                    d = d.get(part) if isinstance(d, dict) else None
                return d

            listed = "; ".join(f"{k}: {at(saved, k)!r} -> {at(now, k)!r}" for k in changed)
            raise RunDirError(
                f"{path} was trained with another config; resuming with this one would mix two"
                f" runs. Changed: {listed}. Resume with the original config, or pass"
                " --allow-config-change (Trainer(allow_config_change=True)) to continue anyway."
            )

    def load_weights(self, source: str | Path) -> None:
        """Start the student from the ``model`` weights of a checkpoint (file or run directory).

        Fine-tuning, not resuming: the optimiser, the LR schedule, the step counter, the RNG
        and any method state (teacher, memories, prototypes) start fresh, and the teacher takes
        these weights at the end of the warm-up as usual. Only allowed before the first step.
        """
        if self.step != 0:
            raise RunDirError(
                f"load_weights: this trainer is already at step {self.step}; weights can only"
                " be loaded into a fresh run (use resume=True to continue a run)"
            )
        path = Path(source)
        if path.is_dir():
            path = path / CKPT_NAME
        if not path.is_file():
            raise FileNotFoundError(f"load_weights: no checkpoint at {path}")
        state = load_checkpoint(path, map_location=self.device)
        try:
            distributed.unwrap_model(self.model).load_state_dict(state["model"])
        except RuntimeError as err:
            raise ValueError(
                f"load_weights: {path} holds weights of another model than {self.cfg.name}'s"
                f" (check model.* and data.num_classes):\n{err}"
            ) from err
        teacher = None if self.method is None else self.method.teacher
        if teacher is not None:  # a teacher that exists before the warm-up ends: same start
            teacher.module.load_state_dict(state["model"])

    def _truncate_log(self) -> None:
        """Drop log records written after the checkpoint (they will be written again)."""
        path = self.run_dir / "log.jsonl"
        if not self.dist.is_main or not path.exists():
            return
        lines = path.read_text().splitlines()
        keep = []
        for ln in filter(str.strip, lines):
            rec = json.loads(ln)
            step = rec.get("step", 0)
            # events (e.g. the clustering) are logged *before* step `step` runs: a resumed run
            # logs them again, so only those of earlier steps are kept
            if step < self.step or (step == self.step and "event" not in rec):
                keep.append(ln)
        if len(keep) != len(lines):
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            tmp.replace(path)

    def save(self) -> None:
        if self.dist.is_main:
            save_checkpoint(self.run_dir / CKPT_NAME, self.state_dict())

    # -- logging -------------------------------------------------------------------------
    def log(self, record: dict[str, Any]) -> None:
        """Append ``record`` to ``log.jsonl`` (the run's record) and mirror it to TensorBoard."""
        if self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            if self.tensorboard is not None:
                self.tensorboard.record(record)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # -- evaluation ----------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The model evaluated now: the teacher once it exists (``semi.eval_model``, appendix: one
        step).

        UniMatch with ``semi.unimatch_teacher: self`` has no EMA teacher; its config must say
        ``semi.eval_model: student`` (checked by :func:`brpg.config.validate`)."""
        if (
            self.method is not None
            and self.method.teacher is not None
            and self.cfg.semi.eval_model == "teacher"
            and self.step > self.cfg.semi.sup_only_steps
        ):
            return self.method.teacher.module
        return distributed.unwrap_model(self.model)

    def evaluate(self) -> dict[str, Any]:
        """Evaluate :meth:`eval_model` on the val set, each rank on its share of the images."""
        model = self.eval_model()
        if self.dist.enabled and not any(isinstance(m, nn.SyncBatchNorm) for m in model.modules()):
            # Without SyncBN (CPU/gloo DDP) each rank's BN statistics drift apart in training;
            # score every rank's images with rank 0's copy, the one the checkpoint holds, so the
            # reported mIoU is that of one model (`brpg eval` of last.pt gives the same number).
            model = copy.deepcopy(model)
            for buf in model.buffers():
                dist.broadcast(buf, src=0)
        loader = build_eval_loader(self.cfg, self.val, self.dist.rank, self.dist.world_size)
        return evaluate(
            model,
            loader,
            num_classes=self.cfg.data.num_classes,
            protocol=self.cfg.eval.protocol,
            crop_size=self.cfg.eval.crop_size,
            stride=self.cfg.eval.stride,
            device=self.device,
            ignore_index=self.cfg.data.ignore_index,
            amp_dtype=self.amp_dtype,
            progress=self.progress and self.dist.is_main,
        )

    # -- training ------------------------------------------------------------------------
    def train_step(
        self,
        batches: dict[str, torch.Tensor] | list[dict[str, torch.Tensor]],
        images_u: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        """One optimiser step at ``self.step`` over ``g = len(batches)`` micro-batches.

        ``batches`` are the labeled micro-batches (one dict is one micro-batch) and ``images_u``
        the weak unlabeled ones (``[B_u, 3, H, W]`` each, one per labeled micro-batch; ``None``
        in the warm-up). Each micro-batch backpropagates ``loss / g``; the returned logs are the
        means over the micro-batches.
        """
        cfg, t = self.cfg, self.cfg.train
        micro = [batches] if isinstance(batches, dict) else list(batches)
        micro_u = [images_u] if torch.is_tensor(images_u) else images_u
        g = len(micro)
        torch.manual_seed(_mix(t.seed, 104729, self.step, self.dist.rank))  # dropout, aug, CutMix
        method, phase = self.method, phase_of(self.step, cfg)
        step_fn = unimatch_step if cfg.train.framework == "unimatch" else semi_step
        if method is not None:
            for key, value in method.before_step(self.step, self.model).items():
                self.log({"step": self.step, "event": key, key: value})
        self.model.train()
        all_logs: list[dict[str, torch.Tensor]] = []
        all_ema_rows: list[tuple[torch.Tensor, torch.Tensor]] = []
        for i, batch in enumerate(micro):
            # DDP: accumulate locally, all-reduce only in the last micro-batch's backward
            sync = contextlib.nullcontext()
            if i < g - 1 and isinstance(self.model, nn.parallel.DistributedDataParallel):
                sync = self.model.no_sync()
            with sync:
                ema_rows = None
                with self._autocast():
                    if phase == "warmup":
                        loss, logs = suponly_step(self.model, batch, cfg, self._warmup_rep)
                        if method is not None:
                            method.warmup_step(batch["image"])
                    else:
                        assert method is not None and micro_u is not None and len(micro_u) == g
                        loss, logs, ema_rows = step_fn(
                            self.model, method, batch, micro_u[i], self.step
                        )
                if i == 0:  # where it always was: after the first forward, before any backward
                    self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss / g).backward()  # loss / 1 is exact: g = 1 is unchanged
            all_logs.append(logs)
            if ema_rows is not None:
                all_ema_rows.append(ema_rows)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if method is not None and phase != "warmup":
            method.after_step(self.step, self.model, all_ema_rows)
        return _mean_logs(all_logs)

    def _unlabeled_batches(self) -> Any:
        cfg, t = self.cfg, self.cfg.train
        assert self.unlabeled is not None
        return step_loader(
            self.unlabeled,
            cfg.semi.unlabeled_batch_size or t.batch_size,
            _mix(t.seed, 31337),
            start_step=max(0, self.step - cfg.semi.sup_only_steps) * t.grad_accum,
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )

    def train_until(self, stop: int) -> None:
        """Train from ``self.step`` to step ``stop`` (``self.step <= stop <= train.steps``) and,
        if that trained and ``stop`` comes before the end of the run, save a checkpoint there.

        The steps are those of the whole run (the LR schedule, the timeline and the data order
        follow ``train.steps``), so stopping at ``stop`` and resuming continues the same run:
        a chapter can stop a committed run's config at, e.g., its clustering step and look at
        the state there. :meth:`fit` is ``train_until(train.steps)`` plus the final evaluation.
        """
        cfg, t = self.cfg, self.cfg.train
        if not self.step <= stop <= t.steps:
            raise ValueError(
                f"train_until({stop}): this run is at step {self.step} of {t.steps}; stop must"
                f" lie between them"
            )
        if self._t0 is None:
            self._t0 = time.perf_counter()
        start = self.step
        batches = step_loader(
            self.labeled,
            t.batch_size,
            t.seed,
            start_step=self.step * t.grad_accum,  # batch g·s + i is micro-batch i of step s
            rank=self.dist.rank,
            world_size=self.dist.world_size,
            num_workers=cfg.data.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        bar = tqdm(
            total=t.steps,
            initial=self.step,
            desc=cfg.name,
            disable=not (self.progress and self.dist.is_main),
            dynamic_ncols=True,
            mininterval=self.progress_interval,
        )
        unlabeled = None
        while self.step < stop:
            micro = [
                {
                    k: v.to(self.device, non_blocking=True)
                    for k, v in next(batches).items()
                    if torch.is_tensor(v)
                }
                for _ in range(t.grad_accum)
            ]
            micro_u = None
            if phase_of(self.step, cfg) != "warmup":
                if unlabeled is None:
                    unlabeled = self._unlabeled_batches()
                micro_u = [
                    next(unlabeled)["image"].to(self.device, non_blocking=True)
                    for _ in range(t.grad_accum)
                ]
            logs = self.train_step(micro, micro_u)
            self.step += 1
            bar.update(1)
            if self.step % t.log_every == 0 or self.step == t.steps:
                record = {k: float(v) for k, v in logs.items()}  # one host sync per log line
                record.update(step=self.step, lr=self.optimizer.param_groups[0]["lr"])
                record["wall_s"] = round(self.wall_before + time.perf_counter() - self._t0, 3)
                if not all(math.isfinite(v) for k, v in record.items() if k.startswith("loss")):
                    raise FloatingPointError(f"non-finite loss at step {self.step}: {record}")
                bar.set_postfix(loss=f"{record.get('loss_sup', 0.0):.3f}")
                self.log(record)
            if t.eval_every and self.step % t.eval_every == 0 and self.step < t.steps:
                res = self.evaluate()
                self.best_miou = max(self.best_miou, res["miou"])
                self.log({"step": self.step, "val_miou": res["miou"], "val_mbiou": res["mbiou"]})
            if t.ckpt_every and self.step % t.ckpt_every == 0:
                self.save()
        bar.close()
        if start < stop < t.steps:  # a run already at `stop` (reloaded) is not written again
            self.save()

    def fit(self) -> dict[str, Any]:
        """Train to ``train.steps`` (or the rest of a resumed run), evaluate, write
        ``summary.json`` and return the summary."""
        cfg, t = self.cfg, self.cfg.train
        self.train_until(t.steps)
        assert self._t0 is not None
        wall_s = self.wall_before + time.perf_counter() - self._t0
        res = self.evaluate()
        self.best_miou = max(self.best_miou, res["miou"])
        self.save()
        summary = {
            "name": cfg.name,
            "val_miou": res["miou"],
            "per_class_iou": res["per_class_iou"],
            "val_mbiou": res["mbiou"],
            "per_class_biou": res["per_class_biou"],
            "biou_dilation_ratio": res["biou_dilation_ratio"],
            "pixel_acc": res.get("pixel_acc"),
            "best_val_miou": self.best_miou,
            "steps": self.step,
            "wall_s": round(wall_s, 2),
            "world_size": self.dist.world_size,
            "grad_accum": t.grad_accum,
            "amp_dtype": runtime.dtype_name(self.amp_dtype),
            "effective_batch": t.batch_size * t.grad_accum * self.dist.world_size,
            "eval_protocol": cfg.eval.protocol,
            "dataset_version": _dataset_version(cfg),
            "data_fingerprint": _data_fingerprint(cfg) if self.dist.is_main else None,
            "config_hash": cfg.hash(),
            "commit": runtime.git_commit(),
            "machine": runtime.machine_info(self.device),
            "config": cfg.to_dict(),
        }
        self.log(
            {"step": self.step, "val_miou": res["miou"], "val_mbiou": res["mbiou"], "final": True}
        )
        if self.dist.is_main:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.dist.enabled:
            dist.barrier()
        return summary
