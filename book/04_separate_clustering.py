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
# # 4. Separate clustering of high- and low-confidence features
#
# [![Open In Colab](../_static/colab-badge.svg)](https://colab.research.google.com/github/brpg-book/brpg-book/blob/main/book/04_separate_clustering.ipynb)
#
# Chapter 3 split the correctly classified pixels of every class $c$ into a high-confidence
# set $\mathcal H_c$ and a low-confidence set $\mathcal L_c$, and found the low-confidence
# pixels closer to object boundaries. BRPG turns both sets into prototypes, **separately**:
#
# 1. during the sampling window every step pushes its routed features into per-class FIFO
#    memories, one for $\mathcal H_c$ and one for $\mathcal L_c$ (at most `queue_len` rows
#    each; {ref}`appendix <authors-cpg>`);
# 2. once, at the end of the window, k-means runs on each memory on its own: $K_h = 2$
#    centres from the high memory and $K_l = 2$ from the low memory of every class
#    (Euclidean k-means on the raw features, {ref}`appendix <authors-apo>`):
#
# $$\{r^{h}_{c,k}\}_{k=1}^{K_h} = \arg\min_{r}\sum_{f\in\mathcal H_c}\min_k \lVert f - r_k\rVert^2,
#   \qquad
#   \{r^{l}_{c,k}\}_{k=1}^{K_l} = \arg\min_{r}\sum_{f\in\mathcal L_c}\min_k \lVert f - r_k\rVert^2.$$
#
# The $K_h + K_l$ prototypes of class $c$ then score a feature $f$ by
# $s(f, c) = \max_k \cos(f, r_{c,k})$ (chapter 7). Clustering both sets together would let
# the many confident pixels decide where every centre goes. Clustering them apart
# guarantees that some prototypes sit where the *unsure* pixels are. The paper calls them
# boundary prototypes and argues that they lie closer to the decision boundary between
# classes. This chapter measures whether they do.
#
# APO, which may add a third prototype to some memories, is switched off here; it is the
# subject of chapter 5.

# %% tags=["remove-cell"]
# Installs brpg when this notebook runs on Colab; does nothing anywhere else.
import subprocess
import sys

INSTALL_URL = "git+https://github.com/brpg-book/brpg-book@main"
if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"brpg[book] @ {INSTALL_URL}"], check=True)

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
import torch.nn.functional as F
from IPython.display import display

from brpg.book.demo import EverySeed, cluster, clustering_state
from brpg.book.demo_margin import class_centres, prototype_margins
from brpg.book.tools import show_source
from brpg.data.build import PROJECT_ROOT
from brpg.data.digits import DIGIT_CLASSES
from brpg.method.clustering import cluster_memories
from brpg.method.cpg import LabeledRoutes, Rows, memory_rows
from brpg.method.kmeans import batched_kmeans_full
from brpg.method.memory import PrototypeMemory
from brpg.method.plugin import BRPGPlugin

torch.set_num_threads(2)

# %% [markdown]
# ## Filling the memories
#
# The memories studied here are the ones the committed BRPG run of chapter 3 (1/16 of the
# labels, seed 0) filled in its sampling window, steps 500 to 599, while it trained: every
# step the plug-in's `observe` takes the student's features of the 16 labeled scenes and
# the eval-mode teacher's features of the 16 unlabeled scenes, routes them as in chapter 3,
# keeps a random budget of rows with `memory_rows` (the cap of `cpg_rows`) and pushes them
# into a `PrototypeMemory`. The budgets are the DigitScenes presets' (64 rows per image and
# step, 10,000 rows per memory). `brpg.book.demo.clustering_state` (chapter 3) hands over
# the memories as they are at step 600, when the run clusters them.

# %%
show_source(BRPGPlugin.observe)

# %%
show_source(memory_rows)

# %%
show_source(PrototypeMemory.push)

