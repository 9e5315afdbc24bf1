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
# # 8b. BRPG in other frameworks and architectures
#
# [![Open In Colab](../_static/colab-badge.svg)](https://colab.research.google.com/github/brpg-book/brpg-book/blob/main/book/08b_other_frameworks.ipynb)
#
# ```{warning}
# **These results are from DigitScenes version 2.** The committed runs this chapter reads
# (`results/digits/`) were made with the old generator, whose 1-px ignore band removed about
# half of every digit's pixels from training and from the score, and they report mIoU only.
# DigitScenes is now version 3 (boundaries labeled and scored with Boundary IoU, chapter 1):
# the live runs in this chapter use version 3, the tables version 2, and no table mixes the
# two. The version-3 study of chapter 8 runs BRPG on the mean teacher only: the frameworks
# and networks of this chapter have no version-3 runs.
# ```
#
# The paper presents BRPG as a *general* paradigm: its abstract claims robustness "across
# diverse datasets, segmentation networks, and semi-supervised frameworks", and the paper
# reports results with the UniMatch framework and with SegFormer. The official code has
# neither; only the mean teacher with DeepLabV3+ is released. This chapter shows:
#
# * the plug-in interface through which BRPG attaches to a framework: a framework hands it
#   tensors it already computes, and all prototype code stays in one class;
# * a UniMatch-style framework (Yang et al., CVPR 2023) next to the mean teacher, with BRPG
#   attached to it, in a short live run;
# * a SegFormer (a Mix Transformer encoder with an all-MLP decoder) in place of DeepLabV3+;
# * what adding BRPG changed on DigitScenes, as measured, read from `results/digits/`.

# %% tags=["remove-cell"]
# Installs brpg when this notebook runs on Colab; does nothing anywhere else.
import subprocess
import sys

INSTALL_URL = "git+https://github.com/brpg-book/brpg-book@main"
if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"brpg[book] @ {INSTALL_URL}"], check=True)

# %%
import json
import shutil
import time
from collections import Counter

import matplotlib.pyplot as plt
import torch
from IPython.display import Markdown, display

from brpg.book.demo import warm_model
from brpg.book.results import load_runs, mean_std, mean_std_text
from brpg.book.study import signed
from brpg.book.tools import show_source
from brpg.config import load_config
from brpg.data.build import PROJECT_ROOT
from brpg.engine.trainer import Trainer
from brpg.frameworks.unimatch import confident_ce, unimatch_step
from brpg.method import plugin as plugin_mod

torch.set_num_threads(2)
RESULTS = PROJECT_ROOT / "results" / "digits"

# %% [markdown]
# ## The plug-in
#
# Everything BRPG adds to a framework lives in `brpg.method.plugin.BRPGPlugin`: the CPG
# memories, the one-shot clustering with APO, the prototype bank with its EMA and the
# prototype loss. It is called four times per step (the framework's step calls `observe` and
# `loss` through `step`; the trainer calls `before_step` and `after_step` through the run's
# `SemiMethod`):
#
# | call | when it acts | what the framework passes |
# |---|---|---|
# | `before_step(step)` | start and end of the sampling window | nothing |
# | `observe(step, rep_l, logits_l, labels_l, rep_u, logits_u)` | sampling window | labeled features and logits of the student; unlabeled features and logits of whatever makes the pseudo-labels |
# | `loss(step, rep_l, labels_l, rep_u, conf_u, pseudo_u)` | prototype phase | labeled features and labels; unlabeled features of the view the student trained on, with its pseudo-labels and confidences |
# | `after_step([rows, ...])` | after the optimiser step | the rows `loss` returned, one per micro-batch |
#
# The step number decides what each call does, so the plug-in keeps no phase flag and resumes
# exactly from any checkpoint. In the mean teacher the unlabeled memory rows come from the EMA
# teacher; in UniMatch, whose model is its own teacher, they come from the model's weak-view
# pass. Here is how the UniMatch step hands its tensors over:

# %%
source = show_source(unimatch_step).data
start = source.index("    # 5. BRPG")
display(Markdown("```python\n" + source[start:]))

# %% [markdown]
# ## The UniMatch step
#
# UniMatch trains on weak-to-strong consistency in two ways. The model predicts the weak
# view $x_w$ and keeps the confident pixels ($p \ge 0.95$) as pseudo-labels $\hat y$. Two
# strong views $x_{s1}, x_{s2}$ (colour jitter, blur, CutMix) must reproduce them, and so must
# a second decoder pass over the weak view's encoder features with channel dropout
# (*feature perturbation*):
#
# $$L = \tfrac12\big(L_x + 0.25\,L_{s1} + 0.25\,L_{s2} + 0.5\,L_{fp}\big)
#   \;[+\;\lambda_{pro} L_{pro}\ \text{with BRPG}]$$
#
# where $L_x$ is the supervised loss on the labeled batch (UniMatch's name for it; `loss_sup`
# in the logs), $L_{s1}, L_{s2}$ the cross-entropies of the two strong views against
# $\hat y$ on the confident pixels, and $L_{fp}$ the same for the feature-perturbed pass.
#
# Four differences from UniMatch's code, all documented in `brpg/frameworks/unimatch.py`:
#
# * CutMix takes its partner from the same batch, because UniMatch's second unlabeled batch
#   would need a second data stream;
# * CutMix uses the mean teacher's boxes and one coin per batch (about half the image, with
#   probability 0.5), not UniMatch's own;
# * $L_x$ is the mean teacher's $0.5\,\mathrm{CE} + 0.5\,\mathrm{OHEM}$ (the preset's `loss`
#   section), not UniMatch's plain cross-entropy;
# * the consistency losses divide by all pixels, because our unlabeled loader has no padding
#   mask.
#
# A short live run: UniMatch + BRPG for 60 steps, from a 300-step supervised model
# (`brpg.book.demo.warm_model`; chapter 8 does the same for the mean teacher), with the timeline
# squeezed: warm-up 10, semi 5, sampling window 15, then 30 steps with prototypes. A spy
# counts the plug-in's calls. A second, 32-step mean-teacher BRPG run shows that the mean
# teacher calls the very same methods. The start is the warm model scored on the same
# version-3 val scenes as the runs.

# %%
calls: Counter[tuple[str, str]] = Counter()
framework = {"name": ""}


def spy(name: str, fn):
    def wrapped(self, step, *args, **kwargs):
        ph = plugin_mod.phase_of(step, self.cfg)
        calls[framework["name"], f"{name} in {ph}"] += 1
        return fn(self, step, *args, **kwargs)

    return wrapped


originals = {n: getattr(plugin_mod.BRPGPlugin, n) for n in ("observe", "loss")}
for n, fn in originals.items():
    setattr(plugin_mod.BRPGPlugin, n, spy(n, fn))

warm = warm_model("digits_suponly_1_16", steps=300)
timeline = [
    "train.log_every=2",
    "train.ckpt_every=0",
    "semi.sup_only_steps=10",
    "proto.sample_start_step=15",
    "proto.sample_steps=15",
    "proto.thr_delay_steps=5",
    "optim.warmup_steps=5",
]
live_runs = {}
try:
    for name, preset, steps in (
        ("unimatch", "digits_unimatch_brpg_1_16", 60),
        ("meanteacher", "digits_brpg_1_16", 32),
    ):
        framework["name"] = name
        cfg = load_config(preset, [f"train.steps={steps}", *timeline])
        run_dir = PROJECT_ROOT / "runs" / "book" / f"ch08b_{name}"
        shutil.rmtree(run_dir, ignore_errors=True)
        t0 = time.perf_counter()
        trainer = Trainer(cfg, run_dir, progress=False)
        trainer.load_weights(warm.run_dir)
        # the warm model on this run's (version-3) val set
        start = trainer.evaluate()["miou"]
        summary = trainer.fit()
        records = [
            json.loads(ln)
            for ln in (run_dir / "log.jsonl").read_text().splitlines()
        ]
        live_runs[name] = (cfg, summary, records)
        print(
            f"{preset} ({steps} steps): {time.perf_counter() - t0:.0f} s,"
            f" val mIoU {summary['val_miou']:.1f} %"
            f" (start, same val set: {start:.1f} %)"
        )
