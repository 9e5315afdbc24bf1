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
# # 6. EMA prototype updates
#
# [![Open In Colab](../_static/colab-badge.svg)](https://colab.research.google.com/github/brpg-book/brpg-book/blob/main/book/06_ema_prototypes.ipynb)
#
# BRPG clusters its memories exactly once, right after the sampling window ({ref}`appendix <authors-apo>`).
# Training then goes on for the rest of the schedule (78 of 80 epochs on VOC) and the
# representation keeps changing: the supervised and unsupervised losses move the decoder,
# and the prototype loss of the next chapter moves the representation head itself. The
# prototypes would soon describe features that no longer exist. So after every step each
# prototype moves a little towards the features that chose it ({ref}`appendix <authors-ema>`):
#
# $$
# k^*(f) = \arg\max_{k\ \text{valid}} \cos\!\big(f,\ r_{y,k}\big), \qquad
# r_{c,k} \leftarrow \alpha\, r_{c,k} + (1 - \alpha)\, \bar f_{c,k}, \qquad
# \bar f_{c,k} = \frac{1}{|S_{c,k}|} \sum_{f \in S_{c,k}} f ,
# $$
#
# where $y$ is the feature's target (the ground truth on the labeled grid, the teacher's
# pseudo-label for the sampled unlabeled pixels), $S_{c,k}$ is the set of this step's
# features with target $c$ whose nearest prototype *of class $c$* is slot $k$, and
# $\alpha = 0.99$. Three details matter:
#
# * a feature only ever updates a prototype of **its own class**, even when a prototype of
#   another class is nearer;
# * a prototype that no feature chose this step **does not move**, not even by the decay
#   $\alpha$;
# * prototypes and features stay unnormalised: $\bar f$ is a mean of raw features, and only
#   the cosine (used to choose $k^*$ and, in chapter 7, the logits) ignores the norm.
#
# With $\alpha = 0.99$ a step's batch has weight $1 - \alpha = 1\,\%$, and an initial
# prototype's weight halves after $\ln 0.5 / \ln 0.99 \approx 69$ updates: the bank forgets
# its k-means initialisation within a few hundred steps of a run that lasts tens of
# thousands.

# %% tags=["remove-cell"]
# Installs brpg when this notebook runs on Colab; does nothing anywhere else.
import subprocess
import sys

INSTALL_URL = "git+https://github.com/brpg-book/brpg-book@main"
if "google.colab" in sys.modules:
    pip = [sys.executable, "-m", "pip", "install", "-q"]
    subprocess.run([*pip, f"brpg[book] @ {INSTALL_URL}"], check=True)

# %%
import copy
import time

import matplotlib.pyplot as plt
import numpy as np
import torch
from IPython.display import display

from brpg.book.demo import EverySeed, clustering_state, last_eval, run_state
from brpg.book.demo_ema import (
    cell_fit,
    claims,
    ema_batch,
    proto_cos,
    stream_source,
    track,
)
from brpg.book.tools import show_source
from brpg.data.build import PROJECT_ROOT
from brpg.data.digits import DIGIT_CLASSES, PALETTE
from brpg.method.prototype_ema import PrototypeBank

torch.set_num_threads(2)
t_chapter = time.perf_counter()

# %% [markdown]
# ## The code
#
# `PrototypeBank` keeps all prototypes in one tensor `prototypes[C, K, D]` with a mask
# `valid[C, K]` (the official layout gives a class 4 to 6 prototypes, {ref}`appendix <authors-apo>`). The assignment reads the cosine of
# every feature to every slot, keeps only the slots of the feature's own class and takes the
# argmax:

# %%
display(show_source(PrototypeBank.assign))

# %% [markdown]
# The update then sums the features per slot with one `index_add_` (no loop over classes),
# divides by the counts, and writes the moved prototypes back only where a slot received at
# least one feature:

# %%
display(show_source(PrototypeBank.ema_update))

