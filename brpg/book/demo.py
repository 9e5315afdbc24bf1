"""Small helpers the book's method chapters share: a warm model, its features, CPG memories.

The chapters on confidence (CPG routing, appendix: CPG), separate clustering (appendix: clustering
and APO) and APO (appendix: clustering and APO) all look at the same object: a segmentation model at
the moment BRPG clusters its memories. This module trains that model once (cached under
``runs/book/``), gives a chapter a deterministic batch of its stride-4 outputs, and fills
:class:`~brpg.method.memory.PrototypeMemory` the way the sampling window does, on the CPU and
without a trainer.

- :func:`run_state` → :class:`DemoRun` of a committed BRPG study run at a step (read from a
  committed file, or re-run to it): its student, teacher, CPG memories or prototype bank, and
  how closely the replay follows the committed log; :func:`clustering_state` is its state at
  the step at which it clusters; :class:`EverySeed` walks every committed seed's saved states;
- :func:`warm_model` → :class:`DemoRun` (config, eval-mode CPU model, datasets, summary);
- :func:`feature_batch` → images, labels (full and stride 4), logits, rep, confidence;
- :func:`boundary_distance` → distance of every pixel to the nearest class boundary;
- :func:`appearance_modes` → solid / hollow mode of the multi-modal digits' pixels;
- :func:`fill_memories` → the high / low memories of the appendix (CPG);
- :func:`cluster` → the trainer's one-shot clustering
  (:func:`brpg.method.clustering.cluster_prototypes`) of such memories.

Everything here is deterministic: the datasets use the evaluation transform (no random
crop), and the train-mode (dropout) forwards of :func:`feature_batch` and
:func:`fill_memories` draw from a seeded RNG that leaves torch's global RNG untouched.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch import Tensor, nn
from torch.utils.data import Dataset

from brpg import distributed
from brpg.book.study import logged_values, val_curve
from brpg.config import Config, load_config
from brpg.data.build import resolve_data_root
from brpg.engine import runtime
from brpg.engine.checkpoint import load_checkpoint
from brpg.engine.trainer import CKPT_NAME, Trainer
from brpg.method.clustering import cluster_prototypes, slot_budgets
from brpg.method.cpg import (
    confidence,
    cpg_rows,
    downsample_labels,
)
from brpg.method.memory import PrototypeMemory
from brpg.method.prototype_ema import PrototypeBank
from brpg.models import build_model
from brpg.timeline import cluster_due

__all__ = [
    "DEMO_CAPACITY",
    "DEMO_SAMPLE_PIXEL_NUM",
    "MIXED_MODES",
    "STATE_PARTS",
    "DemoRun",
    "appearance_modes",
    "boundary_distance",
    "cluster",
    "clustering_state",
    "clustering_step",
    "demo_datasets",
    "feature_batch",
    "fill_memories",
    "last_eval",
    "log_gap",
    "one_thread",
    "run_dir_for",
    "run_state",
    "save_run_state",
    "state_file",
    "warm_model",
]

# The DigitScenes BRPG presets' budgets (brpg/configs/_digits_semi.yaml, scaled from the appendix
# (CPG): 64 rows per image and step instead of 5000, 10,000 rows per memory instead of 30,000).
DEMO_SAMPLE_PIXEL_NUM = 64
DEMO_CAPACITY = 10_000

SPLITS = ("labeled", "unlabeled", "val")


@dataclass
class DemoRun:
    """A trained model and its data, as the method chapters use them.

    ``model`` is on the CPU in eval mode. The datasets use the *evaluation* transform (no
    random scale or crop) so that item ``i`` is always the same tensor; ``unlabeled`` carries
    its masks too, for diagnostics only (BRPG never reads them).

    The state of a committed run (:func:`run_state`) also carries the ``step`` it stopped at
    (before that step), the EMA ``teacher`` (eval mode, CPU), the CPG ``memory`` its sampling
    window filled (at the clustering step) or the prototype ``bank`` its steps fed (after it),
    and ``log_gap``, the largest difference, per logged quantity, between the replay that
    made it and the committed run's log (see :func:`log_gap`); ``summary`` is then the
    committed run's summary.
    """

    cfg: Config
    model: nn.Module
    labeled: Dataset
    unlabeled: Dataset
    val: Dataset
    summary: dict[str, Any]
    run_dir: Path
    memory: PrototypeMemory | None = None
    step: int | None = None
    log_gap: dict[str, float] | None = None
    teacher: nn.Module | None = None
    bank: PrototypeBank | None = None

    def dataset(self, split: str) -> Dataset:
        """``labeled``, ``unlabeled`` or ``val``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return getattr(self, split)


