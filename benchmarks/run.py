"""Command line of the benchmark suite: run benchmarks, print a table, write JSON.

Usage::

    python -m benchmarks                                # P1, P2, P3; full shapes
    python -m benchmarks --only p1,p3 --out results/benchmarks/cpu.json
    python -m benchmarks --quick                        # tiny shapes (tests)
    python benchmarks/run.py --list

Full runs write ``results/benchmarks/<device>.json`` unless ``--out`` says otherwise; quick
runs write JSON only with ``--out``.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repo root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = "brpg-benchmarks/1"
BENCHMARKS = {
    "p1": "benchmarks.p1_prototype_step",
    "p2": "benchmarks.p2_training_step",
    "p3": "benchmarks.p3_clustering",
    "p4": "benchmarks.p4_speed",
}


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma list, e.g. p1,p3")
    p.add_argument("--quick", action="store_true", help="tiny shapes, few repeats (for tests)")
    p.add_argument("--out", default=None, help="JSON output path")
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    p.add_argument("--device", default="cpu", help="device for our code (cpu, cuda, …)")
    p.add_argument("--repeats", type=int, default=None, help="override the repeat counts")
    p.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    return p.parse_args(argv)


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n / 2**20:.1f} MiB"


def _fmt_num(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1000 or abs(v) < 0.01:
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.4g}"
    return f"{v:.3g}" if abs(v) < 10 else f"{v:.1f}"


def format_result(name: str, res: dict[str, Any]) -> str:
    """The printed table of one benchmark result."""
    title = res.get("title", name)
    if res["status"] != "ok":
        return f"{title}\n  {res['status'].replace('_', ' ')}: {res['reason']}\n"
    lines = [title]
    meas = res["measurements"]
    lines.append(f"  {'variant':<20}{'median':>12}{'min':>12}  unit  repeats")
    for v, m in meas.items():
        lines.append(
            f"  {v:<20}{m['median']:>12.2f}{m['min']:>12.2f}  {m['unit']:<4}  {m['repeats']:>7}"
        )
    mem = res.get("memory")
    if mem:
        methods = list(mem["methods"])
        lines.append(
            f"  peak extra memory ({' | '.join(methods)}; primary {mem['primary_method']}):"
        )
        for v, by in mem["peak_extra_bytes"].items():
            vals = " | ".join(_fmt_bytes(by[m]) for m in methods)
            analytic = mem.get("analytic_largest_tensor_bytes", {}).get(v)
            extra = f"   (largest single tensor {_fmt_bytes(analytic)})" if analytic else ""
            lines.append(f"    {v:<18}{vals}{extra}")
    inertia = res.get("inertia")
    if inertia:
        lines.append("  total inertia (sum of squared distances to nearest centre, float64):")
        for v, val in inertia["total"].items():
            lines.append(f"    {v:<18}{val:.6g}")
        n_mem = len(next(iter(inertia["per_memory"].values())))
        lines.append(
            f"    ours <= sklearn on {inertia['memories_where_ours_le_sklearn']}/{n_mem} memories"
        )
    lines.append("  ratios:")
    for k, v in res["ratios"].items():
        lines.append(f"    {k:<44}{_fmt_num(v)}")
    lines.append("  targets:")
    for t in res["targets"].values():
        verdict = {True: "MET", False: "MISSED", None: "n/a"}[t["met"]]
        value = "n/a" if t["value"] is None else _fmt_num(t["value"])
        lines.append(f"    {verdict:<7}{t['what']} = {value}  (target {t['target']})")
    check = res.get("check")
    if check:
        items = ", ".join(
            f"{k}={_fmt_num(v) if isinstance(v, float) else v}" for k, v in check.items()
        )
        lines.append(f"  check: {items}")
    return "\n".join(lines) + "\n"


def list_benchmarks() -> list[tuple[str, str, str]]:
    """``(name, title, availability)`` of every benchmark."""
    rows = []
    for name, mod_name in BENCHMARKS.items():
        mod = importlib.import_module(mod_name)
        avail = "available" if getattr(mod, "AVAILABLE", True) else mod.REASON
        rows.append((name, mod.TITLE, avail))
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    if args.list:
        for name, title, avail in list_benchmarks():
            print(f"{name}  {title}: {avail}")
        return 0
    only = [s.strip().lower() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2

    import numpy as np
    import torch

    from benchmarks.common import BenchmarkUnavailable, env_threads, loadavg, write_json
    from brpg.engine.runtime import git_commit, machine_info

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = dict(machine_info(device))
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks", *(sys.argv[1:] if argv is None else argv)]),
        "quick": args.quick,
        "git_commit": git_commit(),
        "machine": info,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "threads": torch.get_num_threads(),
        "thread_env": env_threads(),
        "device": str(device),
        "loadavg_before": loadavg(),
        "benchmarks": {},
    }
    t_start = time.perf_counter()
    print(
        f"brpg benchmarks on {info['cpu_model']} ({info['cpu_count']} CPUs), torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads, device {device}, "
        f"load average {report['loadavg_before']}",
        flush=True,
    )
    for name in only:
        mod = importlib.import_module(BENCHMARKS[name])
        print(f"running {name}: {mod.TITLE} …", flush=True)
        t0 = time.perf_counter()
        load0 = loadavg()
        try:
            res = mod.run(quick=args.quick, device=device, repeats=args.repeats)
        except BenchmarkUnavailable as err:
            res = {"status": "not_available", "title": mod.TITLE, "reason": str(err)}
        res["wall_s"] = time.perf_counter() - t0
        res["loadavg_before"], res["loadavg_after"] = load0, loadavg()
        report["benchmarks"][name] = res
    report["loadavg_after"] = loadavg()
    report["wall_s"] = time.perf_counter() - t_start

    print()
    for name, res in report["benchmarks"].items():
        print(format_result(name, res))
    print(f"load average before {report['loadavg_before']}, after {report['loadavg_after']}")
    out = args.out
    if out is None and not args.quick:
        out = f"results/benchmarks/{device.type}.json"
    if out:
        path = write_json(out, report)
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