finally:
    for n, fn in originals.items():
        setattr(plugin_mod.BRPGPlugin, n, fn)
display(
    Markdown(
        "| framework | call | steps |\n|---|---|---|\n"
        + "\n".join(
            f"| {fw} | `{what}` | {k} |" for (fw, what), k in sorted(calls.items())
        )
    )
)

# %%
cfg_u, _, rec_u = live_runs["unimatch"]
fig, ax = plt.subplots(figsize=(7, 2.8))
for key in ("loss_sup", "loss_s1", "loss_s2", "loss_fp", "loss_proto"):
    pts = [(r["step"], r[key]) for r in rec_u if key in r]
    if pts:
        ax.plot(*zip(*pts, strict=True), label=key)
for s in (
    cfg_u.semi.sup_only_steps,
    cfg_u.proto.sample_start_step + cfg_u.proto.sample_steps,
):
    ax.axvline(s, color="k", lw=0.7, ls="--")
ax.set_xlabel("step")
ax.legend(fontsize=8, ncol=3)
ax.set_title(
    "live UniMatch + BRPG run (dashed: end of warm-up, clustering)", fontsize=9
)
plt.show()

# %% [markdown]
# What the live runs must show. Both frameworks call the same two methods, `observe` and
# `loss`, in every step after the warm-up, and the plug-in decides from the step number
# whether to act: `observe` fills the memories only in the sampling window, and `loss`
# returns a prototype loss only after the clustering. So the calls per phase are the same for
# both frameworks, and `loss_proto` appears in the logs of the prototype phase only.

# %%
for name, (cfg, _, records) in live_runs.items():
    p, s0 = cfg.proto, cfg.semi.sup_only_steps
    end = p.sample_start_step + p.sample_steps
    expected = {
        "semi": p.sample_start_step - s0,
        "sampling": p.sample_steps,
        "proto": cfg.train.steps - end,
    }
    for method_name in ("observe", "loss"):
        for ph, k in expected.items():
            call = f"{method_name} in {ph}"
            assert calls[name, call] == k, (name, method_name, ph, calls)
        assert calls[name, f"{method_name} in warmup"] == 0
    proto_steps = [r["step"] for r in records if "loss_proto" in r]
    # log records carry the step count after it
    assert proto_steps and min(proto_steps) > end
print("both frameworks drive the same BRPGPlugin methods, in the same phases")

# %% [markdown]
# ## Results on DigitScenes
#
# Each comparison below pairs a framework (or architecture) alone with the same plus BRPG,
# with the same budget, seed and data order as the mean-teacher runs of chapter 8 (2,000
# steps, 500 supervised warm-up, sampling window 500–600). Mind what is scored: the mean
# teacher is evaluated with its EMA teacher, UniMatch (its own teacher, no EMA copy) with
# the trained model itself, so a comparison across frameworks also compares an averaged
# model with a single one. The runs are remade with
# `brpg seeds --configs <preset> --seeds ... --dest results/digits`; each keeps
# its summary, its log and a `provenance.json`. This cell only reads them.

# %%
runs = load_runs(RESULTS)
PAIRS = [
    (
        "DeepLabV3+ (small CNN), mean teacher",
        "digits_meanteacher_1_16",
        "digits_brpg_1_16",
    ),
    (
        "DeepLabV3+ (small CNN), UniMatch",
        "digits_unimatch_1_16",
        "digits_unimatch_brpg_1_16",
    ),
    (
        "SegFormer (MiT-B0), mean teacher",
        "digits_segformer_meanteacher_1_16",
        "digits_segformer_brpg_1_16",
    ),
    (
        "DeepLabV3+ (small CNN), mean teacher, 1/8",
        "digits_meanteacher_1_8",
        "digits_brpg_1_8",
    ),
    (
        "DeepLabV3+ (small CNN), UniMatch, 1/8",
        "digits_unimatch_1_8",
        "digits_unimatch_brpg_1_8",
    ),
]


