"""Shared machinery of the dataset preparation scripts.

Every preparation script follows the same pattern, and this module holds the pieces:

- :class:`PrepareError`: the one exception the scripts raise for bad input. Its message names the
  file at fault and says how to fix it; the CLIs print it without a traceback.
- :func:`download`: stdlib ``urllib`` download with HTTP ``Range`` resume into ``<name>.part``,
  a tqdm progress bar and a checksum check before the file gets its final name.
- :func:`verify_checksum`: MD5/SHA-256 check of an archive, cached in a marker so that a re-run
  does not hash 20 GB again.
- :func:`extract`: safe extraction of selected members of a tar or zip archive (no absolute
  paths, no ``..``, no links), zip members in parallel threads; every file is written atomically,
  files already extracted are skipped, so an interrupted extraction resumes.
- :func:`atomic_writer` and friends: write to a hidden temporary file and ``os.replace`` it, so a
  crash, a full disk or Ctrl-C never leaves a half-written file under its final name.
- :func:`parallel_map`: a bounded ``concurrent.futures`` process pool with a progress bar for the
  per-file conversions.
- :class:`Markers`: JSON marker files under ``DATA_ROOT/.prepare/`` that let a re-run skip
  finished steps.
- :func:`write_manifest` / :func:`verify_labels`: a SHA-256 manifest of the converted label maps,
  written at conversion time, so that a re-run checks their content, not only that they exist.
- :func:`failure_report`: a preparation that fails still rewrites its validation report, with
  ``"ok": false`` and the reason, so that an earlier run's ``"ok": true`` never survives.

``brpg.data`` (which imports torch) is imported only where it is used, so that ``--help`` and
argument errors of the scripts answer at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import hashlib
import http.client
import io
import json
import logging
import os
import shutil
import socket
import stat
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

import numpy as np
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("brpg.prepare")

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


# --------------------------------------------------------------------------- atomic writes


def _open_for_write(path: Path) -> IO[bytes]:
    """Open ``path`` for binary writing. Tests monkeypatch this to simulate a full disk."""
    return open(path, "wb")  # noqa: SIM115 - closed by atomic_writer


def _is_disk_full(exc: BaseException) -> bool:
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
        if _is_disk_full(exc):
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


# --------------------------------------------------------------------------- label PNGs


@functools.cache
def voc_palette() -> list[int]:
    """The 256-entry PASCAL VOC colour map as a flat ``[r0, g0, b0, r1, ...]`` list."""
    from brpg.data.palette import voc_colour_map  # brpg.data imports torch: only when needed

    return voc_colour_map().reshape(-1).tolist()


def encode_label_png(label: np.ndarray) -> bytes:
    """Encode an ``HxW`` uint8 label map as a palette PNG (the values are the palette indices)."""
    if label.dtype != np.uint8 or label.ndim != 2:
        raise ValueError(f"label map must be 2-D uint8, got {label.dtype} {label.shape}")
    image = Image.fromarray(label)
    image.putpalette(voc_palette())
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def save_label_png(path: Path, label: np.ndarray) -> None:
    """Write ``label`` to ``path`` as a palette PNG, atomically."""
    atomic_write_bytes(path, encode_label_png(label))


def read_label_png(path: Path) -> np.ndarray:
    """Read a palette or grayscale label PNG as an ``HxW`` uint8 array of label values."""
    try:
        with Image.open(path) as image:
            if image.mode not in ("P", "L"):
                raise PrepareError(
                    f"{path} is a {image.mode} image, not a palette or grayscale label map: "
                    "the archive is not the expected release; download it again"
                )
            return np.asarray(image, dtype=np.uint8).copy()
    except (OSError, SyntaxError) as exc:
        raise PrepareError(
            f"cannot read label map {path} ({exc}); delete it and re-run (add --force if needed)"
        ) from exc


def image_size(path: Path) -> tuple[int, int]:
    """``(width, height)`` of an image file, reading only its header."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, SyntaxError) as exc:
        raise PrepareError(
            f"cannot read image {path} ({exc}): the file is corrupt; delete it and re-run"
        ) from exc


