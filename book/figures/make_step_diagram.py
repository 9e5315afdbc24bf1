"""Draw one BRPG training step and the timeline of its phases: book/figures/brpg_step.svg.

Run once after changing it (it needs only matplotlib, not brpg):

    python book/figures/make_step_diagram.py

The phase names are those of ``brpg.timeline.PHASES`` (warmup, semi, sampling, proto). The
step counts are those of the DigitScenes BRPG presets (brpg/configs/_digits_base.yaml,
_digits_semi.yaml): train.steps = 2000, semi.sup_only_steps = 500, proto.sample_start_step =
500, proto.sample_steps = 100, so the clustering runs before step 600. The official VOC line
is the preset voc_brpg_classic_366 (638 steps per epoch, 80 epochs). Update the constants
below if those presets change.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Rectangle  # noqa: E402

OUT = Path(__file__).with_name("brpg_step.svg")

# DigitScenes BRPG presets (see the module docstring)
TOTAL, WARMUP_END, SAMPLE_START, SAMPLE_STEPS = 2000, 500, 500, 100
CLUSTER_AT = SAMPLE_START + SAMPLE_STEPS

# one colour per phase in which a box starts to act
C_WARM = "#dbe8f6"  # warm-up: supervised only (and from then on)
C_SEMI = "#dff0d8"  # semi: the mean teacher
C_SAMP = "#fde6c8"  # sampling window: CPG memories
C_PROTO = "#e8dcf3"  # proto: clustering, prototype bank, L_pro, EMA
EDGE = {C_WARM: "#3d6fa8", C_SEMI: "#4a8a3a", C_SAMP: "#c07a1c", C_PROTO: "#7a4ea3"}


def box(ax, x, y, w, h, text, color, size=10.5, bold_first=True):
    ax.add_patch(
        FancyBboxPatch(
            (x, y),
            w,
            h,
            boxstyle="round,pad=0.25,rounding_size=0.8",
            linewidth=1.2,
            edgecolor=EDGE[color],
            facecolor=color,
        )
    )
    lines = text.split("\n")
    cx, cy = x + w / 2, y + h / 2
    if bold_first and len(lines) > 1:
        n = len(lines) - 1  # detail lines under the bold title
        title_h, line_h, gap = size / 6.0, (size - 1) * 1.25 / 6.0, 0.4  # axis units (1 = 6 pt)
        total = title_h + gap + n * line_h
        ax.text(cx, cy + total / 2 - title_h / 2, lines[0], ha="center", va="center",
                fontsize=size, fontweight="bold")  # fmt: skip
        ax.text(cx, cy - total / 2 + n * line_h / 2, "\n".join(lines[1:]), ha="center",
                va="center", fontsize=size - 1, linespacing=1.25)  # fmt: skip
    else:
        ax.text(cx, cy, text, ha="center", va="center", fontsize=size,
                fontweight="bold" if bold_first else "normal")  # fmt: skip
    return (x, y, w, h)


def arrow(ax, p, q, text=None, color="#333333", style="-|>", dashed=False, rad=0.0, tpos=0.5,
          toff=(0, 0.9), size=8.5):  # fmt: skip
    ax.add_patch(
        FancyArrowPatch(
            p,
            q,
            arrowstyle=style,
            mutation_scale=11,
            color=color,
            linewidth=1.1,
            linestyle=(0, (4, 3)) if dashed else "-",
            connectionstyle=f"arc3,rad={rad}",
        )
    )
    if text:
        mx = p[0] + (q[0] - p[0]) * tpos + toff[0]
        my = p[1] + (q[1] - p[1]) * tpos + toff[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=size, color=color,
                style="italic")  # fmt: skip


def right(b, dy=0.0):
    x, y, w, h = b
    return (x + w + 0.3, y + h / 2 + dy)


def left(b, dy=0.0):
    x, y, w, h = b
    return (x - 0.3, y + h / 2 + dy)


def top(b, dx=0.0):
    x, y, w, h = b
    return (x + w / 2 + dx, y + h + 0.3)


def bottom(b, dx=0.0):
    x, y, w, h = b
    return (x + w / 2 + dx, y - 0.3)


def main() -> None:
    plt.rcParams.update({"svg.fonttype": "none", "svg.hashsalt": "brpg-step",
                         "font.family": "DejaVu Sans"})  # fmt: skip
    fig = plt.figure(figsize=(11.5, 7.9))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 140)
    ax.set_ylim(-3, 92)
    ax.axis("off")

    ax.text(2, 89.5, "One BRPG training step (after the warm-up)", fontsize=13, fontweight="bold",
            va="center")  # fmt: skip
    ax.text(2, 86.6, "box colour = the phase from which the box acts (see the timeline); "
            "dashed arrows: no gradient", fontsize=8.5, va="center", color="#555555")  # fmt: skip

    # ---- inputs and the mean teacher -------------------------------------------------------
    unl = box(ax, 2, 71, 15, 8, "unlabeled\nimages", C_SEMI)
    weak = box(ax, 22, 73.5, 15, 7, "weak view\nx_w", C_SEMI)
    strong = box(ax, 22, 61, 15, 8, "strong view\ncolour, blur\n+ CutMix",
                 C_SEMI)  # fmt: skip
    teacher = box(ax, 43, 73.5, 16, 7, "teacher\neval mode", C_SEMI)
    pseudo = box(ax, 65, 72.5, 20, 9, "pseudo-labels ŷ\nconfidence c\n(same CutMix)", C_SEMI)  # fmt: skip
    lab = box(ax, 2, 46, 15, 8, "labeled\nimages x_l, y", C_WARM)
    student = box(ax, 43, 49, 16, 14, "student\none forward\non both", C_WARM)  # fmt: skip

    arrow(ax, right(unl), left(weak))
    arrow(ax, bottom(weak), top(strong))
    arrow(ax, right(weak), left(teacher), dashed=True)
    arrow(ax, right(teacher), left(pseudo, 1.0), dashed=True)
    arrow(ax, right(strong), left(student, 4.0))
    arrow(ax, right(lab), left(student, -4.0))

    # ---- losses ---------------------------------------------------------------------------
    ls = box(ax, 65, 57.5, 20, 7.5, "L_s\nCE + OHEM", C_WARM)
    lu = box(ax, 65, 47, 20, 8.5, "L_u\nCE to ŷ,\nentropy filter", C_SEMI)
    arrow(ax, right(student, 3.5), left(ls), "logits", tpos=0.45)
    arrow(ax, right(student, -1.0), left(lu, 0.5))
    arrow(ax, bottom(pseudo, 6.0), top(lu, 6.0), dashed=True)

    total = box(ax, 92, 55, 22, 10, "L_s + L_u + L_pro\nbackward,\noptimiser step", C_WARM)  # fmt: skip
    temas = box(ax, 119, 71, 19, 10, "teacher EMA\nθ_t ← d θ_t\n+ (1 − d) θ_s", C_SEMI)  # fmt: skip
    arrow(ax, right(ls), left(total, 2.5))
    arrow(ax, right(lu), left(total, -2.0))
    arrow(ax, (total[0] + total[2] - 3, total[1] + total[3] + 0.3), bottom(temas, -4.0))
    arrow(ax, top(temas), (teacher[0] + teacher[2] / 2, teacher[1] + teacher[3] + 0.3),
          "after each step", dashed=True, rad=0.18, tpos=0.5, toff=(0, 4.2))  # fmt: skip

    # ---- prototype branch -----------------------------------------------------------------
    rep = box(ax, 43, 33, 16, 8, "features f\nstride 4", C_SAMP)
    arrow(ax, bottom(student), top(rep))

    cpg = box(ax, 2, 14, 28, 14, "CPG routing\nlabeled, correct:\nc ≥ 0.8 → high, else low\nunlabeled: c ≥ 0.8 → high", C_SAMP)  # fmt: skip
    mem = box(ax, 35, 15, 19, 12, "memories\nhigh + low\nper class", C_SAMP)  # fmt: skip
    clus = box(ax, 59, 15, 19, 12, "clustering\nonce: APO\n+ k-means", C_PROTO)  # fmt: skip
    bank = box(ax, 83, 15, 17, 12, "prototype\nbank\n4–6 per class",
               C_PROTO)  # fmt: skip
    lpro = box(ax, 106, 30, 24, 12, "L_pro\nCE of max_k cos(f, r_c,k)/τ\nlabeled grid (y), confident\nunlabeled pixels (ŷ)", C_PROTO)  # fmt: skip
    ema = box(ax, 106, 12, 24, 10, "prototype EMA\nr ← 0.99 r + 0.01 f̄", C_PROTO)  # fmt: skip

    arrow(ax, left(rep), (cpg[0] + cpg[2] - 2, cpg[1] + cpg[3] + 0.3), "labeled (student)",
          dashed=True, rad=0.25, tpos=0.4, toff=(1.5, 1.2))  # fmt: skip
    arrow(ax, (teacher[0] + 1.0, teacher[1] - 0.3), (cpg[0] + 18, cpg[1] + cpg[3] + 0.3),
          "unlabeled (teacher)", dashed=True, tpos=0.62, toff=(-4.5, 0))  # fmt: skip
    arrow(ax, right(cpg), left(mem), dashed=True)
    arrow(ax, right(mem), left(clus), dashed=True)
    arrow(ax, right(clus), left(bank), dashed=True)
    arrow(ax, right(rep), left(lpro, 1.0), "features f", tpos=0.5)
    arrow(ax, (bank[0] + bank[2] + 0.3, bank[1] + bank[3] - 2), left(lpro, -3.0),
          "prototypes (no gradient)", dashed=True, tpos=0.5, toff=(-5, 2.5))  # fmt: skip
    arrow(ax, bottom(lpro), top(ema), "same features", dashed=True, tpos=0.5, toff=(5.5, -0.6))
    arrow(ax, left(ema), (bank[0] + bank[2] + 0.3, bank[1] + 3), dashed=True)
    arrow(ax, top(lpro, 6.0), bottom(total, 6.0))

    # ---- timeline -------------------------------------------------------------------------
    x0, x1, ty, th = 4.0, 136.0, 3.2, 3.0

    def sx(step: float) -> float:
        return x0 + (x1 - x0) * step / TOTAL

    ax.text(2, 11.6, "Timeline (DigitScenes BRPG presets, to scale):", fontsize=10, fontweight="bold",
            va="center")  # fmt: skip
    phases = [
        (0, WARMUP_END, C_WARM, "warmup: L_s only"),
        (SAMPLE_START, CLUSTER_AT, C_SAMP, ""),
        (CLUSTER_AT, TOTAL, C_PROTO, "proto: L_s + L_u + L_pro, prototype EMA"),
    ]
    for a, b, c, label in phases:
        ax.add_patch(Rectangle((sx(a), ty), sx(b) - sx(a), th, facecolor=c, edgecolor=EDGE[c]))
        ax.text((sx(a) + sx(b)) / 2, ty + th / 2, label, ha="center", va="center", fontsize=9)
    for s in (0, WARMUP_END, CLUSTER_AT, TOTAL):
        ax.text(sx(s), ty - 0.6, f"{s:,}", ha="center", va="top", fontsize=8.5)
    ax.annotate("clustering\n(APO + k-means)", xy=(sx(CLUSTER_AT), ty + th), xytext=(sx(CLUSTER_AT) + 5, 8.6),
                fontsize=8.5, ha="left", va="center", color=EDGE[C_PROTO],
                arrowprops={"arrowstyle": "-|>", "color": EDGE[C_PROTO], "lw": 1})  # fmt: skip
    ax.text(sx(SAMPLE_START) + 2.5, ty + th + 1.3, "sampling", fontsize=8.5, ha="center",
            va="bottom", color=EDGE[C_SAMP])  # fmt: skip
    ax.text(2, 0.3, "semi.sup_only_steps = proto.sample_start_step = 500 (so the semi phase is empty), "
            "proto.sample_steps = 100, train.steps = 2,000", fontsize=8.5, va="center",
            color="#555555")  # fmt: skip
    ax.text(2, -2.0, "Official VOC, 366 labels, 4 GPUs (638 steps per epoch): warmup epoch 0, sampling "
            "epoch 1, clustering at step 1,276, proto to step 51,040", fontsize=8.5, va="center",
            color="#555555")  # fmt: skip

    fig.savefig(OUT, format="svg", metadata={"Date": None})
    plt.close(fig)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
