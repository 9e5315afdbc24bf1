# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # The experiment notebook: one table cell
#
# [![Open In Colab](../../_static/colab-badge.svg)](https://colab.research.google.com/github/brpg-book/brpg-book/blob/main/book/experiments/train.ipynb)
#
# This notebook trains and evaluates **one cell** of the paper's tables, for example BRPG on
# PASCAL VOC classic with 366 labeled images. `brpg reproduce` runs it once per cell with
# [papermill](https://papermill.readthedocs.io), which replaces the `parameters` cell below
# and keeps the executed copy next to the run:
#
# ```bash
# brpg reproduce --table voc_classic --cells 366 --gpus 4 --data-root data
# papermill book/experiments/train.ipynb out.ipynb -p config voc_brpg_classic_366 \
#     -p data_root data -p gpus 1 -p profile full -p output_dir runs/cell
# ```
#
# The copy in the book runs the **smoke** profile on the miniature fixture data (an 8-step
# pipeline check of the same code with a tiny model, on a CPU). Its mIoU means nothing; it
# shows that every step below runs. All the logic is in `brpg.reproduce.experiment`.

# %% tags=["remove-cell"]
# Installs brpg when this notebook runs on Colab; does nothing anywhere else.
import subprocess
import sys

INSTALL_URL = "git+https://github.com/brpg-book/brpg-book@main"
if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"brpg[book] @ {INSTALL_URL}"], check=True)

# %% tags=["parameters"]
config = "voc_brpg_classic_366"  # a preset (`brpg presets`) or a YAML path
data_root = "fixture"  # prepared DATA_ROOT; "fixture": miniature data (smoke only)
gpus = 0  # 0: no GPU; 1: one GPU in this kernel; N > 1: torchrun with N processes
profile = "smoke"  # full: the preset as written | smoke: an 8-step pipeline check
overrides = []  # extra settings applied last, written as for `brpg train --set`
output_dir = ""  # run/, summary.json, figures; "": a temporary folder
resume = True  # continue from output_dir/run/last.pt when it exists
batch_policy = "accumulate"  # fewer than 4 GPUs: accumulate | batch | linear | none
cpu_processes = 1  # without GPUs: CPU (gloo) processes; > 1 uses torchrun
force_torchrun = False  # train through torchrun even with one process

# %% [markdown]
# ## 1. Check the parameters and resolve the config
#
# Everything that can be wrong is checked here, before any training: an unknown config, a
# `data_root` that is not a folder, more GPUs than the machine shows, a run folder that was
# started with another config. The resolved config is the preset, then the profile, then the
# GPU-count policy (`brpg.reproduce.profiles`), then `overrides`.

# %%
import json
import math
import tempfile

from IPython.display import Image, Markdown, display

from brpg.engine.evaluate_run import evaluate_run
from brpg.reproduce.experiment import prepare

exp = prepare(
    config,
    data_root,
    gpus=gpus,
    profile=profile,
    overrides=overrides,
    output_dir=output_dir or tempfile.mkdtemp(prefix="brpg-cell-"),
    resume=resume,
    batch_policy=batch_policy,
    cpu_processes=cpu_processes,
    force_torchrun=force_torchrun,
)
print(exp.describe())

# %% [markdown]
# ## 2. Train
#
# On one device the trainer runs in this kernel; with several processes it is a `torchrun`
# subprocess whose log is streamed here. Checkpoints go to `output_dir/run/last.pt` every
# `train.ckpt_every` steps; rerunning the notebook (or `brpg reproduce`) after a crash
# resumes from there.

# %%
summary = exp.train(progress=profile == "full")

# %% [markdown]
# ## 3. Evaluate and record
#
# The trainer evaluated the final model (the teacher for BRPG) under the cell's protocol.
# `finish` writes `summary.json` with the table cell, the paper's number, the protocol, the
# profile, the GPU type and count and the config hash, and draws the curves and predictions.