# %%
t0 = time.perf_counter()
run = clustering_state()
memory = run.memory
n_high, n_low = memory.count["high"], memory.count["low"]
print(
    f"{run.cfg.name} seed {run.cfg.train.seed} at step {run.step} "
    f"(ready in {time.perf_counter() - t0:.0f} s)"
)
print(f"rows per class (capacity {memory.capacity:,} per memory):")
print(f"{'class':>10} {'high':>6} {'low':>6}")
for c, name in enumerate(DIGIT_CLASSES):
    print(f"{name:>10} {int(n_high[c]):6d} {int(n_low[c]):6d}")
# background: both at the cap; every digit: low is larger
assert int(n_high[0]) == int(n_low[0]) == memory.capacity
assert bool((n_low[1:] > n_high[1:]).all()), (n_high, n_low)

# %% [markdown]
# Background fills both of its memories to the cap; each digit has far fewer rows. After
# 500 supervised steps and 100 with the mean teacher the model is sure about little except
# the background, so on this seed the *low* memory is the larger one for every digit. On
# other seeds it is so for most digits, not always for all (checked below).
#
# ## Clustering
#
# `cluster_memories` clusters all classes of one memory kind at once with a batched
# k-means (`batched_kmeans_full`: k-means++ seeding, Lloyd iterations, three seedings,
# padding rows masked out), then packs the centres into the prototype bank's layout
# `[C, K_h + K_l, D]`: slots `0 … K_h-1` high, `K_h …` low.

# %%
show_source(cluster_memories)

# %%
t1 = time.perf_counter()
protos, valid = cluster(memory, run.cfg, apo=False)
k_h = run.cfg.proto.num_high
print(
    f"k-means on {2 * run.cfg.data.num_classes} memories "
    f"in {time.perf_counter() - t1:.1f} s"
)
print(
    "prototype bank:",
    tuple(protos.shape),
    "valid slots per class:",
    valid.sum(1).tolist(),
)

# %% [markdown]
# ## A margin that measures "closer to the decision boundary"
#
# Let the **centre** $\mu_c$ of class $c$ be the normalised mean direction of its rows,
# with the high and the low memory weighted equally (whichever memory holds more rows
# would otherwise pull the centre towards its own prototypes). The nearest-centre cosine
# classifier assigns a feature to the class whose centre is most similar; its decision
# boundary between $c$ and another class is where the two similarities are equal. For a
# prototype $p$ of class $c$ we therefore define the **margin**
#
# $$m(p) = \cos(p, \mu_c) - \max_{c' \ne c} \cos(p, \mu_{c'}).$$
#
# $m(p) > 0$ means $p$ lies on its own class's side, $m(p) = 0$ on the boundary to its
# closest rival, and a smaller $m(p)$ means closer to that boundary. The claim to check:
# the low-confidence prototypes have a smaller margin than the high-confidence ones.


# %%
display(show_source(class_centres))
display(show_source(prototype_margins))

# %%
high_f, high_v = memory.get("high")
low_f, low_v = memory.get("low")
mu = class_centres(memory)
num_classes = mu.shape[0]
margins = prototype_margins(protos, valid, mu, k_h)
p_hat = F.normalize(protos, dim=2)  # [C, K, D]; prototypes are compared by cosine
is_high = torch.arange(protos.shape[1]) < k_h
rival, m_high, m_low = margins.rival, margins.m_high, margins.m_low
# A memory with a handful of rows gives prototypes that are little more than
# single pixels.
enough = (n_high >= 20) & (n_low >= 20)

# %% [markdown]
# ## A picture
#
# For a class $c$ and its rival $r$ (the class whose centre comes closest to $c$'s
# prototypes), the horizontal axis below is the direction from $\mu_r$ to $\mu_c$. For a
# unit vector $f$, $\cos(f,\mu_c) - \cos(f,\mu_r) = f\cdot(\mu_c-\mu_r)$, so the
# decision boundary between the two classes is exactly the vertical line at 0, and
# everything right of it is on $c$'s side. The vertical axis is the main remaining
# variation of the rows (their first principal component orthogonal to the first axis).
# Dots are memory rows (normalised), stars the high-confidence prototypes, triangles the
# low-confidence ones. The panels show the digit classes with the most high-confidence rows.

