#!/usr/bin/env python
"""Fetch and verify the BRPG split lists; run with --help for the options (see README.md)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from brpg.prepare.cli import run_cli  # noqa: E402
from brpg.prepare.splits import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