# %%
result = exp.finish(summary)
paper = result["paper_miou"]
# None only for a run finished before Boundary IoU existed
mbiou = result.get("val_mbiou")
hardware = f"{result['gpu']['count']} GPU(s) {result['gpu']['type'] or ''}".strip()
rows = [
    ("cell", f"{result['table']} / {result['method']} / {result['cell']}"),
    ("profile", result["profile"]),
    ("val mIoU (%)", f"{result['val_miou']:.2f}"),
    ("val mBIoU (%), Boundary IoU", f"{mbiou:.2f}" if mbiou is not None else "—"),
    ("paper (%)", "—" if paper is None else f"{paper:.2f}"),
    ("protocol", json.dumps(result["protocol"])),
    ("hardware", hardware),
    ("steps / hours", f"{result['steps']} / {result['hours']:.3f}"),
    ("config hash", result["config_hash"]),
]
table = "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)
if result["profile"] == "smoke":
    table = "**Smoke profile: a pipeline check, not a result.**\n\n" + table
display(Markdown(table))

# %%
display(Image(filename=str(exp.output_dir / "curves.png")))
display(Image(filename=str(exp.output_dir / "predictions.png")))

# %% [markdown]
# ## 4. Checks
#
# What a run of this notebook proves, smoke or full: it trained every step of its config;
# the mIoU it records is reproduced by a separate evaluation of the checkpoint it saved (the
# number comes from the final weights, under the cell's protocol); its summary records the
# profile and config; and a BRPG run clustered its memories into prototypes.
#
# BRPG keeps two memories per class, high and low confidence, and clusters each into its own
# prototypes. Where a run can fill both, the check below asks for at least one class with both
# kinds: a full run (on real images a trained model classifies many labeled pixels correctly,
# some above the high threshold and some below), and a COCO run of any profile (its
# back-queue fallback fills a short memory). A VOC or Cityscapes smoke run cannot promise it:
# its low memory takes labeled pixels that the model classifies correctly below the high
# threshold, and a model trained for two steps on noise images classifies few or none. There
# the check asks for high prototypes only and prints the counts.

# %%
saved = json.loads((exp.output_dir / "summary.json").read_text())
assert saved["steps"] == exp.cfg.train.steps, (saved["steps"], exp.cfg.train.steps)
assert len(saved["per_class_iou"]) == exp.cfg.data.num_classes
assert saved["profile"] == profile and saved["config_hash"] == exp.cfg.hash()
# reload last.pt, evaluate from scratch
again = evaluate_run(exp.run_dir, [], progress=False)
print(
    f"val mIoU: summary {saved['val_miou']:.4f} %, "
    f"checkpoint re-evaluated {again['miou']:.4f} %"
)
assert again["step"] == saved["steps"]
assert math.isclose(again["miou"], saved["val_miou"], abs_tol=1e-6)
log = [
    json.loads(ln) for ln in (exp.run_dir / "log.jsonl").read_text().splitlines()
]
if exp.cfg.train.brpg:
    events = [r for r in log if r.get("event") == "prototypes_high_low"]
    assert events, "the run logged no clustering"
    # [high, low] prototypes of each class
    high_low = events[-1]["prototypes_high_low"]
    high = [c for c, (h, _) in enumerate(high_low) if h]
    low = [c for c, (_, lo) in enumerate(high_low) if lo]
    both = sorted(set(high) & set(low))
    print(f"classes with high prototypes {high}, with low {low}, with both {both}")
    assert high, "no class got a high prototype"
    if profile == "full" or exp.cfg.proto.back_queue:
        assert both, "no class got both high and low prototypes"
print(f"summary: {exp.output_dir / 'summary.json'}")

# %% [markdown]
# ## Summary
#
# * This notebook trains and evaluates one table cell; `brpg reproduce` runs it through
#   papermill with the cell's parameters.
# * It checks its parameters before training, resumes from `output_dir/run/last.pt` after a
#   crash, and writes `summary.json` with the protocol, the profile, the hardware and the
#   config hash.
# * The copy in the book ran the 8-step smoke profile on fixture data; its mIoU means
#   nothing, and it checks the high memories but not the low ones (section 4).
#
# ```{admonition} What we could not check here
# :class: note
# The `full` profile: a real cell needs the prepared data set, the ImageNet weights and GPUs,
# and has not been run in this project.
# ```