# %% [markdown]
# ## One update by hand
#
# Two classes in 2-D. Class 0 has two prototypes, $r_{0,0} = (1, 0)$ and
# $r_{0,1} = (0, 1)$; class 1 has one, $r_{1,0} = (-1, 0)$ (its second slot is invalid).
# Three features arrive:
#
# | feature | target | cosines to $r_{0,0}$, $r_{0,1}$, $r_{1,0}$ | goes to |
# |---|---|---|---|
# | $f_1 = (3, 1)$ | 0 | 0.949, 0.316, −0.949 | $r_{0,0}$ |
# | $f_2 = (-2, 1)$ | 0 | −0.894, 0.447, **0.894** | $r_{0,1}$: its own class, although $r_{1,0}$ is nearer |
# | $f_3 = (1, 2)$ | 255 | — | nothing (ignored) |
#
# With $\alpha = 0.99$:
#
# * $r_{0,0} \leftarrow 0.99\,(1, 0) + 0.01\,(3, 1) = (1.02,\ 0.01)$,
# * $r_{0,1} \leftarrow 0.99\,(0, 1) + 0.01\,(-2, 1) = (-0.02,\ 1.00)$,
# * $r_{1,0}$ received no feature and stays $(-1, 0)$ exactly.
#
# Note that $r_{0,0}$ grew longer than 1: the prototypes are raw averages, not unit vectors.
# The bank computes the same:

# %%
toy = PrototypeBank(num_classes=2, dim=2, max_per_class=2, momentum=0.99)
toy.set_prototypes(
    torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, 0.0]]]),
    torch.tensor([[True, True], [True, False]]),
)
feats = torch.tensor([[3.0, 1.0], [-2.0, 1.0], [1.0, 2.0]])
targets = torch.tensor([0, 0, 255])
slot, used = toy.assign(feats, targets)
print("cosines [feature, class, slot]:\n", toy.cosine(feats).numpy().round(3))
print("slot c*K + k:", slot.tolist(), "used:", used.tolist())
toy.ema_update(feats, targets)
print("prototypes after one update:\n", toy.prototypes.numpy().round(4))

expected = torch.tensor([[[1.02, 0.01], [-0.02, 1.00]], [[-1.0, 0.0], [0.0, 0.0]]])
assert slot[:2].tolist() == [0, 1] and used.tolist() == [True, True, False]
assert torch.allclose(toy.prototypes, expected, atol=1e-6)
# untouched, bit for bit
assert torch.equal(toy.prototypes[1, 0], torch.tensor([-1.0, 0.0]))

# %% [markdown]
# ## Prototypes that follow a training run
#
# Now real features: the committed BRPG run of the evidence study (1/16 of the labels,
# seed 0, chapters 3 to 5) at two moments. `clustering_state` is its state at step 600,
# just before the one-shot clustering (student, EMA teacher, CPG memories); `run_state(step=1000)`
# is the same run 400 steps later: its student, its teacher, and the bank its own steps fed
# with the EMA above. Both are read from files written by an exact re-run of the committed
# run (chapter 3 says why a file rather than a re-run here).
#
# Between the two moments the prototype loss of chapter 7 trains the representation head
# for the first time: nothing trains it before the prototypes exist
# ({ref}`appendix <authors-timeline>`), so at step 600 it still holds its random
# initialisation and by step 1000 it has been rewritten.

# %%
t0 = time.perf_counter()
early = clustering_state()  # step 600: before the clustering
late = run_state(step=1000)  # step 1000: 400 steps of L_pro and EMA later
print(f"two states of the run read in {time.perf_counter() - t0:.1f} s")
for name, state in (("early", early), ("late", late)):
    ev = last_eval(state)
    print(
        f"{name}: step {state.step}, val mIoU {ev['val_miou']:.1f} % "
        f"(evaluation at step {ev['step']})"
    )
head_e, head_l = early.model.decoder.rep_head, late.model.decoder.rep_head
w_e, w_l = head_e[-1].weight, head_l[-1].weight
w_change = ((w_l - w_e).norm() / w_e.norm()).item()
print(
    f"representation head, last layer: |W_1000 - W_600| / |W_600| = {w_change:.2f}"
)

# %% [markdown]
# The experiment starts from the run's own clustering of its memories (chapter 4: 4
# prototypes per class, 2 high + 2 low, 5 for the two classes where APO added one,
# chapter 5). What the prototypes should follow: the class means of the late student's
# features on 200 held-out val scenes. What the EMA is fed: what a BRPG step feeds it
# ({ref}`appendix <authors-ema>`). That is the labeled $(g+1)^2$ grid of 16 labeled scenes
# (student, train mode, ground truth; $g = 21$, the DigitScenes preset, see chapter 7) and
# the confident pixels of 16 unlabeled scenes: the student's features there, with the
# teacher's pseudo-labels where the teacher's confidence reaches the step's threshold
# (0.802 at step 600, 0.810 at step 1000: the ramp of chapter 7). One simplification: a real
# step reads the unlabeled features on the strongly augmented, CutMix-mixed view; here the
# student sees the plain scenes. The models' outputs are computed once, and each update
# draws its scenes at random.

