"""Safe extraction of selected members of a tar or zip archive: no absolute paths, no ``..``,
no links; zip members in parallel threads; every file written atomically; files already
extracted are skipped, so an interrupted extraction resumes.
"""

from __future__ import annotations

import gzip
import lzma
import shutil
import stat
import tarfile
import threading
import zipfile
import zlib
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from brpg.prepare.atomic import atomic_write_bytes, atomic_writer
from brpg.prepare.base import PrepareError


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


# gzip checks its CRC and length, xz its checksum, when the stream is read to its end
_ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)

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


def _check_reached_end(tar: tarfile.TarFile, archive: Path) -> None:
    """Raise unless ``tar``'s iteration stopped at the archive's real end.

    :mod:`tarfile` ends its iteration at the first header it cannot parse, exactly as at the
    end of the archive: a corrupt member header in the middle is not an error to it, and the
    members after it would silently be missing (and the step marked done). A real end is
    followed by nothing but zero blocks. Reading those to the end of the stream also makes
    gzip (CRC-32 and length) and xz check their trailers.
    """
    end = tar.offset
    fileobj = tar.fileobj
    assert fileobj is not None
    fileobj.seek(end)
    while chunk := fileobj.read(1 << 20):
        if chunk.count(0) != len(chunk):
            raise PrepareError(
                f"archive {archive} is corrupt: the tar header at byte {end:,} of its (decompressed)"
                " data cannot be read, and data follows it, so the members after it were not "
                "extracted; delete the archive and download it again"
            )


def _extract_tar(members: _Members, workers: int, progress: bool, desc: str) -> int:
    archive = members.archive
    count = 0
    with (
        # random-access mode (not the "r|*" stream): after the last member the position of the
        # header where reading stopped is known, and the rest of the data can be checked
        tarfile.open(archive, "r:*") as tar,
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
            _check_reached_end(tar, archive)
        except BaseException:
            for other in futures:
                other.cancel()
            raise
    return count
