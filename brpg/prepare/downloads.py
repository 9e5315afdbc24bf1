"""Resumable downloads: stdlib ``urllib`` with HTTP ``Range`` resume into ``<name>.part``, a
tqdm progress bar and a checksum check before the file gets its final name.
"""

from __future__ import annotations

import http.client
import logging
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

from tqdm import tqdm

from brpg.prepare.atomic import is_disk_full
from brpg.prepare.base import Archive, PrepareError
from brpg.prepare.checksums import verify_checksum

log = logging.getLogger("brpg.prepare")


_NETWORK_ERRORS = (
    urllib.error.URLError,
    http.client.HTTPException,
    ConnectionError,
    TimeoutError,
    socket.timeout,
)


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    chunk_size: int = 1 << 20,
) -> Path:
    """Download ``url`` to ``dest``, resuming a previous ``dest.part``, and verify it.

    The bytes go to ``<dest>.part``; an existing ``.part`` is resumed with an HTTP ``Range``
    request (a server that ignores ``Range`` makes the download start over). The ``.part`` file is
    renamed to ``dest`` only after its checksum matches; on a mismatch it is deleted. An
    interrupted transfer keeps the ``.part`` file so that the next call resumes it.
    """
    dest = Path(dest)
    if dest.exists():
        verify_checksum(dest, md5=md5, sha256=sha256)
        log.info("%s already downloaded", dest.name)
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "brpg-prepare/1.0"}
    if start:
        headers["Range"] = f"bytes={start}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)  # noqa: S310 - http(s) URL
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # range past the end: the .part is already complete
            response = None
        else:
            raise PrepareError(
                f"download of {url} failed: HTTP {exc.code} {exc.reason}. Check the URL, or "
                f"download the file by hand and put it at {dest}"
            ) from exc
    except _NETWORK_ERRORS as exc:
        raise PrepareError(
            f"cannot download {url} ({exc}). Check the network, or download the file by hand "
            f"and put it at {dest}"
        ) from exc
    if response is not None:
        with response:
            if start and response.status != 206:
                log.info("server ignored the Range request; restarting %s", dest.name)
                start = 0
            length = response.headers.get("Content-Length")
            total = start + int(length) if length is not None else None
            mode = "ab" if start else "wb"
            try:
                with (
                    open(part, mode) as fh,
                    tqdm(
                        total=total,
                        initial=start,
                        unit="B",
                        unit_scale=True,
                        desc=dest.name,
                        disable=not progress,
                    ) as bar,
                ):
                    while chunk := response.read(chunk_size):
                        fh.write(chunk)
                        bar.update(len(chunk))
            except _NETWORK_ERRORS as exc:
                raise PrepareError(
                    f"download of {url} was interrupted ({exc}); re-run to resume from "
                    f"{part} ({part.stat().st_size} bytes so far)"
                ) from exc
            except OSError as exc:
                if is_disk_full(exc):
                    raise PrepareError(
                        f"disk full while downloading {dest}; free space and re-run to resume "
                        f"from {part}"
                    ) from exc
                raise
        got = part.stat().st_size
        if total is not None and got != total:
            raise PrepareError(
                f"download of {url} stopped at {got} of {total} bytes; re-run to resume from {part}"
            )
    try:
        verify_checksum(part, md5=md5, sha256=sha256)
    except PrepareError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return dest


def require_archive(archives_dir: Path, archive: Archive, how_to_get: str) -> Path:
    """Return the path of ``archive`` in ``archives_dir`` or raise a :class:`PrepareError`.

    The error says where the file was expected, how to get it (``how_to_get``) and names the
    files of the same type that are there instead (another package, a ``.part`` download).
    """
    path = Path(archives_dir) / archive.filename
    if path.is_file():
        return path
    suffix = Path(archive.filename).suffix.lower()
    similar = []
    if Path(archives_dir).is_dir():
        similar = sorted(
            p.name
            for p in Path(archives_dir).iterdir()
            if p.name != archive.filename
            and (p.suffix.lower() == suffix or p.name == archive.filename + ".part")
        )[:8]
    found = f" Found instead: {', '.join(similar)}." if similar else ""
    raise PrepareError(f"missing archive {path}.{found} {how_to_get}")


def obtain_archive(archives_dir: Path, archive: Archive, *, fetch: bool, progress: bool) -> Path:
    """The path of ``archive`` in ``archives_dir``, downloaded first when it is missing, ``fetch``
    is set (``--download``) and the archive has a public URL; otherwise :func:`require_archive`
    (raises if it is still missing)."""
    path = Path(archives_dir) / archive.filename
    if not path.is_file() and fetch and archive.url:
        download(archive.url, path, md5=archive.md5, progress=progress)
    return require_archive(
        archives_dir,
        archive,
        f"Run with --download, or download {archive.url} ({archive.size_hint}) and put it there.",
    )
