"""The command-line options every preparation script shares and the wrapper that prints a
:class:`~brpg.prepare.base.PrepareError` without a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from brpg.prepare.base import PrepareError, default_workers


def add_common_arguments(
    parser: argparse.ArgumentParser,
    *,
    download: bool = True,
    skip_checksum_help: str = "do not verify the archives' MD5",
) -> None:
    """Add ``--data-root``, ``--archives``, ``--workers``, ``--force``, ``--no-progress``,
    ``--skip-checksum`` and (when the archives can be fetched by script) ``--download``."""
    parser.add_argument(
        "--data-root",
        type=Path,
        default=Path("data"),
        help="folder that receives the prepared data (default: ./data)",
    )
    parser.add_argument(
        "--archives",
        type=Path,
        default=None,
        help="folder holding the downloaded archives (default: DATA_ROOT/archives)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=default_workers(),
        help="parallel workers for extraction and conversion (default: %(default)s)",
    )
    parser.add_argument("--force", action="store_true", help="redo every step, even finished ones")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    if download:  # Cityscapes sits behind a login: its archives cannot be fetched by script
        parser.add_argument(
            "--download", action="store_true", help="download missing archives (resumable)"
        )
    parser.add_argument("--skip-checksum", action="store_true", help=skip_checksum_help)


def common_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of a ``prepare_*`` function that :func:`add_common_arguments`'s
    flags set (all but the two folders, which are positional)."""
    options = {
        "workers": args.workers,
        "progress": not args.no_progress,
        "force": args.force,
        "verify": not args.skip_checksum,
    }
    if hasattr(args, "download"):
        options["download"] = args.download
    return options


def run_cli(main: Callable[[list[str] | None], Any], argv: list[str] | None = None) -> int:
    """Run a preparation ``main``: log to stderr, print a :class:`PrepareError` without traceback.

    Returns the process exit status (0 on success, 2 on a :class:`PrepareError`, 130 on Ctrl-C).
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        main(argv)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    return 0
