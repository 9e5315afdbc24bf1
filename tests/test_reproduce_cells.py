"""The paper's tables as presets: every cell has one, derived as the official code counts.

Machine: exact. Presets, step counts and the paper's numbers.
"""

from pathlib import Path

import pytest
import torch

from brpg.config import PRESET_DIR, load_config
from brpg.engine import runtime
from brpg.reproduce import cells as C
from brpg.reproduce.paper import PAPER, paper_miou
from brpg.reproduce.profiles import ProfileError, gpu_overrides

ROOT = Path(__file__).resolve().parents[1]
SHARED_SPLITS = ROOT.parent / "shared" / "splits"

ISSUE_CELLS = {  # the cells the issue lists, by labeled count
    "voc_classic": [92, 183, 366, 732, 1464],
    "voc_blended": [662, 1323, 2646, 5291],
    "cityscapes": [186, 372, 744, 1488],
    "coco": [925, 1849, 3697, 7393],
}


def test_every_cell_has_two_presets_that_load():
    cells = C.all_cells()
    assert len(cells) == 2 * sum(len(v) for v in ISSUE_CELLS.values()) == 34
    for table, counts in ISSUE_CELLS.items():
        assert [C.TABLES[table].labeled(c) for c in C.TABLES[table].cells] == counts
    for cell in cells:
        cfg = load_config(cell.preset)
        assert cfg.name == cell.preset
        assert cfg.train.brpg == (cell.method == "brpg")
        assert cfg.train.framework == ("meanteacher" if cfg.train.brpg else "suponly")
        assert cfg.train.steps == cell.steps
        assert cfg.data.labeled_split == f"splits/{cfg.data.name}/{cell.cell}/labeled.txt"


def test_committed_presets_are_generated():
    assert C.stale_presets() == [], "run `python -m brpg.reproduce.cells write`"


def test_cell_lookup_by_count_or_folder():
    coco = C.TABLES["coco"]
    assert coco.cell_of("3697") == coco.cell_of("1_32") == "1_32"
    with pytest.raises(KeyError, match="925"):
        coco.cell_of("1000")


@pytest.mark.parametrize(
    "preset,steps",
    [  # the hand-derived steps of the SupOnly presets that predate the generator
        ("voc_suponly_classic_1464", 3600),
        ("voc_suponly_blended_662", 1600),
        ("cityscapes_suponly_744", 9200),
        ("coco_suponly_1_32", 9200),
    ],
)
def test_suponly_steps_match_the_earlier_hand_derivation(preset, steps):
    assert load_config(preset).train.steps == steps


def test_brpg_phases_follow_the_official_epochs():
    # VOC 366: n = 10582 - 366 = 10216 unlabeled; 10216 // 4 = 2554 per GPU; // 4 = 638 it/epoch
    voc = load_config("voc_brpg_classic_366")
    assert voc.train.steps == 80 * 638
    assert voc.semi.sup_only_steps == 638  # warm-up: epoch 0
    assert (voc.proto.sample_start_step, voc.proto.sample_steps) == (638, 638)  # epoch 1
    assert voc.proto.thr_delay_steps == 5 * 638
    # Cityscapes 744: ceil((2975 - 744) / 4) // 2 = 558 // 2 = 279; sampling epochs 3-5
    cs = load_config("cityscapes_brpg_744")
    assert cs.train.steps == 200 * 279
    assert (cs.proto.sample_start_step, cs.proto.sample_steps) == (3 * 279, 3 * 279)
    # COCO 1/32: ceil((118287 - 3697) / 4) // 4 = 28648 // 4 = 7162; 30 epochs (spec §1 table)
    assert load_config("coco_brpg_1_32").train.steps == 30 * 7162 == 214_860


