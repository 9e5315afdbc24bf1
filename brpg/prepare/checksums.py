"""MD5/SHA-1/SHA-256 checks of archives, cached in a marker so that a re-run does not hash
20 GB again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from tqdm import tqdm

from brpg.prepare.atomic import atomic_write_json
from brpg.prepare.base import STATE_DIRNAME, Archive, PrepareError

log = logging.getLogger("brpg.prepare")


def file_digest(path: Path, algorithm: str, *, progress: bool = False) -> str:
    """Hex digest of a file (``algorithm`` as in :mod:`hashlib`), with an optional progress bar."""
    return file_digests(path, (algorithm,), progress=progress)[algorithm]


def file_digests(
    path: Path, algorithms: Iterable[str], *, progress: bool = False
) -> dict[str, str]:
    """Hex digests of a file for several algorithms, reading it once."""
    digests = {a: hashlib.new(a) for a in algorithms}
    size = path.stat().st_size
    with (
        open(path, "rb") as fh,
        tqdm(
            total=size,
            unit="B",
            unit_scale=True,
            desc=f"{'+'.join(digests)} {path.name}",
            disable=not progress,
            leave=False,
        ) as bar,
    ):
        while chunk := fh.read(1 << 22):
            for digest in digests.values():
                digest.update(chunk)
            bar.update(len(chunk))
    return {a: d.hexdigest() for a, d in digests.items()}


def _checksum_mismatch(path: Path, algorithm: str, expected: str, actual: str) -> PrepareError:
    return PrepareError(
        f"checksum mismatch for {path}: {algorithm} is {actual}, expected {expected} "
        f"({path.stat().st_size} bytes). The file is truncated, corrupt or a different release: "
        "delete it and download it again"
    )


def verify_checksum(
    path: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    sha1: str | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
    source: str = "",
) -> bool:
    """Check ``path`` against the given digests (in one read); return False when none is given.

    With ``cache_dir`` a successful check is remembered (keyed on size and mtime), so re-runs skip
    hashing unchanged archives. Raises :class:`PrepareError` on a mismatch; ``source`` (where the
    expected digests come from, and how to override them) is added to its message.
    """
    given = (("md5", md5), ("sha1", sha1), ("sha256", sha256))
    wanted = {k: v.lower() for k, v in given if v}
    if not wanted:
        return False
    st = path.stat()
    cache = cache_dir / f"{path.name}.json" if cache_dir is not None else None
    if cache is not None and cache.exists():
        with contextlib.suppress(ValueError, OSError):
            old = json.loads(cache.read_text())
            if (
                old.get("size") == st.st_size
                and old.get("mtime_ns") == st.st_mtime_ns
                and all(old.get(k) == v for k, v in wanted.items())
            ):
                log.info("checksum of %s already verified", path.name)
                return True
    actual = file_digests(path, wanted, progress=progress)
    for algorithm, expected in wanted.items():
        if actual[algorithm] != expected:
            error = _checksum_mismatch(path, algorithm, expected, actual[algorithm])
            raise PrepareError(f"{error} ({source})" if source else str(error))
    log.info("checksum of %s OK", path.name)
    if cache is not None:
        atomic_write_json(cache, {"size": st.st_size, "mtime_ns": st.st_mtime_ns, **wanted})
    return True


def verify_archive(
    path: Path, archive: Archive, data_root: Path, *, progress: bool = False
) -> bool:
    """:func:`verify_checksum` of ``path`` against ``archive``'s known digests, remembered in
    ``DATA_ROOT``'s checksum cache; a mismatch names where the digests come from."""
    return verify_checksum(
        path,
        md5=archive.md5,
        sha256=archive.sha256,
        sha1=archive.sha1,
        cache_dir=checksum_cache_dir(data_root),
        progress=progress,
        source=archive.checksum_source,
    )


def checksum_cache_dir(data_root: Path) -> Path:
    """Where verified archive checksums are remembered."""
    return Path(data_root) / STATE_DIRNAME / "verified"