# %%
digits_enough = [
    c
    for c in torch.argsort(n_high, descending=True).tolist()
    if c > 0 and enough[c]
]
show = sorted(digits_enough[:4])


def sample_rows(c: int, kind: str, n: int = 300) -> torch.Tensor:
    """Up to ``n`` normalised rows of a memory (a fixed random subset)."""
    f, v = (high_f, high_v) if kind == "high" else (low_f, low_v)
    x = f[c][v[c]]
    g = torch.Generator().manual_seed(c)
    return F.normalize(x[torch.randperm(len(x), generator=g)[:n]], dim=1)


fig, axes = plt.subplots(1, len(show), figsize=(3.2 * len(show), 3.3))
for ax, c in zip(np.atleast_1d(axes), show, strict=True):
    r = int(rival[c])
    pts = {
        "rival": torch.cat(
            [sample_rows(r, "high", 150), sample_rows(r, "low", 150)]
        ),
        "high": sample_rows(c, "high"),
        "low": sample_rows(c, "low"),
    }
    u = mu[c] - mu[r]
    allx = torch.cat(list(pts.values()))
    resid = allx - (allx @ u)[:, None] * u / (u @ u)
    _, _, v2 = torch.pca_lowrank(resid, q=1)
    basis = torch.stack([u, v2[:, 0]], dim=1)  # [D, 2]
    kw = {"s": 6, "alpha": 0.5, "linewidths": 0}
    for key, col, lab in (
        ("rival", "0.6", f"rows of {DIGIT_CLASSES[r]} (rival)"),
        ("high", "tab:green", "high rows"),
        ("low", "tab:orange", "low rows"),
    ):
        xy = (pts[key] @ basis).numpy()
        ax.scatter(xy[:, 0], xy[:, 1], color=col, label=lab, **kw)
    xy = (p_hat[c][valid[c]] @ basis).numpy()
    kinds = is_high[valid[c]].numpy()
    ax.scatter(
        *xy[kinds].T,
        marker="*",
        s=220,
        color="tab:green",
        edgecolor="k",
        label="high proto",
    )
    ax.scatter(
        *xy[~kinds].T,
        marker="^",
        s=120,
        color="tab:orange",
        edgecolor="k",
        label="low proto",
    )
    ax.axvline(0.0, color="k", ls="--", lw=1)
    ax.set_title(f"class {DIGIT_CLASSES[c]} vs {DIGIT_CLASSES[r]}", fontsize=10)
    ax.set_xlabel(r"$f\cdot(\mu_c-\mu_r)$  (boundary at 0)", fontsize=8)
    ax.set_yticks([])
    ax.legend(fontsize=6, loc="upper left", markerscale=0.7)
fig.tight_layout()
plt.show()

# %% [markdown]
# The rows of the two classes overlap a lot: the representation head is still random, and
# after 600 steps the decoder separates the digits only partly. The prototypes, averages
# of many rows, sit close to the line, most of them on the class's side and a few on or
# just across it. The numbers (for every class, not only the four drawn):

# %%
print(f"{'class':>10} {'n high':>7} {'n low':>6} {'m(high)':>8} {'m(low)':>8}")
for c, name in enumerate(DIGIT_CLASSES):
    flag = "" if enough[c] else "  (fewer than 20 rows: not counted)"
    print(
        f"{name:>10} {int(n_high[c]):7d} {int(n_low[c]):6d} "
        f"{m_high[c]:8.3f} {m_low[c]:8.3f}{flag}"
    )
closer = int((m_low < m_high)[enough].sum())
n_counted = int(enough.sum())
mean_high, mean_low = float(m_high[enough].mean()), float(m_low[enough].mean())
print(
    f"\nlow prototypes have the smaller margin in {closer} of {n_counted} classes"
)
print(f"mean margin over those classes: high {mean_high:.3f}, low {mean_low:.3f}")