# DistributedSampler(dset) keeps drop_last=False: each of the 4 GPUs gets ceil(n / 4) samples,
# and only the DataLoader drops the last partial batch. Where n is not a multiple of 4 and the
# padding completes one more batch, the epoch is one step longer than floor(floor(n / 4) / B).
@pytest.mark.parametrize(
    "preset,per_epoch",
    [
        ("voc_brpg_classic_183", 650),  # n = 10399: ceil 2600 // 4; floor would give 649
        ("voc_brpg_classic_1464", 570),  # n = 9118: ceil 2280 // 4; floor 569
        ("cityscapes_brpg_186", 349),  # n = 2789: ceil 698 // 2; floor 348
        ("cityscapes_brpg_744", 279),  # n = 2231: ceil 558 // 2; floor 278
        ("cityscapes_brpg_1488", 186),  # n = 1487: ceil 372 // 2; floor 185
        ("coco_brpg_1_32", 7162),  # n = 114590: ceil 28648 // 4; floor 7161
        ("coco_brpg_1_16", 6931),  # n = 110894: ceil 27724 // 4; floor 6930
        ("voc_brpg_classic_366", 638),  # n = 10216 = 4·2554: both give 638
    ],
)
def test_brpg_epoch_counts_the_padded_distributed_sampler(preset, per_epoch):
    cfg = load_config(preset)
    epochs = {"pascal": 80, "cityscapes": 200, "coco": 30}[cfg.data.name]
    assert cfg.semi.sup_only_steps == per_epoch
    assert cfg.train.steps == epochs * per_epoch
    assert cfg.proto.thr_delay_steps == 5 * per_epoch


def test_presets_carry_the_official_hyper_parameters():
    """Spec §11, column by column."""
    voc, cs, coco = (load_config(p) for p in ("voc_brpg_classic_92", "cityscapes_brpg_186",
                                               "coco_brpg_1_128"))  # fmt: skip
    for cfg in (voc, cs, coco):
        assert (cfg.loss.ce_weight, cfg.loss.ohem_weight, cfg.loss.ohem_thresh) == (0.5, 0.5, 0.7)
        assert cfg.semi.ema_decay == 0.99 and cfg.semi.drop_percent == 80.0
        p = cfg.proto
        assert (p.num_high, p.num_low, p.add_num, p.add_proportion) == (2, 2, 1, 0.05)
        assert (p.queue_len, p.sample_pixel_num, p.tau, p.ema_momentum) == (30000, 5000, 0.1, 0.99)
        assert (p.grid_num, p.unsup_sample_num, p.thr_start, p.thr_end) == (32, 1000, 0.8, 0.95)
        assert cfg.model.rep_head and cfg.semi.entropy_teacher == "train"
    assert (voc.optim.lr, voc.optim.head_lr_mult, voc.optim.weight_decay) == (0.001, 10.0, 1e-4)
    assert (voc.train.batch_size, voc.data.crop_size, voc.model.backbone) == (4, 513, "resnet101")
    assert (voc.eval.protocol, voc.eval.crop_size) == ("center_crop", 513)
    assert (cs.optim.lr, cs.optim.head_lr_mult, cs.optim.weight_decay) == (0.005, 1.0, 5e-4)
    assert (cs.train.batch_size, cs.data.crop_size) == (2, 769)
    assert (cs.eval.protocol, cs.eval.crop_size, cs.eval.stride) == ("sliding", 769, 513)
    assert (coco.model.backbone, coco.data.num_classes, coco.train.seed) == ("xception65", 81, 42)
    assert (coco.eval.protocol, coco.eval.crop_size) == ("center_crop", 641)


@pytest.mark.skipif(not SHARED_SPLITS.is_dir(), reason="../shared/splits is absent")
def test_preset_split_lists_have_the_published_counts():
    for cell in C.all_cells(method="brpg"):
        cfg = load_config(cell.preset)
        lines = (SHARED_SPLITS / Path(cfg.data.labeled_split).relative_to("splits")).read_text()
        assert len(lines.split()) // (2 if cfg.data.name == "coco" else 1) == cell.n_sup


def test_paper_numbers_cover_every_cell():
    for cell in C.all_cells():
        assert cell.paper is not None and 30 < cell.paper < 85
    assert paper_miou("voc_classic", "brpg", "92") == 73.62
    assert paper_miou("coco", "suponly", "1_16") == 45.12
    assert PAPER["voc_blended"]["brpg"]["5291"] < PAPER["voc_blended"]["brpg"]["2646"]  # as printed
    assert paper_miou("voc_classic", "brpg", "999") is None


def _apply(preset: str, sets: list[str]):
    return load_config(preset, sets)


