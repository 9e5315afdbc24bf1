"""Helpers of the prototype chapters (6: EMA updates, 7: L_pro) on top of :mod:`brpg.book.demo`.

- :func:`build_bank` → a :class:`~brpg.method.prototype_ema.PrototypeBank` clustered from a warm model's
  CPG memories, as the one-shot clustering leaves it (appendix: clustering and APO, prototype EMA);
- :func:`pixel_rows` → the stride-4 pixels of a batch as rows ``(feats[N, D], targets[N])``;
- :func:`class_means` → the per-class mean feature of such rows;
- :func:`accuracies` → pixel accuracy and per-class accuracy of a prediction;
- :func:`rep_head_inputs` → what the representation head reads (to train the head alone);
- :func:`head_inputs` and :func:`train_head` → chapter 7's experiment: the representation head
  alone trained with L_pro from a run's clustering step, the prototype classifier measured on
  val pixels along the way.

Everything is deterministic and runs on the CPU in seconds.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from brpg.book.demo import DemoRun, cluster, feature_batch, fill_memories, one_thread
from brpg.method.prototype_ema import PrototypeBank
from brpg.method.prototype_loss import (
    prototype_loss,
    pseudo_threshold,
    sample_labeled_grid,
    sample_unlabeled,
)

__all__ = [
    "Accuracy",
    "HeadInputs",
    "HeadTraining",
    "accuracies",
    "build_bank",
    "class_means",
    "head_inputs",
    "pixel_rows",
    "rep_head_inputs",
    "train_head",
]


def build_bank(
    run: DemoRun,
    n_batches: int = 8,
    batch_size: int = 16,
    apo: bool = True,
    seed: int | None = None,
) -> PrototypeBank:
    """Cluster CPG memories (:func:`brpg.book.demo.cluster`, APO on by default) and load the
    result into a fresh bank with the preset's EMA momentum (``cfg.proto.ema_momentum``).

    The memories are the run's own when it has them (a :func:`brpg.book.demo.clustering_state`
    replay), clustered with the run's seed (``train.seed + step``), so the bank is the one the
    run built; otherwise they are filled from the model by
    :func:`brpg.book.demo.fill_memories` (``n_batches`` × ``batch_size``, seed ``seed`` or 0).
    """
    if run.memory is not None:
        memory = run.memory
        seed = run.cfg.train.seed + (run.step or 0) if seed is None else seed
    else:
        seed = 0 if seed is None else seed
        memory = fill_memories(run, n_batches, batch_size, seed=seed)
    protos_ckd, valid_ck = cluster(memory, run.cfg, apo=apo, seed=seed)
    c, k, d = protos_ckd.shape
    bank = PrototypeBank(c, d, k, momentum=run.cfg.proto.ema_momentum, sync=False)
    bank.set_prototypes(protos_ckd, valid_ck)
    return bank


def pixel_rows(rep_bdhw: Tensor, labels_small_bhw: Tensor) -> tuple[Tensor, Tensor]:
    """Every stride-4 pixel as a row: ``(feats[B·h·w, D], targets[B·h·w])`` in (b, y, x) order.

    ``labels_small_bhw`` must have the map's size (e.g. ``feature_batch(...)
    ["labels_small_bhw"]``); ignore labels (255) are kept, so the rows line up with the map.
    """
    if (
        rep_bdhw.shape[0] != labels_small_bhw.shape[0]
        or rep_bdhw.shape[2:] != labels_small_bhw.shape[1:]
    ):
        raise ValueError(
            f"rep {tuple(rep_bdhw.shape)} and labels {tuple(labels_small_bhw.shape)} differ in B, h, w"
        )
    feats_nd = rep_bdhw.permute(0, 2, 3, 1).reshape(-1, rep_bdhw.shape[1])
    return feats_nd, labels_small_bhw.reshape(-1).long()


def class_means(feats: Tensor, targets: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Mean raw feature of each class, ``([C, D], counts[C])``; targets outside ``[0, C)`` are
    skipped and a class without rows gets a zero mean (count 0)."""
    feats_nd, targets_n = feats.detach().float(), targets.long()
    use_n = (targets_n >= 0) & (targets_n < num_classes)
    cls_n = torch.where(use_n, targets_n, torch.zeros_like(targets_n))
    w_n = use_n.to(feats_nd.dtype)
    sums_cd = torch.zeros(num_classes, feats_nd.shape[1]).index_add_(
        0, cls_n, feats_nd * w_n[:, None]
    )
    counts_c = torch.zeros(num_classes).index_add_(0, cls_n, w_n)
    return sums_cd / counts_c.clamp_min(1.0)[:, None], counts_c.long()