# %%
counted = torch.nonzero(enough).flatten().tolist()
fig, ax = plt.subplots(figsize=(6, 2.6))
x = np.arange(len(counted))
bar_high, bar_low = m_high[counted].numpy(), m_low[counted].numpy()
ax.bar(x - 0.2, bar_high, 0.4, color="tab:green", label="high prototypes")
ax.bar(x + 0.2, bar_low, 0.4, color="tab:orange", label="low prototypes")
ax.axhline(0, color="k", lw=0.8)
ax.set_xticks(x, [DIGIT_CLASSES[c] for c in counted], fontsize=8)
ax.set_ylabel("margin $m(p)$, mean per kind")
ax.set_title("classes with at least 20 rows in both memories", fontsize=9)
ax.legend(fontsize=8)
plt.show()

# %% [markdown]
# The claim, checked on these prototypes: on average over the classes with at least 20
# rows in both memories, and in most of those classes, the low-confidence prototypes lie
# closer to the decision boundary of the nearest-centre classifier than the
# high-confidence ones.

# %%
assert mean_low < mean_high, (mean_low, mean_high)
assert closer > n_counted / 2, (closer, n_counted)

# %% [markdown]
# ## On every seed with saved states
#
# Both claims of this chapter (the low memory is the larger one for most digits; the low
# prototypes have the smaller margin, on average and in most classes) are about one run.
# The same checks on every committed BRPG run at 1/16 whose memories at step 600 are saved
# beside it (written by exact re-runs, as in chapter 3):

# %%
study_dir = PROJECT_ROOT / "results" / "digits_v3" / "study" / run.cfg.name
seeds = EverySeed(study_dir, {run.step: ("memory",)})
high_larger = {}  # seed -> the digits whose high memory is the larger one
for seed, (state,) in seeds:
    mem = state.memory
    nh, nl = mem.count["high"], mem.count["low"]
    pr, va = cluster(mem, state.cfg, apo=False)  # as above: APO off, k-means seed 0
    mg = prototype_margins(pr, va, class_centres(mem), state.cfg.proto.num_high)
    ok = (nh >= 20) & (nl >= 20)
    n_closer, n_ok = int((mg.m_low < mg.m_high)[ok].sum()), int(ok.sum())
    mh, ml = float(mg.m_high[ok].mean()), float(mg.m_low[ok].mean())
    digits_low_larger = int((nl[1:] > nh[1:]).sum())
    exceptions = [c for c in range(1, len(nl)) if nl[c] <= nh[c]]
    if exceptions:  # how much larger, as a share of the high memory
        high_larger[seed] = {
            DIGIT_CLASSES[c]: float(1 - nl[c] / nh[c]) for c in exceptions
        }
    but = ", ".join(
        f"digit {DIGIT_CLASSES[c]}: {int(nl[c]):,} low, {int(nh[c]):,} high"
        for c in exceptions
    )
    print(
        f"{seed}: low memory larger for {digits_low_larger} of {len(nl) - 1} digits"
        + (f" (not for {but})" if exceptions else "")
        + "\n"
        f"  low prototypes closer in {n_closer} of {n_ok} classes; "
        f"mean margin high {mh:.3f}, low {ml:.3f}"
    )
    # the run studied above: the same numbers
    if state.cfg.train.seed == run.cfg.train.seed:
        assert (n_closer, n_ok, mh, ml) == (closer, n_counted, mean_high, mean_low)
    assert digits_low_larger > (len(nl) - 1) / 2, (seed, nh, nl)  # most digits
    assert ml < mh and n_closer > n_ok / 2, (seed, mh, ml, n_closer, n_ok)
print(seeds.report())
assert "seed0" in seeds.checked
# The paragraph below names the exceptions; a new seed that adds one must
# restate it.
assert {s: list(e) for s, e in high_larger.items()} == {
    s: ["1"] for s in ["seed4"] if s in seeds.checked
}, high_larger
# "slightly"
assert all(gap < 0.05 for e in high_larger.values() for gap in e.values())