def demo_datasets(cfg: Config) -> tuple[Dataset, Dataset, Dataset]:
    """``(labeled, unlabeled, val)`` DigitScenes datasets, all with the evaluation transform.

    The unlabeled set keeps its masks (to measure things, never to train).
    """
    from brpg.data import build_digit_datasets
    from brpg.data.transforms import build_eval_transform

    d = cfg.data
    if d.name != "digits":
        raise ValueError(f"brpg.book.demo works on DigitScenes only, not data.name={d.name!r}")
    local = replace(d, root=str(resolve_data_root(d.root)))
    eval_t = build_eval_transform(local)
    return build_digit_datasets(
        local,
        train_transform=eval_t,
        unlabeled_transform=eval_t,
        eval_transform=eval_t,
        unlabeled_with_mask=True,
        **d.digits_knobs,
    )


def run_dir_for(
    preset: str,
    steps: int,
    seed: int,
    run_root: str | Path = "runs/book",
    overrides: list[str] | None = None,
) -> Path:
    """``<run_root>/<preset>_s<steps>_seed<seed>[_<hash of overrides>]``.

    A relative ``run_root`` is resolved like the data root
    (:func:`brpg.data.build.resolve_data_root`): ``$BRPG_HOME``, else the checkout, so a
    notebook running in ``book/`` and a script in the repository root share the cache.
    """
    name = f"{preset}_s{steps}_seed{seed}"
    if overrides:
        name += "_" + hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    return resolve_data_root(str(run_root)) / name


def warm_model(
    preset: str = "digits_suponly_1_16",
    steps: int = 300,
    seed: int = 0,
    run_root: str | Path = "runs/book",
    overrides: list[str] | None = None,
) -> DemoRun:
    """Train ``preset`` for ``steps`` supervised steps with a representation head, or reuse it.

    The data are the preset's (DigitScenes version 3 for the ``digits_*`` presets) unless
    ``overrides`` say otherwise. Chapters 8 and 8b start their short live runs from it; the
    method chapters study the committed study runs instead (:func:`run_state`).

    The model is trained with ``model.rep_head=true`` by :class:`brpg.engine.trainer.Trainer`
    into :func:`run_dir_for`. A run directory whose ``summary.json`` exists (and whose config
    hash matches) is reused, so the chapters share one training across runs; one without
    ``summary.json`` but with a checkpoint is resumed; one with a different config is
    replaced.

    The representation head takes no part in the supervised loss, so it stays at its random
    initialisation (only its BatchNorm statistics follow the data). That is exactly the state
    of the faithful algorithm when it clusters: the sampling window and the one-shot
    clustering come before ``L_pro`` ever trains the head (appendix: timeline, clustering and APO),
    so the prototypes are k-means centres of features that a *random* head computes from a decoder
    trained by ``L_s`` (and, in a full run, ``L_u``). ``DemoRun.model`` is the trained model, on the
    CPU, in eval mode.
    """
    extra = [f"train.steps={steps}", f"train.seed={seed}", "model.rep_head=true"]
    cfg = load_config(preset, [*extra, *(overrides or [])])
    run_dir = run_dir_for(preset, steps, seed, run_root, overrides)
    summary_path = run_dir / "summary.json"
    with distributed.exclusive_lock(
        run_dir
    ):  # two notebooks asking at once: one trains, the other waits
        summary: dict[str, Any] | None = None
        if summary_path.exists():
            summary = json.loads(summary_path.read_text())
            if summary.get("config_hash") != cfg.hash():
                shutil.rmtree(run_dir)  # made by another version of the config: train anew
                summary = None
        if summary is None:
            resume = (run_dir / CKPT_NAME).exists()
            summary = Trainer(cfg, run_dir, resume=resume, progress=False).fit()
    model = build_model(cfg.model, cfg.data.num_classes)
    model.load_state_dict(load_checkpoint(run_dir / CKPT_NAME, map_location="cpu")["model"])
    model.eval()
    labeled, unlabeled, val = demo_datasets(cfg)
    return DemoRun(cfg, model, labeled, unlabeled, val, summary, run_dir)


