"""``brpg results``: the cells' ``summary.json`` files as tables beside the paper's numbers.

Reads every ``summary.json`` written by :meth:`brpg.reproduce.experiment.Experiment.finish`
under a folder (``runs/reproduce`` or the committed ``results/reproduce``) and writes, per
profile, ``results_<profile>.md``, ``results_<profile>.html`` and ``results_<profile>.png``.
Each row is one cell: the paper's mIoU, ours (mean over the runs found, with their count), the
difference, the best validation mIoU during training, our mBIoU (Boundary IoU, Cheng et al.,
CVPR 2021; "—" for summaries written before it was computed; the paper reports none), the
protocol, the hardware and the hours.

Profiles are never mixed: smoke results (8-step pipeline checks on miniature data) go to their
own files under a banner, and their difference to the paper is not computed.
"""

from __future__ import annotations

import argparse
import html
import json
import statistics
from pathlib import Path
from typing import Any

from brpg.reproduce.cells import TABLES, all_cells
from brpg.reproduce.profiles import PROFILES

SMOKE_BANNER = (
    "SMOKE profile: 8-step pipeline checks on miniature fixture data with a tiny model."
    " These numbers check that the code runs end to end; they are not results and are not"
    " comparable with the paper."
)
COLUMNS = (
    "table",
    "method",
    "cell",
    "labeled",
    "paper",
    "ours",
    "delta",
    "best during training",
    "ours mBIoU",
    "runs",
    "protocol",
    "hardware",
    "hours",
    "steps",
)


def load_summaries(root: str | Path) -> list[dict[str, Any]]:
    """Every cell summary under ``root`` (files that carry ``profile`` and ``table``)."""
    out = []
    for path in sorted(Path(root).rglob("summary.json")):
        try:
            s = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(s, dict) and "profile" in s and "table" in s and "val_miou" in s:
            s["_path"] = str(path)
            out.append(s)
    return out


def _protocol(s: dict[str, Any]) -> str:
    p = s.get("protocol") or {}
    name = p.get("protocol", s.get("eval_protocol", "?"))
    if name == "sliding":
        return f"sliding {p.get('crop_size')}/{p.get('stride')}"
    if name == "center_crop":
        return f"center crop {p.get('crop_size')}"
    return str(name)


def _hardware(s: dict[str, Any]) -> str:
    gpu = s.get("gpu") or {}
    if gpu.get("count"):
        return f"{gpu['count']}x {gpu.get('type') or 'GPU'}"
    machine = s.get("machine") or {}
    return f"CPU ({machine.get('cpu_count', '?')} cores)"


def rows(summaries: list[dict[str, Any]], profile: str) -> list[dict[str, Any]]:
    """One row per (table, method, cell) of ``profile``, in the paper's order."""
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for s in summaries:
        if s["profile"] != profile:
            continue
        groups.setdefault((s["table"], s["method"], s["cell"]), []).append(s)
    out = []
    for c in all_cells():
        runs = groups.pop((c.table, c.method, c.cell), [])
        if not runs:
            continue
        mious = [float(r["val_miou"]) for r in runs]
        ours = statistics.fmean(mious)
        mbious = [float(r["val_mbiou"]) for r in runs if r.get("val_mbiou") is not None]
        out.append(
            {
                "table": c.table,
                "method": c.method,
                "cell": c.cell,
                "labeled": c.n_sup,
                "paper": c.paper,
                "ours": ours,
                "ours_std": statistics.stdev(mious) if len(mious) > 1 else 0.0,
                "delta": (ours - c.paper) if (c.paper is not None and profile == "full") else None,
                "best": max(float(r.get("best_val_miou", r["val_miou"])) for r in runs),
                # mean over the runs that have it; None when none has (older summaries)
                "mbiou": statistics.fmean(mbious) if mbious else None,
                "mbiou_std": statistics.stdev(mbious) if len(mbious) > 1 else 0.0,
                "mbiou_runs": len(mbious),
                "runs": len(runs),
                "protocol": _protocol(runs[0]),
                "hardware": ", ".join(sorted({_hardware(r) for r in runs})),
                "hours": statistics.fmean(float(r.get("hours", r["wall_s"] / 3600)) for r in runs),
                "steps": runs[0]["steps"],
            }
        )
    return out


