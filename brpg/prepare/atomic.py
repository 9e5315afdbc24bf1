"""Atomic writes: write to a hidden temporary file and ``os.replace`` it, so that a crash, a
full disk or Ctrl-C never leaves a half-written file under its final name.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from brpg.prepare.base import PrepareError


def _open_for_write(path: Path) -> IO[bytes]:
    """Open ``path`` for binary writing. Tests monkeypatch this to simulate a full disk."""
    return open(path, "wb")  # noqa: SIM115 - closed by atomic_writer


def is_disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def atomic_writer(path: Path) -> Iterator[IO[bytes]]:
    """Yield a binary file object whose content appears at ``path`` only if the block succeeds.

    Data goes to a hidden temporary file beside ``path`` that is renamed over ``path`` at the end
    and deleted on any error. A full disk becomes a :class:`PrepareError` that says what to do.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    fh = _open_for_write(tmp)
    try:
        yield fh
        fh.close()
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            fh.close()
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(exc):
            raise PrepareError(
                f"disk full while writing {path}: free space on that disk (or point --data-root "
                "elsewhere) and re-run; finished files are kept and skipped"
            ) from exc
        raise


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_writer(path) as fh:
        fh.write(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def is_temp_file(path: Path) -> bool:
    """True for the hidden temporary files :func:`atomic_writer` and :func:`download` create."""
    return (path.name.startswith(".") and ".tmp-" in path.name) or path.name.endswith(".part")