def clustering_step(cfg: Config) -> int:
    """The step before which a BRPG run clusters its memories for the first time (the end of
    the sampling window, appendix: timeline)."""
    if not cfg.train.brpg:
        raise ValueError(f"{cfg.name} is not a BRPG run (train.brpg=false): it never clusters")
    step = cfg.proto.sample_start_step + cfg.proto.sample_steps
    assert cluster_due(step, cfg)
    return step


def log_gap(replayed: Path, committed: Path, until: int) -> dict[str, float]:
    """Per logged quantity (``loss_sup``, ``val_miou``, …), the largest absolute difference
    between two runs' ``log.jsonl`` up to step ``until``. Raises if the two logged different
    steps or quantities (a replay of another config)."""
    a, b = logged_values(replayed, until), logged_values(committed, until)
    if a.keys() != b.keys():
        only = sorted(a.keys() ^ b.keys())[:5]
        raise ValueError(
            f"{replayed} and {committed} logged different things up to {until}: {only}"
        )
    gap = dict.fromkeys((k for _, k in a), 0.0)
    for (step, k), v in a.items():
        gap[k] = max(gap[k], abs(v - b[step, k]))
    return gap


def last_eval(run: DemoRun) -> dict[str, Any]:
    """The last evaluation ``{"step", "val_miou", "val_mbiou"}`` in ``run``'s log up to
    ``run.step`` (for a state at clustering, the one before its clustering step;
    ``run.summary`` is the finished run's)."""
    curve = val_curve(run.run_dir / "log.jsonl")
    evals = [e for e in curve if run.step is None or e[0] <= run.step]
    if not evals:
        raise ValueError(f"{run.run_dir}: no evaluation logged yet")
    step, miou, mbiou = evals[-1]
    return {"step": step, "val_miou": miou, "val_mbiou": mbiou}


def state_file(step: int) -> str:
    """Name of a committed run's state at ``step``, beside its ``summary.json``."""
    return f"state_at_step{step}.pt"


def _pack_memory(memory: PrototypeMemory) -> dict[str, Any]:
    """The filled part of every ring (slots ``0 … count-1`` of each class; a ring fills from
    slot 0, so for a class that never wrapped this is all of it), with ``ptr`` and ``count``:
    the exact ring layout, which k-means++ seeding depends on, in far less space."""
    out: dict[str, Any] = {"capacity": memory.capacity, "kinds": list(memory.kinds)}
    for k in memory.kinds:
        feats, count = memory.feats(k), memory.count[k].cpu()
        rows = [feats[c, : int(count[c])].cpu() for c in range(memory.num_classes)]
        out[k] = {"rows": torch.cat(rows), "count": count, "ptr": memory.ptr[k].cpu()}
    return out


def _unpack_memory(packed: dict[str, Any], num_classes: int, dim: int) -> PrototypeMemory:
    memory = PrototypeMemory(
        num_classes, dim, packed["capacity"], packed["kinds"], device="cpu", sync=False
    )
    for k in memory.kinds:
        feats, rows, count = memory.feats(k), packed[k]["rows"], packed[k]["count"]
        starts = torch.cumsum(count, 0) - count
        for c in range(num_classes):
            n, s = int(count[c]), int(starts[c])
            feats[c, :n].copy_(rows[s : s + n])
        memory.count[k].copy_(count)
        memory.ptr[k].copy_(packed[k]["ptr"])
    return memory


def _new_bank(cfg: Config) -> PrototypeBank:
    """An empty CPU bank of ``cfg``'s shape (the plug-in's, appendix: prototype EMA)."""
    k_h, k_l = slot_budgets(cfg.proto)
    return PrototypeBank(
        cfg.data.num_classes, cfg.model.rep_dim, k_h + k_l, momentum=cfg.proto.ema_momentum,
        sync=False,
    )  # fmt: skip


STATE_PARTS = ("teacher", "memory", "bank")  # what a state file may hold besides the student


