"""How a cell's preset is adapted to where it runs: the ``smoke`` profile and the GPU count.

``full`` runs the preset as written. ``smoke`` keeps everything that decides *which code runs*
(data set, method and its phases, loss terms, evaluation protocol) and shrinks everything that
decides *how long it takes*: the small CPU encoder, 33-px crops, 8 steps (warm-up, sampling
window and prototype phase get two or more steps each), tiny memories; and it lowers the
unlabeled confidence thresholds of BRPG to 0, since an untrained model is never confident and
the memories, the clustering and L_pro would otherwise see no pixel. The low memories are not
helped by this: they take labeled pixels that the student classifies *correctly* below
``proto.high_threshold``, and a model trained for two steps on the fixtures' noise images
classifies few or none. A VOC or Cityscapes smoke cell can therefore end with no class that
has both kinds of prototype; on COCO the back-queue fallback fills the low memories. It also
runs in fp32 (``train.amp=off``): the presets' ``auto`` would use bf16 autocast on CPUs with
native bf16 and fp32 on the others, so the same smoke cell would print other numbers on another
machine. A smoke result checks the pipeline end to end; its mIoU means nothing and is never
reported next to the paper's.

The presets are written for the paper's 4 GPUs (``train.batch_size`` per process). On ``G``
GPUs, :func:`gpu_overrides` keeps the paper's effective batch of ``4·B`` images per step with
one of three policies (users of U2PL and UniMatch report lower numbers when they run a
4-GPU recipe on one GPU unchanged):

- ``accumulate`` (default): ``train.grad_accum = 4 / G`` micro-batches of ``B`` per optimiser
  step. Same images per step and same schedule; BatchNorm sees ``B`` images per forward (4·B
  with the paper's SyncBN), and a step takes ``4 / G`` times as long. When ``G`` does not
  divide 4 (3 or 8 GPUs) it falls back to ``batch``.
- ``batch``: ``train.batch_size = 4·B / G`` per GPU. Closest to the paper (BN sees 4·B images
  on one GPU) when the memory allows it; measure before a long run.
- ``linear``: keep ``B`` per GPU, scale the LR linearly by ``G / 4`` and every step count by
  ``4 / G`` (the linear scaling rule; an approximation).
- ``none``: run the 4-GPU steps unchanged (each step sees ``G / 4`` of the paper's images).
"""

from __future__ import annotations

from brpg.config import Config
from brpg.data.benchmarks import sliding_stride
from brpg.reproduce.cells import PAPER_WORLD_SIZE

PROFILES = ("full", "smoke")
BATCH_POLICIES = ("accumulate", "batch", "linear", "none")

#: The fixture split of each table (``brpg.prepare.fixtures`` writes these lists).
FIXTURE_SPLITS = {"voc_classic": "1", "voc_blended": "3", "cityscapes": "1", "coco": "1_2"}
FIXTURE_SPLIT_OF_DATASET = {"pascal": "3", "cityscapes": "1", "coco": "1_2"}

SMOKE_CROP = 33  # 33 = 4·8 + 1: the stride-4 map is 9 px and the 9×9 labeled grid is exact
SMOKE_STEPS = 8


class ProfileError(ValueError):
    """A profile or batch policy that cannot be applied; the message says why and what to do."""