# %%
display(show_source(stream_source))
display(show_source(ema_batch))

# %% [markdown]
# Two banks start from the clustered prototypes: the *tracked* bank is fed the late
# models' stream, and a *control* bank the early models' stream, with the same scenes drawn
# in the same order; 300 updates each (three times the time constant
# $1/(1-\alpha) = 100$), counting how many features each slot of the tracked bank receives.
# The control separates following the new features from what the EMA does to k-means
# centres when nothing drifts. `brpg.book.demo_ema.track` runs it all and keeps the record:

# %%
show_source(track)

# %%
t0 = time.perf_counter()
tr = track(early, late, n_updates=300, every=5, n_val=200, seed=0)
print(f"model outputs and 2 x 300 updates in {time.perf_counter() - t0:.0f} s")
num_classes, n_slots, dim = tr.stale.shape
print("valid prototypes per class:", tr.stale.num_valid().tolist())
# the run's bank at step 1000 grew from exactly this clustering:
# the same valid slots
assert torch.equal(late.bank.valid, tr.stale.valid)
print("each class mean turned by (degrees):", tr.turn.round().int().tolist())
print(
    f"mean cos of the clustered prototypes to their class mean:\n  "
    f"{torch.nanmean(proto_cos(tr.stale, tr.mu_early)):.3f} (early model), "
    f"{tr.mean_cos('stale'):.3f} (late model)"
)

# %% [markdown]
# The features did not drift, they turned: in 400 steps every class mean rotated by about a
# right angle, and the clustered prototypes, which sit close to the class means of the
# features they were clustered from (cosine 0.94), are about orthogonal to the late ones.
# This is the moment the EMA exists for. How each prototype of the tracked bank moved:

# %%
hist = tr.history.numpy()  # [T, C, K]
x = np.arange(hist.shape[0]) * tr.every
fig, (ax, ax2) = plt.subplots(
    1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [3, 2]}
)
for c in range(num_classes):
    slots = tr.stale.valid[c].nonzero().flatten().tolist()
    for k in slots:
        label = DIGIT_CLASSES[c] if k == slots[0] else None
        ax.plot(
            x, hist[:, c, k], color=np.asarray(PALETTE[c]) / 255, lw=1, label=label
        )
ax.set_xlabel("EMA update")
ax.set_ylabel("cos(prototype, late class mean)")
ax.set_title("each valid prototype of the tracked bank (colour: class)")
ax.legend(
    fontsize=7,
    ncol=11,
    loc="upper center",
    bbox_to_anchor=(0.5, -0.2),
    columnspacing=1,
)
bars = {
    "clustered (stale)": ("stale", "0.6"),
    "control: early stream": ("control", "C1"),
    "tracked: late stream": ("tracked", "C0"),
    "the run's bank, step 1000": ("run", "C2"),
}
pos, width = np.arange(num_classes), 0.2
for i, (label, (bank_name, colour)) in enumerate(bars.items()):
    vals = tr.class_cos(bank_name).numpy()
    ax2.bar(pos + (i - 1.5) * width, vals, width, label=label, color=colour)
ax2.axhline(0, color="k", lw=0.5)
ax2.set_xticks(pos, DIGIT_CLASSES, rotation=90, fontsize=7)
ax2.set_title("class average, cos to the late class mean")
ax2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
plt.tight_layout()
plt.show()

# %% [markdown]
# Most tracked prototypes climb within the first hundred updates from about 0 to cosines
# between 0.5 and 1, a few climb slowly over all 300, and a group stays flat. The control
# bank, fed the early models' stream, stays about orthogonal to the late features; the bank
# the run itself fed (green) ends about as close to the late class means as the tracked
# one, closer in some classes and less close in others. Which prototypes moved? Exactly
# those that received at least one feature; invalid slots, and any valid slot that no
# feature chose, keep their clustered values bit for bit:

# %%
moved = (tr.tracked.prototypes != tr.stale.prototypes).any(dim=2)
chosen = tr.hits > 0
print("features received per slot of the tracked bank (- = invalid slot):")
for c in range(num_classes):
    cells = [
        f"{int(h):>7d}" if v else "      -"
        for h, v in zip(tr.hits[c], tr.stale.valid[c], strict=True)
    ]
    print(f"{DIGIT_CLASSES[c]:>10}", *cells)