def save_run_state(
    run: DemoRun, committed: str | Path, keep: tuple[str, ...] = STATE_PARTS
) -> Path:
    """Write ``run`` (a :func:`run_state` replay) beside the committed run as
    :func:`state_file` of its step: the student's and the teacher's weights, the packed CPG
    memories (in the sampling window and at the clustering step), the prototype bank (after
    the clustering), and where they came from (step, config hash, ``log_gap``, commit,
    machine), so that every reader's chapters study the same numbers whatever their CPU
    computes. ``keep`` names the parts of :data:`STATE_PARTS` to write besides the student
    (``()``: the student alone, a fifth of the size, which is what a chapter needs to check a
    claim about the model's outputs on another seed)."""
    if unknown := set(keep) - set(STATE_PARTS):
        raise ValueError(
            f"keep={keep!r}: unknown parts {sorted(unknown)}; choose from {STATE_PARTS}"
        )
    if run.step is None or run.log_gap is None:
        raise ValueError("save_run_state needs a run_state(replay=True) result")
    if any(v != 0.0 for v in run.log_gap.values()):
        raise ValueError(
            f"the replay differs from the committed log ({run.log_gap}): write the state on a"
            " CPU like the one that made the run, where the replay is exact"
        )
    path = resolve_data_root(str(committed)) / state_file(run.step)
    state = {
        "format": 2,
        "config_hash": run.cfg.hash(),
        "step": run.step,
        "model": run.model.state_dict(),
        "teacher": None
        if run.teacher is None or "teacher" not in keep
        else run.teacher.state_dict(),
        "memory": None if run.memory is None or "memory" not in keep else _pack_memory(run.memory),
        "bank": None if run.bank is None or "bank" not in keep else run.bank.state_dict(),
        "log_gap": run.log_gap,
        "commit": runtime.git_commit(),
        # plain types only, so that weights_only loading reads it (torch's version is a class)
        "machine": json.loads(json.dumps(runtime.machine_info(torch.device("cpu")), default=str)),
    }
    torch.save(state, path)
    return path


def _load_run_state(src: Path, cfg: Config, step: int, summary: dict[str, Any]) -> DemoRun:
    path = src / state_file(step)
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["config_hash"] != cfg.hash() or state["step"] != step:
        raise ValueError(
            f"{path} was written for another config or step than {src}'s config.yaml; write"
            " it again (save_run_state) or pass replay=True"
        )
    model = build_model(cfg.model, cfg.data.num_classes)
    model.load_state_dict(state["model"])
    teacher = None
    if state["teacher"] is not None:
        teacher = build_model(cfg.model, cfg.data.num_classes)
        teacher.load_state_dict(state["teacher"])
        teacher.eval()
    memory = None
    if state["memory"] is not None:
        memory = _unpack_memory(state["memory"], cfg.data.num_classes, cfg.model.rep_dim)
    bank = None
    if state["bank"] is not None:
        bank = _new_bank(cfg)
        bank.load_state_dict(state["bank"])
    labeled, unlabeled, val = demo_datasets(cfg)
    return DemoRun(
        cfg, model.eval(), labeled, unlabeled, val, summary, src, memory, step,
        dict(state["log_gap"]), teacher, bank,
    )  # fmt: skip


def _replay_dir(run_root: str | Path, cfg: Config, stop: int) -> Path:
    """``<run_root>/replay_<preset>_seed<k>_<hash>_step<stop>``; where it does not exist yet,
    it starts as a copy of the same run's replay stopped closest before ``stop``, so that the
    replay goes on from there instead of from step 0 (resuming is exact, :meth:`Trainer.fit`)."""
    root = resolve_data_root(str(run_root))
    stem = f"replay_{cfg.name}_seed{cfg.train.seed}_{cfg.hash()[:8]}_step"
    run_dir = root / f"{stem}{stop}"
    if not run_dir.exists():
        earlier = [
            (int(d.name[len(stem) :]), d)
            for d in root.glob(f"{stem}*")
            if d.name[len(stem) :].isdigit() and (d / CKPT_NAME).exists()
        ]
        earlier = [(s, d) for s, d in earlier if s < stop]
        if earlier:
            shutil.copytree(max(earlier)[1], run_dir)
    return run_dir