def run_of(name: str) -> dict[int, dict]:
    """The committed summaries of one preset, by seed."""
    return {r["config"]["train"]["seed"]: r for r in runs.get(name, [])}


def by_seed(name: str) -> dict[int, float]:
    return {k: r["val_miou"] for k, r in run_of(name).items()}


def fmt(values: list[float]) -> str:
    if not values:
        return "not run yet"
    return mean_std_text(*mean_std(values), len(values), show_n=True)


lines = [
    "| 1/16 labels unless noted | alone | + BRPG | BRPG − alone, per seed |",
    "|---|---|---|---|",
]
paired: dict[str, list[float]] = {}
for label, alone, with_brpg in PAIRS:
    a, b = by_seed(alone), by_seed(with_brpg)
    seeds = sorted(set(a) & set(b))
    paired[label] = [b[k] - a[k] for k in seeds]
    diffs = ", ".join(signed(d) for d in paired[label]) or "—"
    lines.append(
        f"| {label} | {fmt(list(a.values()))} | {fmt(list(b.values()))} | {diffs} |"
    )
display(Markdown("val mIoU (%)\n\n" + "\n".join(lines)))

# %%
measured = {k: v for k, v in paired.items() if v}
for label, diffs in measured.items():
    ahead, behind = sum(d > 0.05 for d in diffs), sum(d < -0.05 for d in diffs)
    print(
        f"{label}: BRPG ahead in {ahead}, behind in {behind}, "
        f"within 0.05 points in {len(diffs) - ahead - behind} of {len(diffs)} "
        "paired seeds, mean "
        f"{signed(sum(diffs) / len(diffs))} points"
    )
# chapter 8's committed runs
assert "DeepLabV3+ (small CNN), mean teacher" in measured
missing = [label for label, diffs in paired.items() if len(diffs) < 3]
print("fewer than 3 paired seeds so far:", "; ".join(missing) or "none")

# %% [markdown]
# ## Reading the numbers
#
# With the small CNN and the mean teacher, BRPG is ahead of the framework alone in every
# paired seed at both splits (chapter 8). The other comparisons:
#
# * **UniMatch at 1/16** (three seeds). UniMatch alone ends at SupOnly's level in every
#   seed (within 1.5 points of it) and below the mean teacher of the same seed. Adding
#   BRPG has no consistent effect: it is ahead in two seeds (by 1.0 and 2.3 points) and far
#   behind in seed 0, where the background IoU drops from 96 to 90 % and every digit class
#   falls. The mean of the paired differences is smaller than their spread, so three seeds
#   cannot tell it from zero in either direction. The spread over seeds is larger with BRPG
#   than without in these three seeds; three seeds are too few to call that an instability
#   of the method. Two differences from the mean teacher may matter,
#   though neither is tested: UniMatch halves its own loss terms, so L_pro (weight 1) weighs
#   twice as much against the supervised loss; and its pseudo-labels come from the model
#   itself, so prototypes built from them can reinforce its own mistakes.
# * **UniMatch at 1/8** (three seeds). With twice the labels, UniMatch alone ends 1 to 4
#   points above SupOnly, still below the mean teacher of the same seed. Here BRPG is ahead
#   of it in every seed, by about 5 to 6.5 points: more than it gains on the mean teacher at
#   1/8 in any seed (2 to 4 points). UniMatch + BRPG still ends below the mean teacher
#   *alone* in every seed, so on DigitScenes the framework matters more than the plug-in.
#   This is the one comparison here in which BRPG helps a second framework as the paper
#   says it does; the same recipe at 1/16 did not.
# * **SegFormer** (MiT-B0, three seeds). Trained from random weights on 125 labeled 64-px
#   scenes, it barely learns the digits: it stays far below the small CNN, and one seed
#   predicts background everywhere, with and without BRPG (a pair that compares nothing). At
#   that level BRPG and the mean teacher are within a fraction of a point of each other in
#   every seed, so the sign of those differences carries no information. This says little
#   about BRPG; a transformer needs pretrained weights or far more data than DigitScenes.
#
# So these DigitScenes runs support the paper's claim of generality for UniMatch at 1/8, not
# at 1/16, and cannot test it for SegFormer trained from scratch. We did not tune anything
# between the runs: every preset shares the mean-teacher runs' budget and BRPG settings. The
# cell below checks each statement against the numbers.