def _cells(r: dict[str, Any]) -> list[str]:
    def num(v: float | None, signed: bool = False) -> str:
        if v is None:
            return "—"
        return f"{v:+.2f}" if signed else f"{v:.2f}"

    ours = num(r["ours"]) + (f" ± {r['ours_std']:.2f}" if r["runs"] > 1 else "")
    mbiou = num(r.get("mbiou"))
    if r.get("mbiou") is not None and r["mbiou_runs"] > 1:
        mbiou += f" ± {r['mbiou_std']:.2f}"
    if r.get("mbiou") is not None and r["mbiou_runs"] != r["runs"]:
        mbiou += f" ({r['mbiou_runs']} of {r['runs']} runs)"
    return [
        r["table"],
        "BRPG" if r["method"] == "brpg" else "SupOnly",
        r["cell"],
        str(r["labeled"]),
        num(r["paper"]),
        ours,
        num(r["delta"], signed=True),
        num(r["best"]),
        mbiou,
        str(r["runs"]),
        r["protocol"],
        r["hardware"],
        f"{r['hours']:.2f}",
        str(r["steps"]),
    ]


def to_markdown(table_rows: list[dict[str, Any]], profile: str) -> str:
    head = f"## Reproduction results: {profile} profile\n\n"
    if profile == "smoke":
        head += f"> **{SMOKE_BANNER}**\n\n"
    if not table_rows:
        return head + f"No {profile}-profile cell has been run yet.\n"
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in table_rows]
    note = (
        "mIoU and mBIoU (Boundary IoU, d = 2 % of the image diagonal) in %;"
        " an mBIoU of — was not recorded by that run.\n\n"
    )
    return head + note + "\n".join(lines) + "\n"


def to_html(table_rows: list[dict[str, Any]], profile: str) -> str:
    title = f"Reproduction results: {profile} profile"
    parts = [f"<!doctype html><meta charset='utf-8'><title>{title}</title><h2>{title}</h2>"]
    if profile == "smoke":
        parts.append(f"<p><strong>{html.escape(SMOKE_BANNER)}</strong></p>")
    if not table_rows:
        parts.append(f"<p>No {profile}-profile cell has been run yet.</p>")
        return "\n".join(parts) + "\n"
    parts.append("<table border='1' cellspacing='0' cellpadding='3'><tr>")
    parts.append("".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS) + "</tr>")
    for r in table_rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in _cells(r)) + "</tr>")
    parts.append("</table>")
    return "\n".join(parts) + "\n"


def plot(table_rows: list[dict[str, Any]], profile: str, out: Path) -> Path | None:
    """Paper vs ours per cell, one panel per table; None when there is nothing to plot."""
    if not table_rows:
        return None
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    tables = [t for t in TABLES if any(r["table"] == t for r in table_rows)]
    fig, axes = plt.subplots(1, len(tables), figsize=(4.2 * len(tables), 3.4), squeeze=False)
    for ax, name in zip(axes[0], tables, strict=True):
        t = TABLES[name]
        for method, marker in (("suponly", "s"), ("brpg", "o")):
            sel = {r["cell"]: r for r in table_rows if r["table"] == name and r["method"] == method}
            xs = [i for i, c in enumerate(t.cells) if c in sel]
            label = "BRPG" if method == "brpg" else "SupOnly"
            if xs:
                ax.plot(
                    xs, [sel[t.cells[i]]["ours"] for i in xs], marker + "-", label=f"{label}, ours"
                )
            if profile == "full":
                paper = [(i, v) for i, c in enumerate(t.cells) if (v := _paper(name, method, c))]
                if paper:
                    ax.plot(
                        *zip(*paper, strict=True), marker + "--", alpha=0.5, label=f"{label}, paper"
                    )
        ax.set_xticks(range(len(t.cells)), t.column_names, rotation=30, fontsize=7)
        ax.set_title(t.title, fontsize=9)
        ax.set_ylabel("mIoU (%)")
        ax.legend(fontsize=7)
    if profile == "smoke":
        fig.suptitle("SMOKE profile: pipeline checks, not results", color="crimson")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _paper(table: str, method: str, cell: str) -> float | None:
    from brpg.reproduce.paper import paper_miou

    return paper_miou(table, method, cell)