# %% [markdown]
# How many classes have the closer low prototypes varies from seed to seed (printed above),
# which is why the claim is about the average and most classes, not about every class.
#
# **What seed 4 changed.** This chapter first said that the low memory is the larger one
# for *every* digit, which held on seeds 0–3. On seed 4 it fails for one digit: digit 1's
# high memory has slightly more rows than its low one (the counts are printed above; they
# differ by less than 5 %). The other nine digits are as on the other seeds, and the second
# claim, the one this chapter is about, holds on seed 4 as on every seed: the low
# prototypes sit closer to the boundary. So the claim now reads "for most digits". Seed 4's
# 1/16 subset is the one on which SupOnly, the mean teacher and plain prototypes score
# highest (chapter 8), so a model that is already surer of a thin, simple digit after 600
# steps is not a surprise; but that is a reading, not something this chapter measured.
#
# ## Exercises
#
# Predict the answer first; each solution is hidden under its cell and checks itself.
#
# 1. **The per-step budget.** With `sample_pixel_num` $= 64$ and a batch of $B = 16$ labeled
#    images, at most how many rows can one step push into the high memories, and into the
#    low ones, however many pixels are routed? And if only 500 pixels are routed high?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution: high takes at most sample_pixel_num x 2B = 2,048 rows (labeled and
# unlabeled high rows share it), low at most sample_pixel_num x B = 1,024; with 500
# high candidates all 500 go in. Checked with the package's memory_rows on synthetic
# routes of 20,000 pixels:
n_px, b = 20_000, 16
g = torch.Generator().manual_seed(0)
feats_nd = torch.randn(n_px, 8, generator=g)
cls_n = torch.randint(0, 11, (n_px,), generator=g)
for n_high in (n_px, 500):
    high_cls = torch.where(torch.arange(n_px) < n_high, cls_n, -1)
    routes_syn = LabeledRoutes(feats_nd, high_cls, feats_nd, cls_n)
    none_u = Rows(feats_nd[:0], cls_n[:0])
    high_rows, low_rows = memory_rows(
        routes_syn, none_u, b, sample_pixel_num=64, generator=g
    )
    pushed = int((high_rows.cls >= 0).sum()), int((low_rows.cls >= 0).sum())
    print(
        f"{n_high} high candidates: {pushed[0]} high rows, "
        f"{pushed[1]} low rows pushed"
    )
    assert pushed == (min(n_high, 64 * 2 * b), 64 * b)

# %% [markdown]
# 2. **More prototypes than rows.** Early in a sampling window a rare class may have only 3
#    rows in its low memory while the clustering asks for 4 low prototypes. What comes back?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution: 3 valid centres, one per row, and the 4th slot marked invalid;
# the bank then masks that slot out of every max, so the class is classified with
# what it has.
rows3 = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]])  # one memory, 3 rows
res3 = batched_kmeans_full(rows3, 4, seed=0)
print(
    f"valid centres: {res3.center_valid[0].tolist()}; "
    f"assignment of the rows: {res3.assign[0].tolist()}"
)
assert res3.center_valid[0].sum() == 3
assert sorted(res3.assign[0].tolist()) == [0, 1, 2]

# %% [markdown]
# ## Summary
#
# * During the sampling window the routed features fill per-class first-in-first-out
#   memories; at its end k-means runs once on each class's high and low memory separately:
#   2 + 2 prototypes per class before APO.
# * Measured by the margin to the nearest-centre decision boundary, the low-confidence
#   prototypes lie closer to the boundary than the high-confidence ones, on average and in
#   most classes with at least 20 rows in both memories (asserted).
# * `brpg` clusters all classes of a memory kind at once with a batched k-means on the
#   device, where the official code runs scikit-learn class by class on the CPU.
#
# ```{admonition} What we could not check here
# :class: note
# Memories of the official size (30,000 rows per class and kind, 256-d features of a trained
# ResNet-101, 19 to 81 classes) and whether prototypes near the boundary improve the
# segmentation of real images: that needs full PASCAL VOC or Cityscapes runs with and without
# the split, on GPUs. Here the memories are those of DigitScenes runs at 1/16: seed 0 in
# detail, the other committed seeds in the checks of "On every seed with saved states".
# ```