def run_state(
    committed: str | Path = "results/digits_v3/study/digits_brpg_1_16/seed0",
    step: int | None = None,
    run_root: str | Path = "runs/book",
    replay: bool = False,
) -> DemoRun:
    """A committed BRPG run's state before its step ``step`` (default: the step at which it
    clusters its memories, :func:`clustering_step`).

    At the clustering step that is the student after the warm-up and the sampling window of a
    run whose final scores the evidence chapter reports, and the CPG memories it filled
    (appendix: timeline, CPG); later, the student, the EMA teacher and the prototype bank the
    run's steps fed. By default it is read from :func:`state_file` beside the committed run
    (written by :func:`save_run_state` from an exact replay), so it is the same on every
    machine. With ``replay=True``, or where there is no such file, the run is re-run with its
    own ``config.yaml`` to that step by :meth:`brpg.engine.trainer.Trainer.train_until`, which
    stops there with a checkpoint under ``run_root`` (a second call loads it). A replay is
    exact on a CPU like the one that made the run, at the same thread count; a CPU with other
    vector instructions rounds convolutions differently and drifts away from the committed
    log (``log_gap`` says by how much).

    The returned :class:`DemoRun` carries the student in eval mode on the CPU, ``teacher``,
    ``memory`` (``None`` after the clustering freed it), ``bank`` (``None`` before the
    clustering), ``step``, the committed ``summary`` (``{}`` while the committed run is
    unfinished) and ``log_gap`` (:func:`log_gap` of the replay that made it against the
    committed log). A relative ``committed`` or ``run_root`` is resolved like the data root
    (:func:`brpg.data.build.resolve_data_root`).
    """
    src = resolve_data_root(str(committed))
    if not (src / "config.yaml").exists() or not (src / "log.jsonl").exists():
        raise FileNotFoundError(
            f"{src}: no committed run (config.yaml and log.jsonl) to replay; the study's runs"
            " are under results/digits_v3/study/<preset>/seed<k>"
        )
    cfg = load_config(src / "config.yaml")
    stop = clustering_step(cfg) if step is None else step
    if not clustering_step(cfg) <= stop < cfg.train.steps:
        raise ValueError(
            f"step {stop}: a state lies between the clustering step ({clustering_step(cfg)})"
            f" and the end of the run ({cfg.train.steps})"
        )
    summary_path = src / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    if not replay and (src / state_file(stop)).exists():
        return _load_run_state(src, cfg, stop, summary)
    run_dir = _replay_dir(run_root, cfg, stop)
    with distributed.exclusive_lock(run_dir):  # two notebooks asking at once: one trains
        ckpt = run_dir / CKPT_NAME
        resume = ckpt.exists()
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # a replay killed before its first checkpoint
        trainer = Trainer(cfg, run_dir, resume=resume, progress=False)
        trainer.train_until(stop)
    method = trainer.method
    assert method is not None and method.plugin is not None
    memory = method.plugin.memory
    cpu_memory = None
    if memory is not None:  # on the CPU
        cpu_memory = _unpack_memory(_pack_memory(memory), memory.num_classes, memory.dim)
    bank = None
    if bool(method.plugin.bank.valid.any()):  # clustered: the bank the run's EMA fed
        bank = _new_bank(cfg)
        bank.load_state_dict(method.plugin.bank.state_dict())  # copied onto the CPU bank
    teacher = None
    if method.teacher is not None:
        teacher = copy.deepcopy(distributed.unwrap_model(method.teacher.module)).cpu().eval()
    model = distributed.unwrap_model(trainer.model).cpu().eval()
    labeled, unlabeled, val = demo_datasets(cfg)
    gap = log_gap(run_dir / "log.jsonl", src / "log.jsonl", stop)
    return DemoRun(
        cfg, model, labeled, unlabeled, val, summary, run_dir, cpu_memory, stop, gap, teacher,
        bank,
    )  # fmt: skip


def clustering_state(
    committed: str | Path = "results/digits_v3/study/digits_brpg_1_16/seed0",
    run_root: str | Path = "runs/book",
    replay: bool = False,
) -> DemoRun:
    """:func:`run_state` at the step at which the run clusters its memories: the state
    chapters 2, 3, 4, 5 and 7 study (student, teacher, CPG memories, no bank yet)."""
    return run_state(committed, None, run_root, replay)


def _seed_number(seed_dir: Path) -> int:
    digits = seed_dir.name[len("seed") :]
    return int(digits) if digits.isdigit() else -1