class Accuracy(NamedTuple):
    """Pixel accuracy, per-class accuracy (NaN for a class absent from the targets) and
    their mean over the present classes (the "mean class accuracy")."""

    pixel: float
    per_class: Tensor
    mean_class: float


def accuracies(pred: Tensor, targets: Tensor, num_classes: int) -> Accuracy:
    """:class:`Accuracy` of predictions ``pred[N]`` against ``targets[N]`` (outside ``[0, C)``
    ignored)."""
    pred_n, targets_n = pred.reshape(-1).long(), targets.reshape(-1).long()
    use_n = (targets_n >= 0) & (targets_n < num_classes)
    pred_n, targets_n = pred_n[use_n], targets_n[use_n]
    hit_n = (pred_n == targets_n).float()
    total_c = torch.bincount(targets_n, minlength=num_classes).float()
    hits_c = torch.zeros(num_classes).index_add_(0, targets_n, hit_n)
    per_class = torch.where(total_c > 0, hits_c / total_c.clamp_min(1.0), float("nan"))
    return Accuracy(
        pixel=float(hit_n.mean()),
        per_class=per_class,
        mean_class=float(per_class[total_c > 0].mean()),
    )


@torch.no_grad()
def rep_head_inputs(
    run: DemoRun, split: str = "labeled", n_images: int = 16, start: int = 0
) -> tuple[Tensor, dict[str, Tensor]]:
    """The decoder features the representation head reads, ``[B, 2·D_dec, h, w]``, together
    with :func:`brpg.book.demo.feature_batch` of the same images (eval mode).

    With them, ``run.model.decoder.rep_head(x)`` recomputes ``rep`` without the encoder and
    the rest of the decoder, so a chapter can train the head alone in milliseconds per step.
    """
    head = run.model.decoder.rep_head
    if head is None:
        raise ValueError("the model has no representation head")
    seen: list[Tensor] = []
    hook = head.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    try:
        batch = feature_batch(run, split, n_images, start)
    finally:
        hook.remove()
    return seen[-1], batch


@dataclass
class HeadInputs:
    """What chapter 7's head-alone training reads, computed once per run state
    (:func:`head_inputs`): the run's clustered ``bank``; the representation head's inputs
    ``x_*`` and :func:`brpg.book.demo.feature_batch` outputs (``lab``, ``unl``, ``val``) of
    the labeled scenes, ``n_unlabeled`` unlabeled and ``n_val`` val scenes; and the softmax
    head's accuracy on the val pixels."""

    bank: PrototypeBank
    x_l: Tensor
    lab: dict[str, Tensor]
    x_u: Tensor
    unl: dict[str, Tensor]
    x_v: Tensor
    val: dict[str, Tensor]
    softmax_acc: Accuracy


def head_inputs(run: DemoRun, n_unlabeled: int = 128, n_val: int = 200) -> HeadInputs:
    """:class:`HeadInputs` of ``run`` (a state at its clustering step, with memories)."""
    bank = build_bank(run)
    x_l, lab = rep_head_inputs(run, "labeled", len(run.labeled))  # type: ignore[arg-type]
    x_u, unl = rep_head_inputs(run, "unlabeled", n_unlabeled)
    x_v, val = rep_head_inputs(run, "val", n_val)
    softmax_acc = accuracies(val["pred_bhw"], val["labels_small_bhw"], bank.num_classes)
    return HeadInputs(bank, x_l, lab, x_u, unl, x_v, val, softmax_acc)


