"""Test-only helpers for the data preparation tests, plus the miniature archive builders.

The builders of miniature ``VOCtrainval_11-May-2012.tar`` + ``benchmark.tgz``, Cityscapes zips
and COCO zips live in :mod:`brpg.prepare.fixtures` (the book uses them too) and are re-exported
here; this module adds what only tests need: truncation, a full-disk writer and a local HTTP
server that honours ``Range`` requests.
"""

from __future__ import annotations

import contextlib
import errno
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from brpg.prepare.fixtures import (  # noqa: F401 - re-exported for the tests
    CITIES,
    CITYSCAPES_H,
    CITYSCAPES_W,
    COCO_H,
    COCO_THING_IDS,
    COCO_W,
    PASCAL_H,
    PASCAL_W,
    SBD_ONLY_IMAGE,
    SBD_TRAIN,
    SBD_VAL,
    TRAIN_AUG,
    VOC_TRAIN,
    VOC_UNUSED,
    VOC_VAL,
    cityscapes_label_ids,
    cityscapes_names,
    coco_annotations,
    jpeg_bytes,
    label_png_bytes,
    make_cityscapes_archives,
    make_coco_archives,
    make_gtcoarse_zip,
    make_pascal_archives,
    mat_bytes,
    md5_of,
    prepare_fixture,
    rgb_png_bytes,
    sbd_label,
    voc_label,
    write_cityscapes_splits,
    write_coco_splits,
    write_pascal_splits,
    write_tar,
    write_zip,
)


def truncate(path: Path, fraction: float = 0.5) -> None:
    """Cut a file to ``fraction`` of its size, as an interrupted copy would."""
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[: int(len(data) * fraction)])


def temp_files(root: Path) -> list[Path]:
    """Leftover temporary files (atomic-writer temps and ``.part`` downloads) under ``root``."""
    return [p for p in Path(root).rglob("*") if ".tmp-" in p.name or p.name.endswith(".part")]


class FullDisk:
    """Replacement for ``common._open_for_write`` whose writes fail with ENOSPC.

    ``fail_if(path)`` selects the files that count; after ``budget`` bytes of those, every write
    raises ``OSError(ENOSPC)``.
    """

    def __init__(self, budget: int, fail_if: Any = lambda path: True) -> None:
        self.budget = budget
        self.fail_if = fail_if
        self.lock = threading.Lock()
        self.failures = 0

    def __call__(self, path: Path) -> Any:
        fh = open(path, "wb")  # noqa: SIM115
        outer = self
        counted = self.fail_if(path)

        class Writer:
            def write(self, data: bytes) -> int:
                if counted:
                    with outer.lock:
                        if len(data) > outer.budget:
                            outer.failures += 1
                            raise OSError(errno.ENOSPC, "No space left on device")
                        outer.budget -= len(data)
                return fh.write(data)

            def close(self) -> None:
                fh.close()

        return Writer()


# --------------------------------------------------------------------------- HTTP server


@contextlib.contextmanager
def serve_files(
    files: dict[str, bytes], *, honor_range: bool = True, cut_first_at: int | None = None
) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Serve ``files`` (URL path -> bytes) on 127.0.0.1; yield ``(base_url, request_log)``.

    ``Range: bytes=N-`` requests get a 206 with the tail when ``honor_range``. With
    ``cut_first_at`` the first response stops after that many body bytes (connection dropped).
    """
    requests: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server API
            name = self.path.lstrip("/")
            rng = self.headers.get("Range")
            requests.append({"path": name, "range": rng})
            data = files.get(name)
            if data is None:
                self.send_error(404, "not found")
                return
            start = 0
            if rng and honor_range:
                start = int(rng.split("=")[1].split("-")[0])
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            body = data[start:]
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if cut_first_at is not None and len(requests) == 1:
                self.wfile.write(body[:cut_first_at])
                self.wfile.flush()
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