def check_label_values(label: np.ndarray, allowed: np.ndarray, what: Path | str, fix: str) -> None:
    """Raise :class:`PrepareError` if ``label`` holds values whose ``allowed[value]`` is False."""
    present = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    bad = [int(v) for v in present if not allowed[v]]
    if bad:
        raise PrepareError(f"{what} holds label values {bad} outside the dataset's classes; {fix}")


def check_same_size(image: Path, mask_size: tuple[int, int], mask: Path | str) -> None:
    """Raise :class:`PrepareError` unless the image at ``image`` is ``mask_size`` (w, h)."""
    size = image_size(image)
    if size != mask_size:
        raise PrepareError(
            f"image/mask size mismatch: {image} is {size[0]}x{size[1]} but {mask} is "
            f"{mask_size[0]}x{mask_size[1]}; the archives do not belong together or one is "
            "corrupt: download them again"
        )


def label_histogram(label: np.ndarray) -> np.ndarray:
    """Pixel count of every value 0..255 in ``label`` (int64, length 256)."""
    return np.bincount(label.ravel(), minlength=256).astype(np.int64)


def histogram_dict(hist: np.ndarray) -> dict[str, int]:
    """The non-zero entries of a 256-bin histogram as ``{"value": count}`` for JSON."""
    return {str(int(v)): int(hist[v]) for v in np.flatnonzero(hist)}


# --------------------------------------------------------------------------- checksums


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


# --------------------------------------------------------------------------- downloads

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
                if _is_disk_full(exc):
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


# --------------------------------------------------------------------------- extraction


def safe_member_path(name: str, archive: Path) -> PurePosixPath:
    """Validate an archive member name and return it as a relative POSIX path.

    Raises :class:`PrepareError` for absolute paths, ``..`` components and Windows drive or
    backslash tricks, so that extraction can never write outside its destination.
    """
    rel = PurePosixPath(name.replace("\\", "/"))
    if (
        rel.is_absolute()
        or ".." in rel.parts
        or (rel.parts and ":" in rel.parts[0])
        or "\\" in name
    ):
        raise PrepareError(
            f"archive {archive} contains an unsafe member name {name!r}; refusing to extract it. "
            "The archive is not the official release: download it again from the official site"
        )
    return rel


def _truncated(archive: Path, exc: BaseException) -> PrepareError:
    return PrepareError(
        f"archive {archive} is truncated or corrupt ({type(exc).__name__}: {exc}); delete it and "
        "download it again"
    )


_ARCHIVE_ERRORS = (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error)

Selector = Callable[[str], "str | None"]


def extract(
    archive: Path,
    dest: Path,
    select: Selector,
    *,
    workers: int = 2,
    progress: bool = True,
    desc: str | None = None,
    overwrite: bool = False,
) -> int:
    """Extract the members of a tar or zip ``archive`` that ``select`` maps to an output path.

    ``select(member_name)`` returns the path (relative to ``dest``) to write the member to, or
    ``None`` to skip it. Only regular files are extracted. Each file is written atomically; unless
    ``overwrite``, a file that already exists with the member's size is skipped, so an
    interrupted extraction resumes.
    Zip members are extracted by ``workers`` threads, each with its own handle; tar archives are
    read sequentially and written by ``workers`` threads. Returns the number of selected members.
    A zip that :mod:`zipfile` cannot open (a truncated download) is reported as "not a readable zip
    archive", not read as a tar.
    """
    archive, dest = Path(archive), Path(dest)
    desc = desc or f"extract {archive.name}"
    members = _Members(archive, dest, select, overwrite)
    try:
        if zipfile.is_zipfile(archive):
            return _extract_zip(members, workers, progress, desc)
        if looks_like_zip(archive):  # a zip without its central directory: truncated
            raise PrepareError(
                f"archive {archive} is not a readable zip archive (its central directory is "
                "missing: the file is truncated or corrupt); delete it and download it again"
            )
        return _extract_tar(members, workers, progress, desc)
    except _ARCHIVE_ERRORS as exc:
        raise _truncated(archive, exc) from exc


def looks_like_zip(path: Path) -> bool:
    """True if ``path`` is named ``*.zip`` or starts like a zip (``PK\\x03\\x04``), readable or not."""
    if Path(path).suffix.lower() == ".zip":
        return True
    try:
        with open(path, "rb") as fh:
            return fh.read(4) == b"PK\x03\x04"
    except OSError:
        return False


