"""What every preparation module shares: :class:`PrepareError` (the one exception the
scripts raise for bad input; its message names the file at fault and says how to fix it),
:class:`Archive` (an input archive and its known checksum), the ignore label, the state folder
and the default worker count. It imports nothing else of ``brpg``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Label value that every dataset uses for "ignore".
IGNORE_LABEL = 255

#: Folder (under the data root) holding markers, checksum caches and staging areas.
STATE_DIRNAME = ".prepare"


class PrepareError(RuntimeError):
    """Bad input for a preparation script; the message names the file and says how to fix it."""


@dataclass(frozen=True)
class Archive:
    """One input archive: its file name, where to get it and its known checksum.

    ``md5``/``sha1``/``sha256`` of ``None`` means no checksum could be sourced;
    ``checksum_source`` says where a known one comes from (or why there is none).
    """

    filename: str
    url: str | None = None
    md5: str | None = None
    sha256: str | None = None
    sha1: str | None = None
    checksum_source: str = "unsourced"
    size_hint: str = ""


def default_workers() -> int:
    """Number of parallel workers used when the caller does not say: all cores, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))