# %%
mt_small = mean_std(list(by_seed("digits_meanteacher_1_16").values()))[0]
supo = by_seed("digits_suponly_1_16")
uni_a, uni_b = by_seed("digits_unimatch_1_16"), by_seed("digits_unimatch_brpg_1_16")
mt_a = by_seed("digits_meanteacher_1_16")
uni_seeds = sorted(set(uni_a) & set(uni_b))
assert len(uni_seeds) >= 3
for k in uni_seeds:
    # at SupOnly's level
    assert uni_a[k] < mt_a[k] and abs(uni_a[k] - supo[k]) < 1.5
uni_d = paired["DeepLabV3+ (small CNN), UniMatch"]
d_mean, d_std = mean_std(uni_d)
assert min(uni_d) < 0 < max(uni_d)  # ahead in some seeds, behind in others
# the two seeds ahead
assert sorted(round(d, 1) for d in uni_d if d > 0) == [1.0, 2.3]
assert abs(d_mean) < d_std  # the mean difference is within its spread
# a larger spread in these three seeds (the prose says no more than that)
assert mean_std(list(uni_b.values()))[1] > mean_std(list(uni_a.values()))[1]
worst = min(uni_seeds, key=lambda k: uni_b[k] - uni_a[k])
assert worst == 0 and uni_b[0] < uni_a[0] - 5
worst_run = run_of("digits_unimatch_brpg_1_16")[0]
alone_run = run_of("digits_unimatch_1_16")[0]
other_bg = [
    r["per_class_iou"][0]
    for n in ("digits_unimatch_1_16", "digits_unimatch_brpg_1_16")
    for r in runs[n]
    if r is not worst_run
]
assert worst_run["per_class_iou"][0] < min(other_bg) - 4  # the background IoU drops
assert all(
    x < y
    for x, y in zip(
        worst_run["per_class_iou"][1:], alone_run["per_class_iou"][1:], strict=True
    )
)
print(
    f"UniMatch 1/16: BRPG − alone {signed(d_mean)} ± {d_std:.1f} points "
    f"over {len(uni_d)} seeds"
)
supo8 = by_seed("digits_suponly_1_8")
mt8 = by_seed("digits_meanteacher_1_8")
uni8_a, uni8_b = by_seed("digits_unimatch_1_8"), by_seed("digits_unimatch_brpg_1_8")
uni8_seeds = sorted(set(uni8_a) & set(uni8_b))
assert len(uni8_seeds) >= 3
for k in uni8_seeds:
    # above SupOnly, below MT
    assert 1.0 <= uni8_a[k] - supo8[k] <= 4.0 and uni8_a[k] < mt8[k]
    assert uni8_b[k] < mt8[k]  # UniMatch + BRPG below the mean teacher alone