never = tr.stale.valid & ~chosen
run_moved = (tr.run.prototypes != tr.stale.prototypes).any(dim=2)
print(
    f"valid prototypes that no feature chose: {int(never.sum())} "
    f"of {int(tr.stale.valid.sum())}"
)
print(
    "valid prototypes of the run's bank still at their clustered values: "
    f"{int((tr.stale.valid & ~run_moved).sum())}"
)
assert torch.equal(moved, chosen & tr.stale.valid)

# %% [markdown]
# Here the EMA shows its one weakness. A prototype moves only when it is the nearest of its
# class for some feature; after a jump as large as this one, some clustered prototypes are
# the nearest for none, and they never move again: about a quarter of the tracked bank (the
# flat lines of the figure) is stranded at values that describe features which no longer
# exist. They still count in the class averages above, which is why those stay well below 1.
# The run itself did not strand any: its features turned over 400 steps, each step a little,
# and every prototype was chosen, and so moved, along the way. How long its prototypes stay
# alive over the rest of the run is not measured here.
#
# The same rule on purpose: one more update, with the tracked bank's last batch, in which
# the pixels of the digit 3 (class index 4) are marked "ignore". Every prototype of that
# class stays exactly as it was while the others move.

# %%
bank = copy.deepcopy(tr.tracked)  # the record stays as it was
f, y = tr.last_batch
before_one = bank.prototypes.clone()
y_no3 = torch.where(y == 4, torch.full_like(y, 255), y)
bank.ema_update(f, y_no3)
still = (bank.prototypes == before_one).all(dim=2)
print(
    "digit-3 pixels in the batch:",
    int((y == 4).sum()),
    "| class '3' untouched:",
    bool(still[4].all()),
)
print(
    "background prototypes moved:",
    int((~still[0]).sum()),
    "of",
    int(bank.valid[0].sum()),
)
assert bool((y == 4).any()) and bool(still[4].all())
assert bool((~still[0] & bank.valid[0]).any())

# %% [markdown]
# ## What the tracking buys
#
# Does the prototype classifier of chapter 7 (nearest prototype by cosine) classify the late
# model's features better with the tracked bank than with the stale one? Pixel accuracy and
# mean class accuracy (the accuracy of each class, averaged over the classes) on the same 200
# val scenes. The claims below use the mean class accuracy: most pixels are background, so a
# bank that calls nearly everything background scores well on pixels while getting the
# digits wrong.

# %%
names = {
    "stale early": "stale bank, early features",
    "stale late": "stale bank, late features",
    "control late": "control bank, late features",
    "tracked late": "tracked bank, late features",
    "run late": "run's bank, late features",
}
for key, name in names.items():
    a = tr.acc[key]
    print(
        f"{name:>28}: pixel {100 * a.pixel:.1f} %, "
        f"mean class {100 * a.mean_class:.1f} %"
    )

# %% [markdown]
# ## Fit to the features each bank saw
#
# The class mean is a convenient target but not the one the EMA converges to. A class with
# several prototypes splits its features into cells (each feature belongs to its nearest
# own-class prototype), and at the EMA's fixed point every prototype equals the mean of its
# cell. So a direct measure of how well a bank fits a set of features is the cosine of each
# prototype to the mean of its own cell in that set (averaged over the prototypes whose cell
# is not empty). If the tracked bank follows the late model, it should fit the late features
# better than the stale and the control bank do, and those two, which never saw a late
# feature, should fit the early features better than the late ones.

# %%
show_source(cell_fit)

# %%
for name in ("stale", "control", "tracked", "run"):
    print(
        f"{name:>8} bank: fit to early features {tr.fit[name, 'early']:.4f},"
        f" to late {tr.fit[name, 'late']:.4f}"
    )

# %% [markdown]
# The claims of this chapter, measured above on the committed run:
#
# * between the clustering (step 600) and step 1000 the representation turns by about a
#   right angle in every class (asserted: more than 60°), because the prototype loss starts
#   training the representation head; a bank left as clustered is then about orthogonal to
#   the features and classifies them worse (mean class accuracy) than it classified the
#   features it was made from;
# * fed the late models' stream, the bank follows: closer to the late class means in most
#   classes (here in every one), on average by far more than the control bank moves, and its
#   prototype classifier gets a higher mean class accuracy on the late features than the
#   stale bank (every bank's stays low at this point of the run: the digits' features are
#   still poorly separated, chapter 7);
# * a prototype that receives no feature does not move (asserted bit for bit), and after a
#   jump this large some never receive one; the run, which took the same turn in 400 small
#   steps, moved all of its prototypes;
# * the tracked bank fits the late features better than the stale and the control bank do,
#   and those two fit the early features better than the late ones.
#
# `brpg.book.demo_ema.claims` measures each of them on the record:

# %%
print(
    f"mean cos to the late class means:\n  clustered {tr.mean_cos('stale'):.3f}, "
    f"control {tr.mean_cos('control'):.3f}, tracked {tr.mean_cos('tracked'):.3f}, "
    f"the run's bank {tr.mean_cos('run'):.3f}"
)
measured = claims(tr)
for claim, holds in measured.items():
    print(f"{'holds' if holds else 'FAILS'}: {claim}")
assert all(measured.values())

# %% [markdown]
# ## On every seed with saved states
#
# One run's turn, one run's stranded prototypes: another seed could differ. The same
# experiment and the same claims on every committed BRPG run at 1/16 whose states at steps
# 600 (with teacher and memories) and 1000 are saved beside it:

# %%
study_dir = PROJECT_ROOT / "results" / "digits_v3" / "study" / early.cfg.name
seeds = EverySeed(
    study_dir, {early.step: ("teacher", "memory"), late.step: ("bank",)}
)
fit_banks = ("stale", "control", "tracked")
for seed, (s_early, s_late) in seeds:
    same_run = s_early.cfg.train.seed == early.cfg.train.seed
    if same_run:
        t = tr
    else:
        t = track(s_early, s_late, n_updates=300, every=5, n_val=200, seed=0)
    m = claims(t)
    stranded = int((t.stale.valid & (t.hits == 0)).sum())
    closer = (t.class_cos("tracked") > t.class_cos("stale")).tolist()
    behind = [DIGIT_CLASSES[c] for c, ok in enumerate(closer) if not ok]
    fits = ", ".join(
        f"{b} {t.fit[b, 'early']:.2f} / {t.fit[b, 'late']:.2f}" for b in fit_banks
    )
    print(
        f"{seed}: class means turned "
        f"{t.turn.min():.0f}-{t.turn.max():.0f} degrees\n"
        f"  mean cos to the late class means: clustered {t.mean_cos('stale'):.3f},"
        f" tracked {t.mean_cos('tracked'):.3f},"
        f" run's bank {t.mean_cos('run'):.3f}\n"
        f"  tracked closer in {sum(closer)} of {len(closer)} classes"
        f" (not: {', '.join(behind) or 'none'}); stranded {stranded} of"
        f" {int(t.stale.valid.sum())}\n"
        "  stale bank, early -> late features: mean class"
        f" {100 * t.acc['stale early'].mean_class:.1f} ->"
        f" {100 * t.acc['stale late'].mean_class:.1f} %, pixel"
        f" {100 * t.acc['stale early'].pixel:.1f} ->"
        f" {100 * t.acc['stale late'].pixel:.1f} %"
        f"\n  tracked bank, late features: mean class"
        f" {100 * t.acc['tracked late'].mean_class:.1f} %,"
        f" pixel {100 * t.acc['tracked late'].pixel:.1f} %"
        f"\n  fit (early / late): {fits}"
        f"\n  claims holding: {sum(m.values())} of {len(m)}"
    )
    for claim, holds in m.items():
        if not holds:
            print(f"    FAILS: {claim}")
    assert all(m.values()), (seed, m)
print(seeds.report())
assert "seed0" in seeds.checked
print(f"chapter ran in {time.perf_counter() - t_chapter:.0f} s")

# %% [markdown]
# What more seeds changed: the tracked bank following the late features in *every* class was
# a property of seed 0 only; on seed 1 two classes end further from their late class means
# than the clustering was (the lines above name them), so the claim is "most classes". Seed
# 2 flipped two claims as they were first written, in pixel accuracy: there the stale bank
# labels the late features nearly all background (95 % of the background pixels right,
# almost no digit pixel), which gives it a *higher* pixel accuracy on the late features
# (79 %) than on the early ones (39 %) and left the tracked bank less than 2 points ahead of
# it.
# In mean class accuracy, which weighs every class the same, the stale bank gets worse and
# the tracked bank better than it on every seed, so the claims are now stated in that
# measure; the lines above print both measures per seed (accuracy of the stale bank on the
# early and the late features, of the tracked bank on the late ones). How many prototypes
# the jump strands varies as much from seed to seed (the lines above); that some are
# stranded, and the other claims, held on every seed checked.
#
# Seed 3 flipped one more claim as first written: "the tracked bank fits the late features
# better than the early ones". On seeds 0 to 2 it does; on seed 3 it fits the early
# features a little better (0.66 against 0.61, the lines above), because its prototypes
# that received few or no late features still sit where the clustering put them and make
# close cells for the early features. What holds on every seed is the comparison across
# banks, which is what tracking is for: on the late features the tracked bank fits far
# better than the stale and the control bank (cosine 0.6 or more against 0.05 or less, on
# every seed), and those two fit the early features better than the late ones. The claim is
# now stated that way.

