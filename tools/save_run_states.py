"""Write the states the method chapters read beside committed BRPG study runs.

For each committed run folder given, re-run it with its own config to each step (the
clustering step, 600, and 1000 by default; a later step goes on from the earlier replay),
check that the re-run logged exactly what the committed run logged, and write
``state_at_step<N>.pt`` (:func:`brpg.book.demo.save_run_state`). A re-run that differs (another
kind of CPU, another thread count) is refused, not written. Chapters 2 to 7 check their claims
on every seed that has these files.

    python tools/save_run_states.py results/digits_v3/study/digits_brpg_1_16/seed2 [...]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from brpg.book import demo


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", type=Path, help="committed run folders (…/seed<k>)")
    ap.add_argument("--steps", nargs="+", type=int, default=[600, 1000])
    ap.add_argument("--run-root", default="runs/book", help="where the replays checkpoint")
    args = ap.parse_args(argv)
    for run_dir in args.runs:
        for step in sorted(args.steps):
            t0 = time.perf_counter()
            state = demo.run_state(run_dir, step, run_root=args.run_root, replay=True)
            path = demo.save_run_state(state, run_dir)  # refuses a replay that drifted
            print(f"{path}: exact re-run to step {step} in {time.perf_counter() - t0:.0f} s",
                  flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
