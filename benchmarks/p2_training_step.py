"""P2 — one BRPG training step vs one mean-teacher step, same model and batch (spec §13).

Both variants are built from the DigitScenes preset ``digits_brpg_1_16`` (the mean teacher with
``train.framework=meanteacher``): the same model (the small backbone with the representation
head, built with the same seed), the same optimiser (:func:`brpg.engine.optim.build_optimizer`)
and the same batch (``B`` labeled + ``B`` unlabeled DigitScenes scenes rendered in memory from
the training glyph pool, seed 0). One timed step is exactly what
:meth:`brpg.engine.trainer.Trainer.train_step` runs after the warm-up on the CPU::

    torch.manual_seed(...)                      # same seed for every variant in a round
    loss, logs, ema_rows = semi_step(model, method, batch, image_u, step)
    optimizer.zero_grad(set_to_none=True); loss.backward(); optimizer.step(); scheduler.step()
    method.teacher.update(model, step=step - S)
    if ema_rows is not None: method.plugin.bank.ema_update(*ema_rows)

(the trainer's ``GradScaler`` is disabled on the CPU, so ``scaler.step`` is
``optimizer.step``).

- ``meanteacher``: the step of a mean-teacher run (spec §4) at the same step number as BRPG's;
- ``brpg``: a BRPG step in the proto phase (L_pro + prototype EMA, spec §7-§8). Before timing,
  the run goes through ``fill_steps`` full sampling-window steps (CPG memory pushes) and the
  one-shot clustering (:func:`brpg.method.clustering.cluster_prototypes`), as the trainer does at
  ``Ds + Dl``; the memory is then freed;
- ``brpg_sampling``: a BRPG step inside the sampling window (CPG routing + memory push,
  spec §5.1, no L_pro);
- ``clustering``: the one-shot clustering (APO + batched k-means, ``n_init``/``iters`` of the
  preset) on memories filled to capacity (``C × queue_len × rep_dim`` per kind) with Gaussian
  mixtures (2-4 modes per class and kind, seed 0); timed separately (seconds).

The three step variants run round-robin (mt, brpg, sampling, mt, …) after a warm-up, so a
change of machine load hits them alike; round ``r`` seeds every variant's step with the same
seed (same CutMix coin and boxes, same augmentation). Every variant has its own model,
optimiser and teacher, built identically; their parameters drift apart only by the updates
of the timed steps.

Standalone (other shapes, e.g. a larger batch or crop)::

    python -m benchmarks.p2_training_step --batch 32 --crop 96 --threads 1
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import loadavg, summarize, target, time_interleaved, write_json
from brpg.config import Config, load_config
from brpg.engine.optim import build_optimizer, build_scheduler
from brpg.frameworks.mean_teacher import semi_step
from brpg.frameworks.semi_method import SemiMethod
from brpg.method.clustering import cluster_prototypes
from brpg.method.memory import PrototypeMemory
from brpg.models import build_model
from brpg.timeline import phase_of

TITLE = "P2 BRPG training step vs mean-teacher step"
AVAILABLE = True
REASON = ""
PRESET = "digits_brpg_1_16"


@dataclass(frozen=True)
class P2Shapes:
    batch: int = 16  # labeled images; the unlabeled batch has the same size (the preset's)
    crop: int = 64  # scene size in pixels (the preset's crop)
    fill_steps: int = 3  # sampling-window steps before the one-shot clustering of ``brpg``
    warmup: int = 2  # untimed steps of each variant
    repeats: int = 15  # timed steps of each variant
    cluster_repeats: int = 2  # timed one-shot clusterings at the preset's memory size
    overrides: tuple[str, ...] = ()  # config overrides on top of the preset


FULL = P2Shapes()
QUICK = P2Shapes(
    batch=2,
    crop=32,
    fill_steps=2,
    warmup=1,
    repeats=3,
    cluster_repeats=1,
    overrides=(
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "proto.sample_pixel_num=8",
        "proto.queue_len=200",
        "proto.grid_num=7",
        "proto.unsup_sample_num=16",
        "proto.kmeans_iters=10",
        "proto.kmeans_n_init=1",
    ),
)


def make_config(shapes: P2Shapes, method: str) -> Config:
    """The preset as ``method`` (meanteacher | brpg), with the batch size and the overrides."""
    return load_config(
        PRESET,
        [
            "train.framework=meanteacher",
            f"train.brpg={str(method == 'brpg').lower()}",
            f"train.batch_size={shapes.batch}",
            f"semi.unlabeled_batch_size={shapes.batch}",
            f"data.crop_size={shapes.crop}",
            *shapes.overrides,
        ],
    )


def make_batch(cfg: Config, n: int, size: int, seed: int) -> tuple[Tensor, Tensor]:
    """``n`` DigitScenes scenes rendered in memory: normalised images ``[n, 3, size, size]``
    and masks ``[n, size, size]`` (long, 255 = ignore)."""
    from brpg.data.digits import DigitKnobs, render_scene, source_pools

    pool = source_pools(seed)["train"]
    rng = np.random.default_rng([seed, 2])
    images, masks = [], []
    for _ in range(n):
        img, mask, _ = render_scene(rng, pool, size, DigitKnobs())
        images.append(torch.from_numpy(img).permute(2, 0, 1).float() / 255.0)
        masks.append(torch.from_numpy(mask).long())
    mean = torch.tensor(cfg.data.mean).view(1, 3, 1, 1)
    std = torch.tensor(cfg.data.std).view(1, 3, 1, 1)
    return (torch.stack(images) - mean) / std, torch.stack(masks)


class Variant:
    """Model, optimiser, scheduler and :class:`SemiMethod` of one variant, at step ``step``."""

    def __init__(self, cfg: Config, step: int, device: torch.device) -> None:
        self.cfg, self.step, self.device = cfg, step, device
        torch.manual_seed(cfg.train.seed)  # same initial weights for every variant
        self.model = build_model(cfg.model, cfg.data.num_classes).to(device)
        self.method = SemiMethod(cfg, self.model, device)
        self.optimizer = build_optimizer(self.model, cfg.optim)
        self.scheduler = build_scheduler(self.optimizer, cfg.optim, cfg.train.steps)
        self.method.teacher.copy_from(self.model, buffers=cfg.semi.copy_buffers)  # step S

    def train_step(self, batch: dict[str, Tensor], image_u: Tensor, seed: int) -> dict[str, Any]:
        """One step as the trainer runs it after the warm-up (see the module docstring)."""
        cfg, method = self.cfg, self.method
        torch.manual_seed(seed)
        self.model.train()
        loss, logs, ema_rows = semi_step(self.model, method, batch, image_u, self.step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        method.teacher.update(self.model, step=self.step - cfg.semi.sup_only_steps)
        if ema_rows is not None:
            assert method.plugin.bank is not None
            method.plugin.bank.ema_update(*ema_rows)
        return logs


def fill_memory(cfg: Config, device: torch.device, seed: int = 0) -> PrototypeMemory:
    """CPG memories of the preset's size, every class filled to ``queue_len`` rows of a
    Gaussian mixture (2-4 modes per class and kind; modes ``N(0, 1)``, noise std 0.5)."""
    g = torch.Generator().manual_seed(seed)
    c, d, q = cfg.data.num_classes, cfg.model.rep_dim, cfg.proto.queue_len
    kinds = ("high", "low") if cfg.proto.memory == "cpg" else ("all",)
    cap = q if cfg.proto.memory == "cpg" else 2 * q
    memory = PrototypeMemory(c, d, cap, kinds, device=device)
    for kind in kinds:
        feats, cls = [], []
        for k in range(c):
            n_modes = int(torch.randint(2, 5, (1,), generator=g))
            centres = torch.randn(n_modes, d, generator=g)
            mode = torch.randint(0, n_modes, (cap,), generator=g)
            feats.append(centres[mode] + 0.5 * torch.randn(cap, d, generator=g))
            cls.append(torch.full((cap,), k))
        memory.push(kind, torch.cat(feats).to(device), torch.cat(cls).to(device))
    return memory


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(
    quick: bool,
    device: torch.device,
    repeats: int | None = None,
    shapes: P2Shapes | None = None,
) -> dict[str, Any]:
    """Time the three step variants round-robin and the one-shot clustering."""
    shapes = shapes or (QUICK if quick else FULL)
    if repeats:
        shapes = replace(shapes, repeats=repeats)
    t_setup = time.perf_counter()
    cfg_b, cfg_m = make_config(shapes, "brpg"), make_config(shapes, "meanteacher")
    p = cfg_b.proto
    end = p.sample_start_step + p.sample_steps
    proto_step, sampling_step = end + 10, p.sample_start_step + 1
    assert phase_of(proto_step, cfg_b) == "proto" and phase_of(sampling_step, cfg_b) == "sampling"
    assert phase_of(proto_step, cfg_m) == "semi"

    x_l, y_l = make_batch(cfg_b, shapes.batch, shapes.crop, seed=0)
    x_u, _ = make_batch(cfg_b, shapes.batch, shapes.crop, seed=1)
    batch = {"image": x_l.to(device), "mask": y_l.to(device)}
    image_u = x_u.to(device)

    mt = Variant(cfg_m, proto_step, device)
    brpg = Variant(cfg_b, sampling_step, device)
    brpg.method.plugin.memory = brpg.method.plugin.new_memory()
    for i in range(shapes.fill_steps):  # the sampling window, then the one-shot clustering
        brpg.train_step(batch, image_u, seed=10_000 + i)
    assert brpg.method.plugin.memory is not None and brpg.method.plugin.bank is not None
    protos, valid = cluster_prototypes(
        brpg.method.plugin.memory, cfg_b, seed=cfg_b.train.seed + end
    )
    brpg.method.plugin.bank.set_prototypes(protos, valid)
    brpg.method.plugin.memory = None
    brpg.step = proto_step
    protos_per_class = brpg.method.plugin.bank.num_valid().tolist()
    sampling = Variant(cfg_b, sampling_step, device)
    sampling.method.plugin.memory = sampling.method.plugin.new_memory()
    setup_s = time.perf_counter() - t_setup

    seed_of = {"round": 0}
    last_logs: dict[str, dict[str, Any]] = {}

    def stepper(name: str, var: Variant) -> Callable[[], None]:
        def fn() -> None:
            last_logs[name] = var.train_step(batch, image_u, seed=seed_of["round"])
            if name == "brpg_sampling":  # the last variant of a round
                seed_of["round"] += 1

        return fn

    fns = {
        "meanteacher": stepper("meanteacher", mt),
        "brpg": stepper("brpg", brpg),
        "brpg_sampling": stepper("brpg_sampling", sampling),
    }
    loads = [loadavg()]
    samples = time_interleaved(
        fns, {name: shapes.repeats for name in fns}, device, warmup=shapes.warmup
    )
    loads.append(loadavg())

    # one-shot clustering at the preset's memory size (memories filled to capacity)
    memory = fill_memory(cfg_b, device, seed=0)
    cluster_s = []
    for r in range(shapes.cluster_repeats):
        _sync(device)
        t0 = time.perf_counter()
        protos, valid = cluster_prototypes(memory, cfg_b, seed=r)
        _sync(device)
        cluster_s.append(time.perf_counter() - t0)
    full_protos_per_class = valid.sum(1).tolist()
    loads.append(loadavg())

    meas = {name: summarize(s, "ms", 1e3) for name, s in samples.items()}
    meas["clustering"] = summarize(cluster_s, "s")
    med = {n: meas[n]["median"] for n in fns}
    mins = {n: meas[n]["min"] for n in fns}
    ratio = med["brpg"] / med["meanteacher"]
    cluster_ms = 1e3 * meas["clustering"]["median"]
    finite = all(
        bool(torch.isfinite(torch.as_tensor(v)).all())
        for logs in last_logs.values()
        for v in logs.values()
    )
    kinds = ("high", "low") if p.memory == "cpg" else ("all",)
    return {
        "status": "ok",
        "title": f"P2 training step, {PRESET} (batch {shapes.batch}+{shapes.batch}, "
        f"{shapes.crop} px)",
        "config": {
            **asdict(shapes),
            "preset": PRESET,
            "device": str(device),
            "model": {
                "backbone": cfg_b.model.backbone,
                "width": cfg_b.model.width,
                "rep_dim": cfg_b.model.rep_dim,
                "parameters": sum(t.numel() for t in mt.model.parameters()),
            },
            "steps": {
                "meanteacher": proto_step,
                "brpg": proto_step,
                "brpg_sampling": sampling_step,
            },
            "proto": {
                "grid_num": p.grid_num,
                "unsup_sample_num": p.unsup_sample_num,
                "sample_pixel_num": p.sample_pixel_num,
                "queue_len": p.queue_len,
                "kmeans_iters": p.kmeans_iters,
                "kmeans_n_init": p.kmeans_n_init,
            },
            "prototypes_per_class_after_fill": protos_per_class,
            "clustering_memory": {
                "kinds": list(kinds),
                "shape_per_kind": [cfg_b.data.num_classes, p.queue_len, cfg_b.model.rep_dim],
                "data": "Gaussian mixtures, 2-4 modes per class and kind, seed 0",
                "prototypes_per_class": full_protos_per_class,
            },
            "setup_s": setup_s,
        },
        "measurements": meas,
        "loadavg_during": loads,
        "ratios": {
            "brpg_over_meanteacher_time": ratio,
            "brpg_over_meanteacher_time_min": mins["brpg"] / mins["meanteacher"],
            "sampling_over_meanteacher_time": med["brpg_sampling"] / med["meanteacher"],
            "sampling_over_meanteacher_time_min": mins["brpg_sampling"] / mins["meanteacher"],
            "clustering_in_meanteacher_steps": cluster_ms / med["meanteacher"],
        },
        "targets": {
            "step_vs_meanteacher": target(
                ratio, "<=", 1.10, "t(BRPG step) / t(mean-teacher step), medians"
            ),
        },
        "check": {
            "losses_finite": finite,
            "brpg_has_loss_proto": "loss_proto" in last_logs.get("brpg", {}),
            "meanteacher_has_loss_proto": "loss_proto" in last_logs.get("meanteacher", {}),
        },
        "notes": [
            "steps: semi_step + zero_grad + backward + optimizer.step + scheduler.step + "
            "teacher EMA (+ prototype EMA for brpg), as Trainer.train_step on the CPU",
            "variants run round-robin with the same seed per round; medians over repeats",
            "clustering: one-shot APO + k-means on memories filled to capacity (seconds)",
        ],
    }


def main(argv: list[str] | None = None) -> int:
    """Run P2 alone, optionally at another batch size or crop; prints the suite's table."""
    from benchmarks.run import format_result

    ap = argparse.ArgumentParser(prog="python -m benchmarks.p2_training_step")
    ap.add_argument("--batch", type=int, default=FULL.batch, help="labeled = unlabeled batch")
    ap.add_argument("--crop", type=int, default=FULL.crop, help="scene size in pixels")
    ap.add_argument(
        "--repeats", type=int, default=None, help=f"timed steps (default {FULL.repeats})"
    )
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes (seconds)")
    ap.add_argument("--out", default=None, help="JSON output path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = QUICK if args.quick else FULL
    shapes = replace(base, batch=args.batch, crop=args.crop) if not args.quick else base
    load0 = loadavg()
    t0 = time.perf_counter()
    res = run(args.quick, torch.device(args.device), args.repeats, shapes=shapes)
    res.update(wall_s=time.perf_counter() - t0, loadavg_before=load0, loadavg_after=loadavg())
    res["threads"] = torch.get_num_threads()
    print(format_result("p2", res))
    print(f"threads {res['threads']}, load average before {load0}, after {res['loadavg_after']}")
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