@dataclass
class EverySeed:
    """The committed seeds of one study preset, walked with their saved states: what
    chapters 2–7 need to check a claim "on every committed seed".

    ``parts`` maps each step to the parts of :data:`STATE_PARTS` the claim reads there
    (``{600: ("teacher", "memory"), 1000: ()}``). Iterating yields ``(seed name, states)``,
    the states in the order of ``parts``, for each committed seed (:attr:`committed`) whose
    state files at all the steps exist and carry those parts; a seed is
    added to :attr:`checked` once the loop's body for it has finished (a failing assert in the
    body leaves it out). A state whose replay did not follow the committed log exactly is an
    error, not a seed to skip: :func:`save_run_state` never writes one.
    """

    preset_dir: Path
    parts: dict[int, tuple[str, ...]]
    checked: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.preset_dir = Path(self.preset_dir)
        bad = {p for need in self.parts.values() for p in need} - set(STATE_PARTS)
        if bad:
            raise ValueError(f"parts {sorted(bad)}: unknown; choose from {STATE_PARTS}")
        if not self.parts:
            raise ValueError("parts: name at least one step")

    @property
    def committed(self) -> list[str]:
        """The seed folders with a ``summary.json`` (finished runs), in numeric order."""
        dirs = [d for d in self.preset_dir.glob("seed*") if (d / "summary.json").exists()]
        return [d.name for d in sorted(dirs, key=_seed_number)]

    @property
    def unchecked(self) -> list[str]:
        """Committed seeds not (yet) checked: no saved states, or the walk has not reached them."""
        return [s for s in self.committed if s not in self.checked]

    def __iter__(self) -> Iterator[tuple[str, tuple[DemoRun, ...]]]:
        for name in self.committed:
            seed_dir = self.preset_dir / name
            if not all((seed_dir / state_file(step)).exists() for step in self.parts):
                continue
            states = tuple(run_state(seed_dir, step) for step in self.parts)
            if any(
                getattr(st, p) is None
                for st, need in zip(states, self.parts.values(), strict=True)
                for p in need
            ):
                continue  # saved without a part this claim reads (save_run_state's keep)
            for st in states:
                if any(v != 0.0 for v in (st.log_gap or {}).values()):
                    raise ValueError(
                        f"{seed_dir / state_file(st.step or 0)}: its replay differs from the"
                        f" committed log ({st.log_gap}); write it again with"
                        " tools/save_run_states.py on a CPU where the replay is exact"
                    )
            yield name, states
            if name not in self.checked:  # reached only once the loop's body ran through
                self.checked.append(name)

    def report(self) -> str:
        """One line: how many committed seeds were checked, and which were not."""
        return (
            f"checked on {len(self.checked)} of {len(self.committed)} committed seeds;"
            f" without saved states yet: {', '.join(self.unchecked) or 'none'}"
        )


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """Run the block at one torch thread and restore the count after, also on an error: the
    chapters' loops of many small tensor operations, where threads cost more than they save."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _stack(ds: Dataset, indices: list[int]) -> tuple[Tensor, Tensor]:
    items = [ds[i] for i in indices]
    images = torch.stack([it["image"] for it in items])
    labels = torch.stack([torch.as_tensor(it["mask"]).long() for it in items])
    return images, labels


def _student(model: nn.Module) -> nn.Module:
    """A train-mode copy (dropout on, BatchNorm on batch statistics); ``model`` is untouched."""
    return copy.deepcopy(model).train()


@torch.no_grad()
def _outputs(
    model: nn.Module, images_b3hw: Tensor, labels_bhw: Tensor, seed: int
) -> dict[str, Tensor]:
    """One forward in ``model``'s current mode and the stride-4 quantities of
    :func:`feature_batch`. Dropout masks (train mode) come from ``seed`` inside
    :func:`torch.random.fork_rng`, so torch's global RNG is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        out = model(images_b3hw)
    if "rep" not in out:
        raise ValueError("the model has no representation head (train it with model.rep_head=true)")
    logits, rep = out["logits"].float(), out["rep"].float()
    conf, pred = confidence(logits)
    return {
        "images_b3hw": images_b3hw,
        "labels_bhw": labels_bhw,
        "labels_small_bhw": downsample_labels(labels_bhw, tuple(logits.shape[-2:])),
        "logits_bchw": logits,
        "rep_bdhw": rep,
        "conf_bhw": conf,
        "pred_bhw": pred,
    }


def _items(ds: Dataset, start: int, n_images: int) -> tuple[Tensor, Tensor]:
    if n_images < 1:
        raise ValueError("n_images must be positive")
    n = len(ds)  # type: ignore[arg-type]
    return _stack(ds, [(start + i) % n for i in range(n_images)])