@dataclass
class HeadTraining:
    """:func:`train_head`'s record: ``curve`` of ``(step, Accuracy)`` of the prototype
    classifier on the val pixels (step 0 = the clustered bank), ``losses[n_steps, 2]``
    (L_pro on the labeled grid, on the unlabeled pixels), the trained ``head`` and ``bank``."""

    curve: list[tuple[int, Accuracy]]
    losses: Tensor
    head: nn.Module
    bank: PrototypeBank


def train_head(
    run: DemoRun,
    inputs: HeadInputs,
    n_steps: int = 200,
    every: int = 10,
    batch: int = 16,
    seed: int = 0,
) -> HeadTraining:
    """Train only the representation head with L_pro from the run's clustering step on
    (appendix: one step, L_pro, prototype EMA): encoder and decoder frozen, the run's AdamW
    settings, ``batch`` labeled + ``batch`` unlabeled scenes a step; L_pro on the preset's
    labeled grid and on the unlabeled pixels whose confidence (the run's model as teacher, at
    stride 4) reaches the step's threshold, then the bank's EMA on the same features.
    ``inputs.bank`` is left as it is (the training updates a copy). Deterministic: scenes
    and sampling from ``seed``, dropout from ``torch.manual_seed(seed)`` inside
    :func:`torch.random.fork_rng`."""
    cfg, p = run.cfg, run.cfg.proto
    head = copy.deepcopy(run.model.decoder.rep_head)
    bank = copy.deepcopy(inputs.bank)
    optimizer = torch.optim.AdamW(
        head.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay
    )
    start = run.step if run.step is not None else 0
    x_l, x_u, x_v = inputs.x_l, inputs.x_u, inputs.x_v
    labels_l = inputs.lab["labels_bhw"]
    conf_u, pseudo_u = inputs.unl["conf_bhw"], inputs.unl["pred_bhw"]
    y_v = inputs.val["labels_small_bhw"]

    @torch.no_grad()
    def proto_accuracy() -> Accuracy:
        head.eval()
        feats, targets = pixel_rows(head(x_v), y_v)
        return accuracies(bank.logits(feats, p.tau).argmax(1), targets, bank.num_classes)

    gen = torch.Generator().manual_seed(seed)
    curve = [(0, proto_accuracy())]
    losses = torch.zeros(n_steps, 2)
    with one_thread(), torch.random.fork_rng(devices=[]):  # small tensors: one thread is faster
        torch.manual_seed(seed)  # dropout masks
        for step in range(n_steps):
            il = torch.randint(0, x_l.shape[0], (batch,), generator=gen)
            iu = torch.randint(0, x_u.shape[0], (batch,), generator=gen)
            head.train()
            rep = head(torch.cat([x_l[il], x_u[iu]]))
            f_l, y_l = sample_labeled_grid(rep[:batch], labels_l[il], p.grid_num)
            thr = pseudo_threshold(start + step, 1, cfg.train.steps, p.thr_start, p.thr_end,
                                   p.thr_delay_steps, p.thr_clamp_low)  # fmt: skip
            f_u, y_u = sample_unlabeled(
                rep[batch:], conf_u[iu], pseudo_u[iu], thr, p.unsup_sample_num, generator=gen
            )
            loss_l = prototype_loss(bank, f_l, y_l, p.tau)
            loss_u = prototype_loss(bank, f_u, y_u, p.tau)
            optimizer.zero_grad()
            (loss_l + loss_u).backward()
            optimizer.step()
            bank.ema_update(torch.cat([f_l, f_u]).detach(), torch.cat([y_l, y_u]))
            losses[step, 0], losses[step, 1] = loss_l.detach(), loss_u.detach()
            if (step + 1) % every == 0:
                curve.append((step + 1, proto_accuracy()))
    return HeadTraining(curve, losses, head, bank)