# %% [markdown]
# ## Exercises
#
# Predict the answer first; each solution is hidden under its cell and checks itself.
#
# 1. **How fast does a prototype follow its class?** Suppose every step brings features whose
#    mean is a fixed point $m$. With $\alpha = 0.99$, after how many EMA steps has a prototype
#    covered half of the way from where it started to $m$?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution: after n steps the distance left is alpha^n of the start, so
# 0.99^n = 1/2 gives n = ln 2 / -ln 0.99 = 69 steps; on PASCAL VOC (638 steps an
# epoch) that is a tenth of an epoch. Checked with the package's PrototypeBank (one
# class, one prototype, a fixed mean):
bank1 = PrototypeBank(1, 2, 1, momentum=0.99)
bank1.set_prototypes(
    torch.tensor([[[1.0, 0.0]]]), torch.ones(1, 1, dtype=torch.bool)
)
# the features of every step (cosine-nearest: the only slot)
m = torch.tensor([[1.0, 2.0]])
left = []
for _ in range(100):
    bank1.ema_update(m, torch.zeros(1, dtype=torch.long))
    # the start was 2 away
    left.append(float((bank1.prototypes[0, 0] - m[0]).norm() / 2.0))
half = next(i + 1 for i, x in enumerate(left) if x <= 0.5)
print(
    f"half of the way after {half} steps "
    f"(ln 2 / -ln 0.99 = {np.log(2) / -np.log(0.99):.1f})"
)
assert half == 69

# %% [markdown]
# 2. **A tie.** A feature lies exactly between two prototypes of its class (the same cosine to
#    both). Which one moves?

# %% mystnb={"code_prompt_hide": "Hide the solution", "code_prompt_show": "Show the solution"} tags=["hide-cell"]
# Solution: the first one only. Each feature goes to one prototype, the nearest by
# cosine, and a tie goes to the lower slot (as in the official argmax); the other
# slot keeps its value.
bank2 = PrototypeBank(1, 2, 2, momentum=0.5)
start2 = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
bank2.set_prototypes(start2.clone(), torch.ones(1, 2, dtype=torch.bool))
bank2.ema_update(torch.tensor([[1.0, 1.0]]), torch.zeros(1, dtype=torch.long))
moved = (bank2.prototypes[0] != start2[0]).any(1).tolist()
print(
    f"slot 0 -> {bank2.prototypes[0, 0].tolist()}, "
    f"slot 1 -> {bank2.prototypes[0, 1].tolist()}"
)
assert moved == [True, False]
assert torch.allclose(bank2.prototypes[0, 0], torch.tensor([1.0, 0.5]))

# %% [markdown]
# ## Summary
#
# * After every step each prototype that received features of its own class moves 1 % of the
#   way towards their mean; a prototype that received none does not move at all (asserted
#   bit for bit).
# * In the committed BRPG run the representation turns by about a right angle in the 400
#   steps after the clustering, as the prototype loss starts training the representation
#   head: the clustered prototypes are then about orthogonal to the features. Fed what a
#   step feeds it, the bank follows the turn (closer to the late class means in most
#   classes, on every seed with saved states: asserted), and so did the bank the run itself fed.
# * After a jump that large, some prototypes are chosen by no feature and stay where they
#   were; the run, which turned in small steps, moved every one of its prototypes.
# * A control bank fed the early model's stream does not follow: the tracking comes from
#   the features the bank sees, not from the EMA alone.
#
# ```{admonition} What we could not check here
# :class: note
# Whether the run's prototypes stay alive (chosen, and so moved) over the rest of its 8,000
# steps, and over the tens of thousands of a paper-scale run: this chapter looks at 400 steps
# after the clustering of the committed seeds. The unlabeled features here come from the plain scenes,
# not the strongly augmented, mixed view a real step reads. Averaging the EMA sums and counts over several GPUs (our fix of the
# official per-GPU drift) changes anything only with several processes, and its effect on
# accuracy has not been measured.
# ```