@pytest.mark.parametrize("gpus,accum", [(1, 4), (2, 2)])
def test_accumulate_keeps_the_paper_batch(gpus, accum):
    cfg = load_config("voc_brpg_classic_366")
    sets = gpu_overrides(cfg, gpus, "accumulate")
    assert sets == [f"train.grad_accum={accum}"]
    scaled = _apply("voc_brpg_classic_366", sets)
    assert scaled.train.batch_size * scaled.train.grad_accum * gpus == 16
    assert scaled.train.steps == cfg.train.steps


def test_four_gpus_need_nothing_and_eight_halve_the_batch():
    cfg = load_config("voc_brpg_classic_366")
    assert gpu_overrides(cfg, 4) == []
    assert gpu_overrides(cfg, 8) == ["train.batch_size=2", "semi.unlabeled_batch_size=2"]
    with pytest.raises(ProfileError, match="does not split over 3"):
        gpu_overrides(cfg, 3)


def test_batch_and_linear_policies():
    cfg = load_config("cityscapes_brpg_744")
    assert gpu_overrides(cfg, 1, "batch") == [
        "train.batch_size=8",
        "semi.unlabeled_batch_size=8",
    ]
    lin = _apply("cityscapes_brpg_744", gpu_overrides(cfg, 1, "linear"))
    assert lin.optim.lr == pytest.approx(cfg.optim.lr / 4)
    assert lin.train.steps == 4 * cfg.train.steps
    assert lin.semi.sup_only_steps == 4 * cfg.semi.sup_only_steps
    assert lin.proto.sample_start_step == 4 * cfg.proto.sample_start_step
    assert gpu_overrides(cfg, 1, "none") == []
    with pytest.raises(ProfileError, match="batch_policy"):
        gpu_overrides(cfg, 1, "double")


def test_notebook_parameters_match_what_the_runner_passes(tmp_path):
    """papermill warns and drops nothing when the names agree; a renamed parameter would
    silently keep the notebook's default, so the two lists are compared here."""
    import papermill as pm

    from brpg.reproduce.runner import NOTEBOOK, notebook_parameters

    declared = list(pm.inspect_notebook(str(NOTEBOOK)))
    passed = notebook_parameters(
        C.Cell("coco", "brpg", "1_32"), tmp_path, data_root="fixture", gpus=0,
        profile="smoke", overrides=[], batch_policy="accumulate", launcher="local",
    )  # fmt: skip
    assert sorted(declared) == sorted(passed)
    assert set(passed) == set(prepare_signature())  # each one reaches prepare()


def prepare_signature() -> list[str]:
    import inspect

    from brpg.reproduce.experiment import prepare

    return list(inspect.signature(prepare).parameters)


CHAPTER_10 = ROOT / "book" / "10_reproducing_the_paper.py"


@pytest.mark.parametrize("dataset", ["voc", "cityscapes", "coco"])
def test_every_deviation_is_listed_in_the_headers_and_chapter_10(dataset):
    """Issue 17: mixed precision (with fp16 as the faithful switch), the per-step entropy
    percentile and the deep-copied teacher are listed with the other deviations."""
    header = " ".join(
        line.lstrip("# ")
        for line in (PRESET_DIR / f"_{dataset}_brpg.yaml").read_text().splitlines()
        if line.startswith("#")
    )
    chapter = " ".join(
        line.lstrip("# ") for line in CHAPTER_10.read_text().splitlines() if line.startswith("#")
    )
    for text in (header, chapter):
        assert "train.amp=fp16" in text and "GradScaler" in text
        assert "entropy" in text and "percentile" in text and "moves every step" in text
        assert "deep copy of the student" in text and "separately built" in text
        assert "1/4" in text  # proto.faithful_loss_scale: the official weight, not 1/world_size
    suponly = (PRESET_DIR / f"_{dataset}_suponly.yaml").read_text()
    assert "amp: auto  # bf16 on CUDA; fp16 = the official" in suponly
    # fp16 is selectable in every preset of the table: fp16 autocast (+ GradScaler on CUDA)
    table = "voc_classic" if dataset == "voc" else dataset
    for cell in C.all_cells(table):
        assert load_config(cell.preset, ["train.amp=fp16"]).train.amp == "fp16"
    assert runtime.amp_dtype("fp16", torch.device("cuda")) == torch.float16