uni8_d = paired["DeepLabV3+ (small CNN), UniMatch, 1/8"]
mt8_d = paired["DeepLabV3+ (small CNN), mean teacher, 1/8"]
# ahead in every seed, by about 5 to 6.5
assert all(4.5 <= d <= 6.5 for d in uni8_d)
assert min(uni8_d) > max(mt8_d) and all(2.0 <= d <= 4.0 for d in mt8_d)
print(
    f"UniMatch 1/8: BRPG − alone {signed(mean_std(uni8_d)[0])} "
    f"± {mean_std(uni8_d)[1]:.1f} points"
)
seg_a = by_seed("digits_segformer_meanteacher_1_16")
seg_b = by_seed("digits_segformer_brpg_1_16")
assert len(set(seg_a) & set(seg_b)) >= 3
assert max(seg_a.values()) < mt_small - 10  # far below the small CNN
assert all(abs(d) < 1.0 for d in paired["SegFormer (MiT-B0), mean teacher"])
background_only = [
    f"{name} seed {r['config']['train']['seed']}"
    for name in ("digits_segformer_meanteacher_1_16", "digits_segformer_brpg_1_16")
    for r in runs[name]
    if max(r["per_class_iou"][1:]) == 0.0
]
print(
    "SegFormer runs that predict no digit at all:",
    "; ".join(sorted(background_only)),
)
assert background_only

# %% [markdown]
# ## Exercises
#
# Predict the answer first; each solution is hidden under its cell and checks itself.
#
# 1. **Two normalisers.** UniMatch divides its confident-pixel cross-entropy by *all* pixels,
#    U2PL's $\mathcal L_u$ by the kept ones (times its factor). Early in training, when the
#    teacher is confident on a quarter of the pixels, how does UniMatch's loss compare with
#    the plain mean over the confident pixels?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution: it is a quarter of it. Summing over the confident pixels and dividing
# by all of them scales the mean by the confident share, so UniMatch's unlabeled
# terms start weak and grow as the teacher becomes sure of more pixels. Checked with
# the package's confident_ce:
g = torch.Generator().manual_seed(0)
logits_x = torch.randn(2, 11, 16, 16, generator=g)
pseudo_x = torch.randint(0, 11, (2, 16, 16), generator=g)
conf_x = torch.zeros(2, 16, 16)
conf_x[:, :8, :8] = 0.99  # a quarter of the pixels confident
ce_x = torch.nn.functional.cross_entropy(logits_x, pseudo_x, reduction="none")
uni = float(confident_ce(logits_x, pseudo_x, conf_x, 0.95))
mean_conf = float(ce_x[conf_x >= 0.95].mean())
print(
    f"UniMatch {uni:.4f} = {uni / mean_conf:.3f} x the mean over confident pixels "
    f"{mean_conf:.4f}"
)
assert abs(uni / mean_conf - 0.25) < 1e-6

# %% [markdown]
# 2. **Nothing confident.** At the very start the teacher may be confident on no pixel at all.
#    What does UniMatch's unlabeled term return then, and can the step still backpropagate?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution: exactly 0, still connected to the logits, so backward() runs and gives
# zero gradients (no NaN from an empty mean, unlike the official L_pro on an empty
# selection, Q19).
logits_0 = torch.randn(2, 11, 16, 16, generator=g, requires_grad=True)
loss_0 = confident_ce(logits_0, pseudo_x, torch.zeros(2, 16, 16), 0.95)
loss_0.backward()
print(
    f"loss {float(loss_0.detach())}, "
    f"gradient max {float(logits_0.grad.abs().max())}"
)
assert (
    float(loss_0.detach()) == 0.0
    and logits_0.grad is not None
    and float(logits_0.grad.abs().max()) == 0.0
)

# %% [markdown]
# ## Summary
#
# * BRPG attaches to a framework through one plug-in class called four times per step; the
#   mean teacher and a UniMatch-style framework call the same methods in the same phases
#   (asserted on live runs).
# * On DigitScenes version 2, adding BRPG to UniMatch helps at 1/8 in every seed (by about 5
#   to 6.5 points) and has no consistent effect at 1/16.
# * A SegFormer (MiT-B0) trained from random weights barely learns DigitScenes, with or
#   without BRPG, so it cannot test the method.
#
# ```{admonition} What we could not check here
# :class: note
# The paper's UniMatch and SegFormer results: the authors released no code for them, and
# checking them needs the real data sets, ImageNet-pretrained MiT weights (nothing can be
# downloaded here) and GPUs. The `voc_unimatch_*` and `voc_segformer_*` presets exist but have
# not been run. The DigitScenes comparisons have not been redone on version 3.
# ```