@dataclass(frozen=True)
class _Members:
    """Which members of ``archive`` :func:`extract` writes, and where under ``dest``."""

    archive: Path
    dest: Path
    select: Selector
    overwrite: bool

    def target(self, name: str) -> Path | None:
        """The output path of member ``name``, ``None`` to skip it; unsafe names raise."""
        safe_member_path(name, self.archive)
        rel = self.select(name)
        return None if rel is None else self.dest / safe_member_path(rel, self.archive)

    def already_there(self, target: Path, size: int) -> bool:
        """True when ``target`` holds a file of the member's ``size`` (an interrupted extraction
        wrote it) and ``overwrite`` is off: the member is skipped, so extraction resumes."""
        if self.overwrite:
            return False
        try:
            return target.stat().st_size == size
        except FileNotFoundError:
            return False


def _extract_zip(members: _Members, workers: int, progress: bool, desc: str) -> int:
    archive = members.archive
    with zipfile.ZipFile(archive) as zf:
        jobs: list[tuple[zipfile.ZipInfo, Path]] = []
        for info in zf.infolist():
            if info.is_dir() or stat.S_ISLNK(info.external_attr >> 16):
                continue
            target = members.target(info.filename)
            if target is not None:
                jobs.append((info, target))
    local = threading.local()
    handles: list[zipfile.ZipFile] = []
    lock = threading.Lock()

    def work(job: tuple[zipfile.ZipInfo, Path]) -> None:
        info, target = job
        if members.already_there(target, info.file_size):
            return
        zf = getattr(local, "zf", None)
        if zf is None:
            zf = local.zf = zipfile.ZipFile(archive)
            with lock:
                handles.append(zf)
        with zf.open(info) as src, atomic_writer(target) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)

    try:
        with tqdm(total=len(jobs), desc=desc, unit="file", disable=not progress) as bar:
            if workers <= 1:
                for job in jobs:
                    work(job)
                    bar.update()
            else:
                with ThreadPoolExecutor(max_workers=workers) as pool:
                    futures = deque()
                    for job in jobs:
                        futures.append(pool.submit(work, job))
                        while len(futures) > 8 * workers:
                            _drain_one(futures, bar)
                    while futures:
                        _drain_one(futures, bar)
    finally:
        for zf in handles:
            zf.close()
    return len(jobs)


def _drain_one(futures: deque[Future], bar: tqdm) -> None:
    future = futures.popleft()
    try:
        future.result()
    except BaseException:
        for other in futures:
            other.cancel()
        raise
    bar.update()


def _write_member(target: Path, data: bytes) -> None:
    atomic_write_bytes(target, data)


def _extract_tar(members: _Members, workers: int, progress: bool, desc: str) -> int:
    archive = members.archive
    count = 0
    with (
        tarfile.open(archive, "r|*") as tar,
        tqdm(desc=desc, unit="file", disable=not progress) as bar,
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
    ):
        futures: deque[Future] = deque()
        try:
            for member in tar:
                if not member.isfile():
                    safe_member_path(member.name, archive)
                    continue
                target = members.target(member.name)
                if target is None:
                    continue
                count += 1
                if members.already_there(target, member.size):
                    bar.update()
                    continue
                src = tar.extractfile(member)
                data = src.read() if src is not None else b""
                if len(data) != member.size:
                    raise tarfile.ReadError(
                        f"member {member.name} has {len(data)} of {member.size} bytes"
                    )
                futures.append(pool.submit(_write_member, target, data))
                while len(futures) > 8 * max(1, workers):
                    _drain_one(futures, bar)
            while futures:
                _drain_one(futures, bar)
        except BaseException:
            for other in futures:
                other.cancel()
            raise
    return count


# --------------------------------------------------------------------------- parallel conversion