def feature_batch(
    run: DemoRun,
    split: str = "labeled",
    n_images: int = 16,
    start: int = 0,
    train_mode: bool = False,
    seed: int = 0,
    teacher: bool = False,
) -> dict[str, Tensor]:
    """The model's stride-4 outputs on items ``start, start+1, …`` of ``split`` (wrapping).

    Returns (``h, w`` = stride-4 size, 16 × 16 for 64 px scenes):

    - ``images_b3hw`` normalised images, ``labels_bhw`` full-resolution labels (255 = ignore);
    - ``labels_small_bhw``: the labels downsampled as the CPG routing does
      (:func:`brpg.method.cpg.downsample_labels`, nearest, appendix: CPG);
    - ``logits_bchw`` and ``rep_bdhw`` (raw representation features) at stride 4;
    - ``conf_bhw`` and ``pred_bhw``: softmax maximum and argmax (:func:`brpg.method.cpg.confidence`).

    ``train_mode=True`` runs the model as the student of the sampling window (dropout on,
    BatchNorm on batch statistics, appendix: CPG) on a copy, so the model's BN statistics stay
    as they are; dropout is seeded by ``seed``. The default is eval mode (as the teacher, and
    as at test time). ``teacher=True`` reads the run's EMA teacher instead (eval mode, as the
    step computes pseudo-labels; a :func:`run_state` result).
    """
    images, labels = _items(run.dataset(split), start, n_images)
    if teacher:
        if run.teacher is None or train_mode:
            raise ValueError(
                "teacher=True needs a run with a teacher (run_state) and runs it in eval mode"
                " only (train_mode=False)"
            )
        return _outputs(run.teacher.eval(), images, labels, seed)
    run.model.eval()
    model = _student(run.model) if train_mode else run.model
    return _outputs(model, images, labels, seed)


def boundary_distance(
    labels_bhw: Tensor, size: int | tuple[int, int] | None = None, ignore_index: int = 255
) -> Tensor:
    """Euclidean distance (in full-resolution pixels) of every pixel to the nearest boundary.

    The boundary is the ignore band (``ignore_index``, the 1-px band DigitScenes and PASCAL VOC
    draw around every object) plus, where two labels touch without a band, the pixels on both
    sides, so the result is also right for masks without a band. Boundary pixels have distance 0. Computed
    with :func:`scipy.ndimage.distance_transform_edt` per image; an image without any boundary
    gets NaN everywhere.

    With ``size``, the map is then sampled at the stride-4 positions exactly as
    :func:`brpg.method.cpg.downsample_labels` samples the labels (nearest), so entry ``[b, i, j]`` is
    the distance of the full-resolution pixel whose label the stride-4 pixel ``(i, j)`` gets.
    Returns float32 ``[B, H, W]`` (or ``[B, *size]``).
    """
    lab = labels_bhw.detach().cpu().numpy()
    out = np.empty(lab.shape, dtype=np.float32)
    for b, m in enumerate(lab):
        edge = m == ignore_index
        diff_y = (m[1:] != m[:-1]) & ~edge[1:] & ~edge[:-1]  # two labels meet, no band between
        diff_x = (m[:, 1:] != m[:, :-1]) & ~edge[:, 1:] & ~edge[:, :-1]
        edge[1:] |= diff_y
        edge[:-1] |= diff_y
        edge[:, 1:] |= diff_x
        edge[:, :-1] |= diff_x
        out[b] = ndimage.distance_transform_edt(~edge) if edge.any() else np.nan
    dist = torch.from_numpy(out)
    if size is None:
        return dist
    size_hw = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return torch.nn.functional.interpolate(dist[:, None], size=size_hw, mode="nearest")[:, 0]


MIXED_MODES = -1  # appearance_modes code of a pixel inside boxes of two modes of its digit


def appearance_modes(
    run: DemoRun, split: str = "labeled", n_images: int = 16, start: int = 0
) -> Tensor:
    """Appearance mode of every pixel of a multi-modal digit, ``long [B, H, W]``, for the
    items :func:`feature_batch` returns with the same ``split``, ``n_images`` and ``start``.

    Code ``k + 1`` means ``APPEARANCE_MODES[k]`` (1 = solid, 2 = hollow, 3 = bold); 0 means
    background, ignored, or a digit outside ``mode_digits`` (1, 4, 7 by default);
    :data:`MIXED_MODES` a pixel inside the boxes of two instances of its digit drawn in
    different modes. Read from DigitScenes' ``annotations.json`` (each instance's box
    ``[top, left, h, w]`` and mode), restricted to the pixels labeled with the instance's
    class. For analysis only: BRPG never sees modes.
    """
    from brpg.data.digits import APPEARANCE_MODES, DigitKnobs

    mode_digits = set(DigitKnobs.make(**run.cfg.data.digits_knobs).mode_digits)
    ds = run.dataset(split)
    path = resolve_data_root(run.cfg.data.root) / "annotations.json"
    scenes = json.loads(path.read_text())["scenes"]
    n = len(ds)  # type: ignore[arg-type]
    out = []
    for i in range(n_images):
        item = ds[(start + i) % n]
        label = torch.as_tensor(item["mask"]).long()
        modes = torch.zeros_like(label)
        for inst in scenes[item["id"]]:
            if inst["digit"] not in mode_digits:
                continue
            top, left, h, w = inst["box"]
            inside = torch.zeros_like(label, dtype=torch.bool)
            inside[top : top + h, left : left + w] = True
            inside &= label == inst["digit"] + 1
            code = APPEARANCE_MODES.index(inst["mode"]) + 1
            clash = inside & (modes != 0) & (modes != code)
            modes = torch.where(inside & (modes == 0), code, modes)
            modes = torch.where(clash, MIXED_MODES, modes)
        out.append(modes)
    return torch.stack(out)


