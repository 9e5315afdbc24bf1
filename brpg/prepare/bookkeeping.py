"""JSON marker files under ``DATA_ROOT/.prepare/`` that let a re-run skip finished steps;
the SHA-256 manifest of the converted label maps (so that a re-run checks their content, not
only that they exist); and the validation report, rewritten with ``"ok": false`` when a
preparation fails, so that an earlier run's ``"ok": true`` never survives.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from brpg.prepare.atomic import atomic_write_json, is_temp_file
from brpg.prepare.base import STATE_DIRNAME, PrepareError
from brpg.prepare.label_png import check_label_values, read_label_png

log = logging.getLogger("brpg.prepare")


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