def smoke_overrides(cfg: Config, fixture_split: str | None = None) -> list[str]:
    """``--set`` overrides that turn ``cfg`` into an 8-step CPU-sized run of the same code.

    ``fixture_split`` replaces the split lists by that split folder of the same data set (the
    miniature fixture data has its own, tiny splits).
    """
    sets = [
        "data.num_workers=0",
        f"data.crop_size={SMOKE_CROP}",
        "model.backbone=small",
        "model.width=8",
        "model.decoder_channels=16",
        "model.rep_dim=16",
        "model.aspp_rates=[1, 2, 3]",
        "model.pretrained=null",
        f"train.steps={SMOKE_STEPS}",
        "train.amp=off",  # the same numbers on every CPU (module docstring)
        "train.batch_size=2",
        "train.eval_every=4",
        "train.ckpt_every=2",
        "train.log_every=1",
        "loss.ohem_min_kept=200",
        f"eval.crop_size={SMOKE_CROP}",
        f"eval.stride={sliding_stride(SMOKE_CROP)}",
        f"eval.batch_size={2 if cfg.eval.protocol == 'center_crop' else 1}",
    ]
    if fixture_split is not None:
        ds = cfg.data.name
        sets += [
            f"data.labeled_split=splits/{ds}/{fixture_split}/labeled.txt",
            f"data.unlabeled_split=splits/{ds}/{fixture_split}/unlabeled.txt",
        ]
    if cfg.train.framework != "suponly":
        sets += ["semi.sup_only_steps=2", "semi.unlabeled_batch_size=2"]
    if cfg.train.brpg:
        sets += [
            "proto.sample_start_step=2",
            "proto.sample_steps=2",
            "proto.thr_delay_steps=2",
            "proto.sample_pixel_num=32",
            "proto.queue_len=256",
            "proto.grid_num=8",
            "proto.unsup_sample_num=32",
            "proto.kmeans_iters=10",
            # an untrained model is never 80 % confident: without these, no pixel reaches the
            # memories, no class gets prototypes and the L_pro code would not run at all
            "proto.unlabeled_threshold=0.0",
            "proto.thr_start=0.0",
            "proto.thr_end=0.5",
        ]
    return sets


def gpu_overrides(cfg: Config, processes: int, policy: str = "accumulate") -> list[str]:
    """Overrides that keep the paper's effective batch on ``processes`` GPUs (module docstring).

    ``processes`` is the number of training processes (1 for one GPU or a CPU).
    """
    if policy not in BATCH_POLICIES:
        raise ProfileError(f"batch_policy={policy!r}: use one of {', '.join(BATCH_POLICIES)}")
    if processes < 1:
        raise ProfileError(f"processes={processes}: need at least one training process")
    w = PAPER_WORLD_SIZE
    if policy == "none" or processes == w:
        return []
    t, s = cfg.train, cfg.semi
    b_u = s.unlabeled_batch_size or t.batch_size
    if policy == "accumulate":
        if w % processes == 0:
            return [f"train.grad_accum={w // processes}"]
        policy = "batch"  # e.g. 8 GPUs: halve the per-GPU batch instead
    if policy == "batch":
        total, total_u = t.batch_size * w, b_u * w
        if total % processes or total_u % processes:
            raise ProfileError(
                f"the paper's batch of {total} images per step does not split over {processes}"
                f" GPUs; use a GPU count that divides {total}, or batch_policy=linear"
            )
        sets = [f"train.batch_size={total // processes}"]
        if cfg.train.framework != "suponly":
            sets.append(f"semi.unlabeled_batch_size={total_u // processes}")
        return sets
    # linear: same per-GPU batch, LR x G/4, every step count x 4/G
    factor = w / processes

    def scaled(v: int) -> int:
        return max(1, round(v * factor)) if v > 0 else v

    sets = [
        f"optim.lr={cfg.optim.lr * processes / w:.6g}",
        f"train.steps={scaled(t.steps)}",
        f"train.eval_every={scaled(t.eval_every)}",
        f"train.ckpt_every={scaled(t.ckpt_every)}",
        f"optim.warmup_steps={scaled(cfg.optim.warmup_steps)}",
    ]
    if cfg.train.framework != "suponly":
        sets.append(f"semi.sup_only_steps={scaled(s.sup_only_steps)}")
    if cfg.train.brpg:
        p = cfg.proto
        sets += [
            f"proto.sample_start_step={scaled(p.sample_start_step)}",
            f"proto.sample_steps={scaled(p.sample_steps)}",
            f"proto.thr_delay_steps={scaled(p.thr_delay_steps)}",
        ]
    return sets
