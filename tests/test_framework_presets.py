"""Presets of issue 6: BRPG in the UniMatch framework and with SegFormer (DigitScenes and VOC).

Machine: exact. Preset values; the slow smoke runs check bookkeeping only (steps, profile, a proto
phase that ran).
"""

import json

import pytest

from brpg.config import load_config
from brpg.method.prototype_loss import grid_indices
from brpg.reproduce.experiment import prepare

DIGITS = {
    "digits_unimatch_1_16": ("unimatch", False, "small"),
    "digits_unimatch_1_8": ("unimatch", False, "small"),
    "digits_unimatch_brpg_1_16": ("unimatch", True, "small"),
    "digits_unimatch_brpg_1_8": ("unimatch", True, "small"),
    "digits_segformer_meanteacher_1_16": ("meanteacher", False, "mit_b0"),
    "digits_segformer_brpg_1_16": ("meanteacher", True, "mit_b0"),
}


@pytest.mark.parametrize("preset", sorted(DIGITS))
def test_digits_presets_share_the_mean_teacher_budget(preset):
    cfg, ref = load_config(preset), load_config("digits_brpg_1_16")
    assert (cfg.train.framework, cfg.train.brpg, cfg.model.backbone) == DIGITS[preset]
    # same steps, warm-up and BRPG timeline as the committed mean-teacher / BRPG runs
    assert (cfg.train.steps, cfg.semi.sup_only_steps) == (ref.train.steps, ref.semi.sup_only_steps)
    assert (cfg.proto.sample_start_step, cfg.proto.sample_steps) == (500, 100)
    split = "1_8" if preset.endswith("1_8") else "1_16"
    assert cfg.data.labeled_split == f"splits/{split}/labeled.txt"
    if cfg.train.framework == "unimatch":
        assert cfg.semi.eval_model == "student" and cfg.semi.conf_thresh == 0.95


def test_voc_unimatch_presets_follow_the_published_recipe():
    uni = load_config("voc_unimatch_classic_1464")
    assert (uni.data.crop_size, uni.train.batch_size, uni.semi.unlabeled_batch_size) == (321, 2, 2)
    assert (uni.optim.lr, uni.optim.head_lr_mult, uni.semi.conf_thresh) == (0.001, 10.0, 0.95)
    assert (uni.model.output_stride, uni.model.multi_grid, uni.model.aspp_rates) == (
        16, False, (6, 12, 18))  # fmt: skip
    assert uni.train.steps == 80 * ((10582 - 1464) // 4 // 2)
    brpg = load_config("voc_unimatch_brpg_classic_1464")
    assert brpg.train.brpg and brpg.train.framework == "unimatch" and brpg.model.rep_head
    assert grid_indices(81, 81, 321, brpg.proto.grid_num).tolist()[-1] == 80  # exact grid
    seg = load_config("voc_segformer_brpg_classic_1464")
    assert (seg.model.backbone, seg.model.decoder_channels, seg.optim.name) == (
        "mit_b2", 768, "adamw")  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset,extra",
    [
        ("voc_unimatch_brpg_classic_1464", []),
        ("voc_segformer_brpg_classic_1464", ["model.backbone=mit_b0"]),
    ],
)
def test_paper_scale_presets_run_the_smoke_profile(tmp_path, preset, extra):
    if "segformer" in preset:
        pytest.importorskip("transformers")
    exp = prepare(preset, "fixture", profile="smoke", output_dir=tmp_path, overrides=extra)
    summary = exp.finish(exp.train(progress=False), figures=False)
    assert summary["steps"] == 8 and summary["profile"] == "smoke"
    log = [json.loads(ln) for ln in (exp.run_dir / "log.jsonl").read_text().splitlines()]
    assert any("loss_proto" in r for r in log)  # the BRPG plug-in ran its proto phase