def parallel_map(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    workers: int = 2,
    desc: str = "convert",
    progress: bool = True,
    total: int | None = None,
) -> Iterator[Any]:
    """Yield ``fn(item)`` for every item, in order, using a pool of ``workers`` processes.

    At most ``4 * workers`` items are in flight, so large inputs are not all pickled at once. With
    ``workers <= 1`` everything runs in this process. On an error the pending work is cancelled
    and the error re-raised.
    """
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = tqdm(total=total, desc=desc, unit="file", disable=not progress)
    try:
        if workers <= 1:
            for item in items:
                yield fn(item)
                bar.update()
            return
        with ProcessPoolExecutor(max_workers=workers) as pool:
            futures: deque[Future] = deque()
            try:
                for item in items:
                    futures.append(pool.submit(fn, item))
                    if len(futures) >= 4 * workers:
                        yield futures.popleft().result()
                        bar.update()
                while futures:
                    yield futures.popleft().result()
                    bar.update()
            except BaseException:
                for other in futures:
                    other.cancel()
                raise
    finally:
        bar.close()


# --------------------------------------------------------------------------- markers and reports


class Markers:
    """Marker files ``DATA_ROOT/.prepare/<dataset>/<step>.json`` recording finished steps."""

    def __init__(self, data_root: Path, dataset: str) -> None:
        self.data_root, self.dataset = Path(data_root), dataset
        self.dir = self.data_root / STATE_DIRNAME / dataset

    def path(self, step: str) -> Path:
        """Path of the marker of ``step``."""
        return self.dir / f"{step}.json"

    def done(self, step: str) -> bool:
        """True if ``step`` has finished before."""
        return self.path(step).is_file()

    def mark(self, step: str, **info: Any) -> None:
        """Record that ``step`` finished (with optional JSON-able details)."""
        atomic_write_json(self.path(step), {"finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info})

    def info(self, step: str) -> dict[str, Any]:
        """The details recorded with ``step`` (empty if it has not finished)."""
        try:
            return json.loads(self.path(step).read_text())
        except (OSError, ValueError):
            return {}

    def clear(self, step: str | None = None) -> None:
        """Forget ``step`` (or every step of this dataset)."""
        if step is None:
            shutil.rmtree(self.dir, ignore_errors=True)
        else:
            self.path(step).unlink(missing_ok=True)


def checksum_cache_dir(data_root: Path) -> Path:
    """Where verified archive checksums are remembered."""
    return Path(data_root) / STATE_DIRNAME / "verified"


def list_files(root: Path, suffix: str) -> set[str]:
    """Relative POSIX paths of the files under ``root`` ending with ``suffix`` (no temp files)."""
    root = Path(root)
    if not root.is_dir():
        return set()
    return {
        p.relative_to(root).as_posix()
        for p in root.rglob(f"*{suffix}")
        if p.is_file() and not is_temp_file(p)
    }


def finish_report(
    report: dict[str, Any], path: Path, more_errors: Iterable[str] = ()
) -> dict[str, Any]:
    """Write the validation report to ``path`` and raise if it lists errors.

    ``report["errors"]`` (extended by ``more_errors``) holds problems that make the data
    unusable; the report is written anyway (with ``"ok": false``) so the user can read all of
    them, then the first few are raised.
    """
    report["errors"] = [*report.get("errors", []), *more_errors]
    report["ok"] = not report.get("errors")
    atomic_write_json(path, report)
    log.info("validation report written to %s", path)
    for warning in report.get("warnings", []):
        log.warning("warning: %s", warning)
    if report.get("errors"):
        errors = report["errors"]
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        exc = PrepareError("; ".join(errors[:5]) + more + f". Full list in {path}")
        exc.report = str(path)  # type: ignore[attr-defined] - see failure_report
        raise exc
    return report


@contextlib.contextmanager
def failure_report(path: Path, dataset: str) -> Iterator[None]:
    """Rewrite the report at ``path`` with ``"ok": false`` and the reason if the block fails.

    A :class:`PrepareError` raised by :func:`finish_report` (which has written the full report
    already) passes through; any other one first replaces the report, so that a stale
    ``"ok": true`` of an earlier run never outlives a failed one.
    """
    try:
        yield
    except PrepareError as exc:
        if getattr(exc, "report", None) != str(path):
            atomic_write_json(
                path, {"dataset": dataset, "ok": False, "errors": [str(exc)], "warnings": []}
            )
            log.info("validation report (failed run) written to %s", path)
        raise


def reports_failure(dataset: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate ``prepare_<dataset>(data_root, ...)`` with :func:`failure_report` on
    ``DATA_ROOT/reports/<dataset>.json``."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(data_root: Path, *args: Any, **kwargs: Any) -> Any:
            path = Path(data_root) / "reports" / f"{dataset}.json"
            with failure_report(path, dataset):
                return fn(data_root, *args, **kwargs)

        return wrapper

    return decorate


MANIFEST_STEP = "manifest"


def label_digests(
    root: Path, rels: Iterable[str], *, workers: int = 2, progress: bool = False
) -> dict[str, str | None]:
    """``{rel: sha256 hex}`` of the files ``root / rel`` (``None`` for a missing file)."""

    def digest(rel: str) -> str | None:
        try:
            return hashlib.sha256((Path(root) / rel).read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    rels = sorted(rels)
    with (
        ThreadPoolExecutor(max_workers=max(1, workers)) as pool,
        tqdm(total=len(rels), desc="sha256 labels", unit="file", disable=not progress) as bar,
    ):
        out = {}
        for rel, value in zip(rels, pool.map(digest, rels), strict=True):
            out[rel] = value
            bar.update()
    return out


def write_manifest(
    markers: Markers, root: Path, rels: Iterable[str], *, workers: int = 2, progress: bool = False
) -> None:
    """Record the SHA-256 of every converted label map (paths relative to ``root``)."""
    digests = label_digests(root, rels, workers=workers, progress=progress)
    markers.mark(MANIFEST_STEP, algorithm="sha256", files=digests)


def finish_labels(
    report: dict[str, Any],
    markers: Markers,
    root: Path,
    rels: Iterable[str],
    allowed: np.ndarray,
    converted_now: bool,
    workers: int = 2,
    progress: bool = False,
) -> dict[str, Any]:
    """End a preparation: check the label maps' content, then :func:`finish_report`.

    Labels this run converted get their manifest (:func:`write_manifest`); labels converted by
    an earlier run are re-checked against theirs (:func:`verify_labels`), so a re-run notices a
    label file edited or damaged since, and its errors join ``report``'s. The report goes to
    ``DATA_ROOT/reports/<dataset>.json``.
    """
    if converted_now:
        write_manifest(markers, root, rels, workers=workers, progress=progress)
        errors: list[str] = []
    else:
        log.info("%s: labels already converted; re-checking (use --force to redo)", root)
        errors = verify_labels(markers, root, rels, allowed, workers=workers, progress=progress)
    path = markers.data_root / "reports" / f"{markers.dataset}.json"
    return finish_report(report, path, errors)


def verify_labels(
    markers: Markers,
    root: Path,
    rels: Iterable[str],
    allowed: np.ndarray,
    *,
    workers: int = 2,
    progress: bool = False,
) -> list[str]:
    """Errors for converted label maps whose content changed since the conversion.

    With a manifest (written by :func:`write_manifest` at conversion time) every listed file is
    hashed and compared. Data converted before manifests existed has none: then every label map
    in ``rels`` gets the label-value check of the first run once (values outside ``allowed``),
    and the manifest is written if they pass.
    """
    fix = "delete it and re-run with --force"
    recorded = markers.info(MANIFEST_STEP).get("files")
    if isinstance(recorded, dict):
        now = label_digests(root, recorded, workers=workers, progress=progress)
        errors = []
        for rel, want in recorded.items():
            if now[rel] is None:
                errors.append(f"{Path(root) / rel} is missing; re-run with --force")
            elif now[rel] != want:
                errors.append(
                    f"{Path(root) / rel} changed since it was converted (its SHA-256 differs "
                    f"from {markers.path(MANIFEST_STEP)}); {fix}"
                )
        return errors
    log.info("no label manifest (prepared by an older version): checking every label map once")
    rels = sorted(rels)
    errors = []

    def check(rel: str) -> str | None:
        try:
            check_label_values(read_label_png(Path(root) / rel), allowed, Path(root) / rel, fix)
        except PrepareError as exc:
            return str(exc)
        return None

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        errors = [e for e in pool.map(check, rels) if e]
    if not errors:
        write_manifest(markers, root, rels, workers=workers, progress=progress)
    return errors


# --------------------------------------------------------------------------- CLI helpers


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