def build_report(root: str | Path, out: str | Path | None = None) -> dict[str, dict[str, Any]]:
    """Write the tables and plots of every profile found under ``root`` (into ``out``, default
    ``root``); returns ``{profile: {"rows": ..., "markdown": ..., "files": [...]}}``."""
    summaries = load_summaries(root)
    out_dir = Path(out) if out else Path(root)
    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, dict[str, Any]] = {}
    for profile in PROFILES:
        if not any(s["profile"] == profile for s in summaries) and profile != "full":
            continue
        table_rows = rows(summaries, profile)
        md = to_markdown(table_rows, profile)
        files = [out_dir / f"results_{profile}.md", out_dir / f"results_{profile}.html"]
        files[0].write_text(md)
        files[1].write_text(to_html(table_rows, profile))
        png = plot(table_rows, profile, out_dir / f"results_{profile}.png")
        if png:
            files.append(png)
        report[profile] = {"rows": table_rows, "markdown": md, "files": files}
    return report


def run_evidence(folder: str | Path) -> list[list[str]]:
    """What a finished cell's run shows beyond its mIoU, as ``[what, measured]`` rows: steps run,
    the first step of each loss term, prototypes formed (and how many classes have high, low and
    both kinds), the protocol, the mIoU as a by-product.

    For a smoke cell these are the result (its mIoU means nothing); ``folder`` holds the cell's
    ``summary.json`` and ``run/log.jsonl``.
    """
    folder = Path(folder)
    summary = json.loads((folder / "summary.json").read_text())
    log = [json.loads(ln) for ln in (folder / "run" / "log.jsonl").read_text().splitlines()]
    steps = summary["config"]["train"]["steps"]
    terms = [k for k in ("loss_sup", "loss_unsup", "loss_proto") if any(k in r for r in log)]
    first = {k: min(r["step"] for r in log if k in r) for k in terms}
    events = [r for r in log if r.get("event") == "prototypes_per_class"]
    protos = events[-1]["prototypes_per_class"] if events else []
    kinds = [r["prototypes_high_low"] for r in log if r.get("event") == "prototypes_high_low"]
    if kinds:  # a class may get high prototypes only, or low only (an empty memory)
        hl = kinds[-1]
        by_kind = (
            f"{sum(h > 0 for h, _ in hl)} / {sum(lo > 0 for _, lo in hl)} /"
            f" {sum(h > 0 and lo > 0 for h, lo in hl)}"
        )
    else:  # no BRPG, or a run logged before the split was recorded
        by_kind = "—"
    proto = summary.get("protocol") or {}
    return [
        ["steps run", f"{summary['steps']} of {steps}"],
        ["loss terms computed", ", ".join(f"{k} from step {v}" for k, v in first.items())],
        [
            "prototypes formed",
            f"{sum(protos)} in {sum(n > 0 for n in protos)} classes" if events else "— (no BRPG)",
        ],
        ["classes with high / low / both kinds of prototype", by_kind],
        [
            "evaluation protocol",
            f"{proto.get('protocol', '?')} {proto.get('crop_size', '')}".strip(),
        ],
        ["val mIoU (a by-product for a smoke run, not a result)", f"{summary['val_miou']:.2f} %"],
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="brpg results", description=__doc__)
    p.add_argument("--root", default="runs/reproduce", help="folder searched for summary.json")
    p.add_argument("--out", help="where the tables and plots go (default: --root)")
    args = p.parse_args(argv)
    report = build_report(args.root, args.out)
    for r in report.values():
        print(r["markdown"])
        print("wrote " + ", ".join(str(f) for f in r["files"]) + "\n")
    return 0
