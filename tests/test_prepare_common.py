"""Tests of brpg.prepare: downloads, checksums, extraction, atomic writes, markers.

Machine: exact. Downloads, checksums, extraction and file operations.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from brpg.prepare import atomic, bookkeeping, checksums, downloads, extraction, label_png, parallel
from brpg.prepare.base import Archive, PrepareError

try:
    from tests.fixtures_prepare import (
        FullDisk,
        serve_files,
        temp_files,
        truncate,
        write_tar,
        write_zip,
    )
except ImportError:  # tests/ not a package
    from fixtures_prepare import FullDisk, serve_files, temp_files, truncate, write_tar, write_zip

REPO = Path(__file__).resolve().parents[1]
PAYLOAD = bytes(range(256)) * 400  # 100 kB


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# --------------------------------------------------------------------------- downloads


def test_download_fresh_verifies_and_renames(tmp_path: Path) -> None:
    with serve_files({"a.bin": PAYLOAD}) as (url, log):
        out = downloads.download(
            f"{url}/a.bin", tmp_path / "a.bin", md5=_md5(PAYLOAD), progress=False
        )
    assert out.read_bytes() == PAYLOAD
    assert not temp_files(tmp_path)
    assert log == [{"path": "a.bin", "range": None}]


def test_download_resumes_partial_part_file(tmp_path: Path) -> None:
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD[:30000])
    with serve_files({"a.bin": PAYLOAD}) as (url, log):
        downloads.download(f"{url}/a.bin", tmp_path / "a.bin", md5=_md5(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert log[0]["range"] == "bytes=30000-"
    assert not (tmp_path / "a.bin.part").exists()


def test_download_interrupted_then_resumed(tmp_path: Path) -> None:
    with serve_files({"a.bin": PAYLOAD}, cut_first_at=40000) as (url, log):
        with pytest.raises(PrepareError, match="re-run to resume"):
            downloads.download(
                f"{url}/a.bin", tmp_path / "a.bin", md5=_md5(PAYLOAD), progress=False
            )
        assert (tmp_path / "a.bin.part").stat().st_size == 40000
        downloads.download(f"{url}/a.bin", tmp_path / "a.bin", md5=_md5(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD
    assert log[1]["range"] == "bytes=40000-"


def test_download_restarts_when_server_ignores_range(tmp_path: Path) -> None:
    (tmp_path / "a.bin.part").write_bytes(b"garbage" * 100)
    with serve_files({"a.bin": PAYLOAD}, honor_range=False) as (url, _):
        downloads.download(f"{url}/a.bin", tmp_path / "a.bin", md5=_md5(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_download_complete_part_gets_416_and_is_verified(tmp_path: Path) -> None:
    (tmp_path / "a.bin.part").write_bytes(PAYLOAD)
    with serve_files({"a.bin": PAYLOAD}) as (url, _):
        downloads.download(f"{url}/a.bin", tmp_path / "a.bin", md5=_md5(PAYLOAD), progress=False)
    assert (tmp_path / "a.bin").read_bytes() == PAYLOAD


def test_download_checksum_mismatch_leaves_nothing(tmp_path: Path) -> None:
    with serve_files({"a.bin": PAYLOAD}) as (url, _):
        with pytest.raises(PrepareError, match=r"checksum mismatch .*a\.bin\.part.*download it"):
            downloads.download(f"{url}/a.bin", tmp_path / "a.bin", md5="0" * 32, progress=False)
    assert not (tmp_path / "a.bin").exists()
    assert not temp_files(tmp_path)


def test_download_http_error_names_url(tmp_path: Path) -> None:
    with serve_files({}) as (url, _):
        with pytest.raises(PrepareError, match=r"HTTP 404.*put it at"):
            downloads.download(f"{url}/nope.tar", tmp_path / "nope.tar", progress=False)


def test_download_unreachable_host(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match="cannot download"):
        downloads.download(
            "http://127.0.0.1:9/x.tar", tmp_path / "x.tar", progress=False, timeout=2
        )


# --------------------------------------------------------------------------- checksums, archives


def test_verify_checksum_caches_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(PAYLOAD)
    cache = tmp_path / "cache"
    assert checksums.verify_checksum(f, md5=_md5(PAYLOAD), cache_dir=cache)
    monkeypatch.setattr(checksums, "file_digests", lambda *a, **k: pytest.fail("re-hashed"))
    assert checksums.verify_checksum(f, md5=_md5(PAYLOAD), cache_dir=cache)
    assert not checksums.verify_checksum(f)  # nothing to check against


def test_verify_checksum_md5_and_sha1_in_one_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(PAYLOAD)
    sha1 = hashlib.sha1(PAYLOAD).hexdigest()
    reads = []
    real = checksums.file_digests
    monkeypatch.setattr(checksums, "file_digests", lambda *a, **k: reads.append(a) or real(*a, **k))
    assert checksums.verify_checksum(f, md5=_md5(PAYLOAD), sha1=sha1)
    assert len(reads) == 1
    with pytest.raises(PrepareError, match=r"sha1 is .* expected 0+ .*\(from the moon\)"):
        checksums.verify_checksum(f, md5=_md5(PAYLOAD), sha1="0" * 40, source="from the moon")


def test_verify_checksum_mismatch(tmp_path: Path) -> None:
    f = tmp_path / "a.bin"
    f.write_bytes(PAYLOAD)
    with pytest.raises(PrepareError, match="a.bin.*sha256.*delete it and download it again"):
        checksums.verify_checksum(f, sha256="f" * 64)


def test_require_archive_missing_names_path_and_fix(tmp_path: Path) -> None:
    (tmp_path / "gtCoarse.zip").write_bytes(b"x")
    with pytest.raises(PrepareError) as info:
        downloads.require_archive(tmp_path, Archive("gtFine_trainvaltest.zip"), "Get it from X.")
    msg = str(info.value)
    assert str(tmp_path / "gtFine_trainvaltest.zip") in msg
    assert "Get it from X." in msg and "gtCoarse.zip" in msg


def test_obtain_archive_downloads_only_when_asked_and_missing(tmp_path: Path) -> None:
    with serve_files({"a.tar": PAYLOAD}) as (url, log):
        archive = Archive("a.tar", url=f"{url}/a.tar", md5=_md5(PAYLOAD), size_hint="100 kB")
        with pytest.raises(PrepareError, match=r"Run with --download, or download .*a\.tar"):
            downloads.obtain_archive(tmp_path, archive, fetch=False, progress=False)
        assert log == []
        path = downloads.obtain_archive(tmp_path, archive, fetch=True, progress=False)
        assert path == tmp_path / "a.tar" and path.read_bytes() == PAYLOAD
        # present: returned as it is, not fetched again
        assert downloads.obtain_archive(tmp_path, archive, fetch=True, progress=False) == path
    assert log == [{"path": "a.tar", "range": None}]


# --------------------------------------------------------------------------- extraction


def _files(n: int = 6, size: int = 1000) -> dict[str, bytes]:
    return {f"top/sub/f{i}.bin": bytes([i]) * size for i in range(n)}


def _select_all(name: str) -> str | None:
    return name.removeprefix("top/")


@pytest.mark.parametrize("kind", ["zip", "tar", "tgz"])
def test_extract_selected_members(tmp_path: Path, kind: str) -> None:
    files = _files() | {"top/skip.txt": b"no"}
    if kind == "zip":
        archive = write_zip(tmp_path / "a.zip", files)
    else:
        archive = write_tar(tmp_path / f"a.{kind}", files, gz=kind == "tgz")

    def select(name: str) -> str | None:
        return name.removeprefix("top/") if name.endswith(".bin") else None

    n = extraction.extract(archive, tmp_path / "out", select, workers=2, progress=False)
    assert n == 6
    for name, data in _files().items():
        assert (tmp_path / "out" / name.removeprefix("top/")).read_bytes() == data
    assert not (tmp_path / "out" / "skip.txt").exists()
    assert not temp_files(tmp_path / "out")


@pytest.mark.parametrize("kind,name", [("tar", "../evil.txt"), ("zip", "/abs/evil.txt")])
def test_extract_rejects_unsafe_member(tmp_path: Path, kind: str, name: str) -> None:
    files = {"ok.txt": b"ok", name: b"evil"}
    archive = (
        write_tar(tmp_path / "evil.tar", files)
        if kind == "tar"
        else write_zip(tmp_path / "evil.zip", files)
    )
    with pytest.raises(PrepareError, match="unsafe member name"):
        extraction.extract(archive, tmp_path / "out", lambda n: n, progress=False)
    assert not (tmp_path / "evil.txt").exists() and not Path("/abs/evil.txt").exists()


def test_extract_ignores_symlinks(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    assert extraction.extract(archive, tmp_path / "out", lambda n: n, progress=False) == 0
    assert not (tmp_path / "out" / "link").exists()


@pytest.mark.parametrize("kind", ["zip", "tar", "tgz"])
def test_extract_truncated_archive(tmp_path: Path, kind: str) -> None:
    rng = np.random.default_rng(0)
    files = {f"d/f{i}.bin": rng.bytes(5000) for i in range(4)}
    if kind == "zip":
        archive = write_zip(tmp_path / "a.zip", files)
    else:
        archive = write_tar(tmp_path / f"a.{kind}", files, gz=kind == "tgz")
    truncate(archive, 0.6)
    with pytest.raises(PrepareError, match=r"truncated or corrupt.*download it again"):
        extraction.extract(archive, tmp_path / "out", lambda n: n, progress=False)
    assert not temp_files(tmp_path / "out") if (tmp_path / "out").exists() else True


def _tar_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["tar", "tgz"])
def test_a_corrupt_member_header_is_not_read_as_the_end(tmp_path: Path, kind: str) -> None:
    """tarfile stops at a header it cannot parse as if the archive ended there; extraction
    must see the data after it and refuse, not report the first members as the whole archive."""
    rng = np.random.default_rng(0)
    files = {f"d/f{i}.bin": rng.bytes(5000) for i in range(4)}
    data = bytearray(_tar_bytes(files))
    third = 2 * (512 + 10 * 512)  # each member: a 512-byte header and 5000 bytes in 10 blocks
    assert data[third : third + 9] == b"d/f2.bin\0"
    data[third + 148 : third + 156] = b"garbage!"  # the header's checksum field
    archive = tmp_path / f"a.{kind}"
    archive.write_bytes(gzip.compress(bytes(data)) if kind == "tgz" else bytes(data))
    with pytest.raises(PrepareError, match=r"corrupt: the tar header at byte 11,264 .*download"):
        extraction.extract(archive, tmp_path / "out", lambda n: n, progress=False)
    # the same archive intact extracts all four members, and its end is only zero blocks
    good = tmp_path / f"good.{kind}"
    raw = _tar_bytes(files)
    good.write_bytes(gzip.compress(raw) if kind == "tgz" else raw)
    assert extraction.extract(good, tmp_path / "ok", lambda n: n, progress=False) == 4


def test_a_tgz_with_a_bad_crc_is_corrupt(tmp_path: Path) -> None:
    """The members read fine; only the gzip trailer (CRC-32 of the data) says otherwise."""
    files = {f"d/f{i}.bin": bytes([i]) * 3000 for i in range(3)}
    data = bytearray(gzip.compress(_tar_bytes(files)))
    data[-8] ^= 0xFF  # first byte of the CRC-32
    archive = tmp_path / "a.tgz"
    archive.write_bytes(bytes(data))
    with pytest.raises(PrepareError, match=r"truncated or corrupt \(BadGzipFile: CRC check"):
        extraction.extract(archive, tmp_path / "out", lambda n: n, progress=False)


@pytest.mark.parametrize("name", ["a.zip", "a.bin"])
def test_truncated_zip_is_not_read_as_a_tar(tmp_path: Path, name: str) -> None:
    """Without its central directory a zip is no zip to :mod:`zipfile`; it must not be reported
    with a tar error (``a.bin``: recognised by its ``PK`` header, not its name)."""
    files = {f"d/f{i}.bin": np.random.default_rng(i).bytes(5000) for i in range(4)}
    archive = write_zip(tmp_path / name, files)
    truncate(archive, 0.6)
    with pytest.raises(PrepareError) as info:
        extraction.extract(archive, tmp_path / "out", lambda n: n, progress=False)
    message = str(info.value)
    assert "is not a readable zip archive" in message and "download it again" in message
    assert "tar" not in message.lower() and "ReadError" not in message


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_extract_disk_full_cleans_up_and_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    files = _files()
    archive = (
        write_zip(tmp_path / "a.zip", files)
        if kind == "zip"
        else write_tar(tmp_path / "a.tar", files)
    )
    full = FullDisk(budget=2500)
    monkeypatch.setattr(atomic, "_open_for_write", full)
    with pytest.raises(PrepareError, match="disk full while writing"):
        extraction.extract(archive, tmp_path / "out", _select_all, workers=1, progress=False)
    assert full.failures >= 1
    assert not temp_files(tmp_path / "out")
    for p in (tmp_path / "out").rglob("*.bin"):  # whatever exists is complete
        assert p.stat().st_size == 1000
    monkeypatch.undo()
    assert extraction.extract(archive, tmp_path / "out", _select_all, progress=False) == 6
    for name, data in files.items():
        assert (tmp_path / "out" / name.removeprefix("top/")).read_bytes() == data


def test_extract_skips_finished_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = write_zip(tmp_path / "a.zip", _files())
    extraction.extract(archive, tmp_path / "out", _select_all, progress=False)
    target = tmp_path / "out" / "sub" / "f1.bin"
    target.write_bytes(b"x" * 1000)  # same size, wrong content: only overwrite=True repairs it
    with monkeypatch.context() as m:
        m.setattr(atomic, "_open_for_write", lambda p: pytest.fail(f"rewrote {p}"))
        assert extraction.extract(archive, tmp_path / "out", _select_all, progress=False) == 6
    extraction.extract(archive, tmp_path / "out", _select_all, progress=False, overwrite=True)
    assert target.read_bytes() == bytes([1]) * 1000


# --------------------------------------------------------------------------- writes, PNGs, markers


def test_atomic_writer_failure_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "x.json"
    with pytest.raises(ValueError):
        with atomic.atomic_writer(target) as fh:
            fh.write(b"half")
            raise ValueError("boom")
    assert not target.exists() and not temp_files(tmp_path)


def test_label_png_roundtrip_is_palette(tmp_path: Path) -> None:
    label = np.arange(256, dtype=np.uint8).reshape(16, 16)
    label_png.save_label_png(tmp_path / "l.png", label)
    from PIL import Image

    with Image.open(tmp_path / "l.png") as im:
        assert im.mode == "P"
    np.testing.assert_array_equal(label_png.read_label_png(tmp_path / "l.png"), label)
    pal = label_png.voc_palette()
    assert pal[:6] == [0, 0, 0, 128, 0, 0] and pal[15 * 3 : 16 * 3] == [192, 128, 128]


def test_markers_roundtrip(tmp_path: Path) -> None:
    m = bookkeeping.Markers(tmp_path, "demo")
    assert not m.done("step") and m.info("step") == {}
    m.mark("step", files=3)
    assert m.done("step") and m.info("step")["files"] == 3
    m.clear()
    assert not m.done("step")


def test_parallel_map_in_processes_keeps_order() -> None:
    out = list(parallel.parallel_map(abs, range(-20, 0), workers=2, progress=False))
    assert out == list(range(20, 0, -1))


def test_finish_report_writes_then_raises(tmp_path: Path) -> None:
    with pytest.raises(PrepareError, match=r"bad one.*Full list in"):
        bookkeeping.finish_report({"errors": ["bad one"]}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False


def test_failure_report_replaces_a_stale_ok_report(tmp_path: Path) -> None:
    path = tmp_path / "reports" / "x.json"
    bookkeeping.finish_report({"errors": []}, path)
    assert json.loads(path.read_text())["ok"] is True
    with pytest.raises(PrepareError, match="it broke"), bookkeeping.failure_report(path, "x"):
        raise PrepareError("it broke")
    assert json.loads(path.read_text()) == {
        "dataset": "x", "ok": False, "errors": ["it broke"], "warnings": []
    }  # fmt: skip
    # a report written by finish_report (with all its errors) is left as it is
    with pytest.raises(PrepareError), bookkeeping.failure_report(path, "x"):
        bookkeeping.finish_report({"errors": ["e1", "e2"], "sets": {}}, path)
    assert json.loads(path.read_text())["errors"] == ["e1", "e2"]


def test_verify_labels_uses_the_manifest_or_the_value_check(tmp_path: Path) -> None:
    markers = bookkeeping.Markers(tmp_path, "x")
    root = tmp_path / "x"
    rels = ["m/a.png", "m/b.png"]
    for rel in rels:
        label_png.save_label_png(root / rel, np.full((4, 4), 3, np.uint8))
    allowed = np.zeros(256, bool)
    allowed[:5] = True
    # no manifest (older data): the label-value check runs once, then a manifest is written
    assert bookkeeping.verify_labels(markers, root, rels, allowed) == []
    assert set(markers.info("manifest")["files"]) == set(rels)
    # same value range, other content: only the manifest can tell
    label_png.save_label_png(root / "m/a.png", np.full((4, 4), 4, np.uint8))
    (root / "m/b.png").unlink()
    errors = bookkeeping.verify_labels(markers, root, rels, allowed)
    assert len(errors) == 2
    assert "a.png changed since it was converted" in errors[0] and "--force" in errors[0]
    assert "b.png is missing" in errors[1]
    markers.clear("manifest")
    label_png.save_label_png(root / "m/b.png", np.full((4, 4), 99, np.uint8))
    (errors,) = bookkeeping.verify_labels(markers, root, rels, allowed)
    assert "b.png holds label values [99]" in errors and not markers.done("manifest")


@pytest.mark.parametrize(
    "script", ["prepare_pascal.py", "prepare_cityscapes.py", "prepare_coco.py", "fetch_splits.py"]
)
def test_cli_help(script: str) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "data_scripts" / script), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "--data-root" in result.stdout


@pytest.mark.parametrize(
    "script", ["prepare_pascal.py", "prepare_cityscapes.py", "prepare_coco.py", "fetch_splits.py"]
)
@pytest.mark.parametrize("args", [["--help"], ["--no-such-option"]])
def test_cli_help_and_argument_errors_do_not_import_torch(script: str, args: list[str]) -> None:
    """``brpg.data`` imports torch (seconds); the scripts' --help must not pay for it."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = [{script!r}, *{args!r}]\n"
        "try:\n"
        f"    runpy.run_path({str(REPO / 'data_scripts' / script)!r}, run_name='__main__')\n"
        "except SystemExit as exc:\n"
        "    code = exc.code\n"
        "heavy = sorted(m for m in ('torch', 'torchvision', 'brpg.data', 'scipy') if m in sys.modules)\n"
        "print('HEAVY', heavy, 'EXIT', code)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert f"HEAVY [] EXIT {0 if args == ['--help'] else 2}" in result.stdout, result.stdout