def fill_memories(
    run: DemoRun,
    n_batches: int,
    batch_size: int,
    tau_h: float = 0.8,
    capacity: int = DEMO_CAPACITY,
    seed: int = 0,
    unlabeled: bool = False,
    unlabeled_threshold: float = 0.8,
    sample_pixel_num: int = DEMO_SAMPLE_PIXEL_NUM,
) -> PrototypeMemory:
    """Fill CPG memories as ``n_batches`` steps of the sampling window would (appendix: CPG).

    Step ``s`` takes labeled items ``s·B … s·B + B − 1`` (wrapping around the labeled set),
    runs the model as the student (train mode, dropout seeded by ``(seed, s)``) and routes the
    correctly classified pixels with :func:`brpg.method.cpg.route_labeled` (high: ``conf ≥ tau_h``,
    low: below). With ``unlabeled=True`` the same number of unlabeled items goes through the
    model as the teacher (eval mode) and :func:`brpg.method.cpg.route_unlabeled` adds its confident
    pixels to the high rows. :func:`brpg.method.cpg.memory_rows` then keeps at most
    ``sample_pixel_num·2B`` random high rows and ``sample_pixel_num·B`` random low rows, which
    are pushed (all by :func:`brpg.method.cpg.cpg_rows`, as the trainer does) into a
    :class:`~brpg.method.memory.PrototypeMemory` of ``capacity`` rows per class and
    kind. The model's weights and BN statistics are not changed.

    This is the sampling window without training in between: the model is frozen, as it
    nearly is over a window that short.
    """
    num_classes = run.cfg.data.num_classes
    memory: PrototypeMemory | None = None
    gen = torch.Generator().manual_seed(seed)
    run.model.eval()
    student = _student(run.model)  # one copy for the whole window
    for s in range(n_batches):
        step_seed = seed * 1_000_003 + s  # feature_batch(..., train_mode=True, seed=step_seed)
        lab = _outputs(student, *_items(run.labeled, s * batch_size, batch_size), step_seed)
        unl = (
            _outputs(run.model, *_items(run.unlabeled, s * batch_size, batch_size), 0)
            if unlabeled
            else {"rep_bdhw": None, "logits_bchw": None}
        )
        high, low = cpg_rows(
            lab["rep_bdhw"],
            lab["logits_bchw"],
            lab["labels_small_bhw"],
            unl["rep_bdhw"],
            unl["logits_bchw"],
            tau_h,
            unlabeled_threshold=unlabeled_threshold,
            sample_pixel_num=sample_pixel_num,
            generator=gen,
        )
        if memory is None:
            memory = PrototypeMemory(num_classes, lab["rep_bdhw"].shape[1], capacity, sync=False)
        memory.push("high", *high)
        memory.push("low", *low)
    if memory is None:
        raise ValueError("n_batches must be positive")
    return memory


def cluster(
    memory: PrototypeMemory, cfg: Config, apo: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The one-shot clustering, with APO if ``apo``, of ``memory`` (appendix: clustering and APO).

    The trainer's :func:`brpg.method.clustering.cluster_prototypes` on the high / low memories, with
    the prototype settings of ``cfg.proto`` (2 + 2 base prototypes per class, ``add_num`` 1,
    proportion 0.05, "cos_sim") and ``apo`` in place of ``cfg.proto.apo``. Returns the bank
    layout ``(protos[C, K, D], valid[C, K])``: the first ``K_h`` slots of a class are its
    high-confidence prototypes, the last ``K_l`` its low-confidence ones.
    """
    proto = replace(cfg.proto, apo=apo, memory="cpg")
    return cluster_prototypes(memory, replace(cfg, proto=proto), seed)
