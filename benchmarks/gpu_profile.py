"""GPU profile of a VOC paper-scale BRPG step (issue 5): time, peak memory, prototype share.

The cell is ``voc_brpg_classic_366`` as its preset sets it: DeepLabV3+ on a deep-stem
ResNet-101 (OS8), 513 crops, 4 labeled + 4 unlabeled images per GPU, autocast (bf16 where the
GPU supports it, as ``train.amp=auto``). Three steps are timed round-robin on one GPU, as
:mod:`benchmarks.p2_training_step` times them on the CPU (same :class:`Variant`):

- ``meanteacher``: the step without prototypes (spec §4);
- ``brpg``: a step of the prototype phase (L_pro + prototype EMA), after a short sampling
  window and the one-shot clustering;
- ``brpg_sampling``: a step of the sampling window (CPG routing + memory push);

plus the one-shot clustering on memories filled to capacity (21 × 30,000 × 256 per kind).
The *prototype share* of a step is ``1 − t(meanteacher) / t(brpg)``. Peak memory is
``torch.cuda.max_memory_allocated`` over one step of each variant.

Images are random normal tensors and masks are random 8 × 8 blocks of classes (the timing
does not depend on the pixels; the memories and prototypes need several classes per image).
Weights are random (nothing is downloaded). Run on a GPU machine::

    python -m benchmarks.gpu_profile --out results/gpu_profile.json

``--quick`` runs tiny shapes on the CPU in seconds (the tests do); its numbers are not a
profile and are marked as such.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from typing import Any

import torch
from torch import Tensor

from benchmarks.common import summarize, time_interleaved, write_json
from benchmarks.p2_training_step import Variant, fill_memory
from brpg.config import Config, load_config
from brpg.engine import runtime
from brpg.method.clustering import cluster_prototypes
from brpg.timeline import phase_of

PRESET = "voc_brpg_classic_366"
QUICK_OVERRIDES = (
    "model.backbone=small",
    "model.width=8",
    "model.decoder_channels=16",
    "model.rep_dim=16",
    "model.aspp_rates=[1, 2, 3]",
    "data.crop_size=33",
    "train.batch_size=2",
    "semi.unlabeled_batch_size=2",
    "proto.sample_pixel_num=16",
    "proto.queue_len=300",
    "proto.grid_num=8",
    "proto.unsup_sample_num=16",
    "proto.kmeans_iters=5",
    "proto.kmeans_n_init=1",
    "proto.unlabeled_threshold=0.0",
    "loss.ohem_min_kept=200",
)


def make_config(method: str, quick: bool) -> Config:
    sets = ["train.framework=meanteacher", f"train.brpg={str(method == 'brpg').lower()}"]
    return load_config(PRESET, [*sets, *(QUICK_OVERRIDES if quick else ())])


def make_batch(cfg: Config, n: int, seed: int) -> tuple[Tensor, Tensor]:
    """Random normalised images ``[n, 3, H, H]`` and block masks ``[n, H, H]`` (long)."""
    g = torch.Generator().manual_seed(seed)
    h, c = cfg.data.crop_size, cfg.data.num_classes
    images = torch.randn(n, 3, h, h, generator=g)
    blocks = torch.randint(0, c, (n, 1, 8, 8), generator=g).float()
    masks = torch.nn.functional.interpolate(blocks, size=(h, h), mode="nearest")[:, 0].long()
    masks[:, :2] = 255  # an ignored border, as VOC's object outlines
    return images, masks


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run(device: torch.device, quick: bool = False, repeats: int = 10) -> dict[str, Any]:
    cfg_b, cfg_m = make_config("brpg", quick), make_config("meanteacher", quick)
    amp = runtime.amp_dtype(cfg_b.train.amp, device)
    p = cfg_b.proto
    end = p.sample_start_step + p.sample_steps
    proto_step, sampling_step = end + 10, p.sample_start_step + 1
    assert phase_of(proto_step, cfg_b) == "proto" and phase_of(sampling_step, cfg_b) == "sampling"
    b = cfg_b.train.batch_size
    x_l, y_l = make_batch(cfg_b, b, seed=0)
    x_u, _ = make_batch(cfg_b, b, seed=1)
    batch = {"image": x_l.to(device), "mask": y_l.to(device)}
    image_u = x_u.to(device)

    def autocast() -> contextlib.AbstractContextManager:
        if amp is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp)

    mt = Variant(cfg_m, proto_step, device)
    brpg = Variant(cfg_b, sampling_step, device)
    brpg.method.plugin.memory = brpg.method.plugin.new_memory()
    for i in range(3):  # a short sampling window, then the one-shot clustering
        with autocast():
            brpg.train_step(batch, image_u, seed=10_000 + i)
    assert brpg.method.plugin.memory is not None and brpg.method.plugin.bank is not None
    protos, valid = cluster_prototypes(
        brpg.method.plugin.memory, cfg_b, seed=cfg_b.train.seed + end
    )
    brpg.method.plugin.bank.set_prototypes(protos, valid)
    brpg.method.plugin.memory = None
    brpg.step = proto_step
    sampling = Variant(cfg_b, sampling_step, device)
    sampling.method.plugin.memory = sampling.method.plugin.new_memory()
    variants = {"meanteacher": mt, "brpg": brpg, "brpg_sampling": sampling}

    def stepper(var: Variant, seed: int = 0):
        def fn() -> None:
            with autocast():
                var.train_step(batch, image_u, seed=seed)

        return fn

    samples = time_interleaved(
        {n: stepper(v) for n, v in variants.items()},
        {n: repeats for n in variants},
        device,
        warmup=2,
    )
    peak: dict[str, float | None] = {}
    for name, var in variants.items():
        if device.type == "cuda":
            _sync(device)
            torch.cuda.reset_peak_memory_stats(device)
            stepper(var)()
            _sync(device)
            peak[name] = torch.cuda.max_memory_allocated(device) / 2**30
        else:
            peak[name] = None

    memory = fill_memory(cfg_b, device, seed=0)
    _sync(device)
    t0 = time.perf_counter()
    cluster_prototypes(memory, cfg_b, seed=0)
    _sync(device)
    cluster_s = time.perf_counter() - t0

    meas = {n: summarize(s, "ms", 1e3) for n, s in samples.items()}
    t_mt, t_b = meas["meanteacher"]["median"], meas["brpg"]["median"]
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "what": "VOC paper-scale BRPG step" if not quick else "QUICK CPU shapes: not a profile",
        "preset": PRESET,
        "quick": quick,
        "hardware": gpu or f"CPU ({runtime.machine_info(device)['cpu_count']} cores)",
        "machine": runtime.machine_info(device),
        "commit": runtime.git_commit(),
        "amp": str(amp).replace("torch.", "") if amp is not None else "off",
        "shapes": {
            "backbone": cfg_b.model.backbone,
            "crop": cfg_b.data.crop_size,
            "labeled_per_gpu": b,
            "unlabeled_per_gpu": cfg_b.semi.unlabeled_batch_size or b,
            "queue_len": p.queue_len,
            "rep_dim": cfg_b.model.rep_dim,
        },
        "step_ms": meas,
        "peak_memory_gib": peak,
        "prototype_share_of_brpg_step": 1.0 - t_mt / t_b,
        "sampling_over_meanteacher": meas["brpg_sampling"]["median"] / t_mt,
        "clustering_s": cluster_s,
        "prototypes_per_class": brpg.method.plugin.bank.num_valid().tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_profile", description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--quick", action="store_true", help="tiny CPU shapes (tests)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", help="JSON path (e.g. results/gpu_profile.json)")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.quick else args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run on a GPU machine, or --quick for a CPU check")
    res = run(device, quick=args.quick, repeats=args.repeats)
    print(json.dumps({k: res[k] for k in ("hardware", "step_ms", "peak_memory_gib")}, indent=1))
    print(f"prototype share of a BRPG step: {100 * res['prototype_share_of_brpg_step']:.1f} %")
    if args.out:
        write_json(args.out, res)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
