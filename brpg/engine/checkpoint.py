"""Atomic, ``weights_only``-loadable checkpoints and RNG-state capture.

* :func:`save_checkpoint` writes to a temporary file in the target directory, flushes and
  fsyncs it, then ``os.replace``-s it over the target: a crash at any point leaves either the
  old or the new checkpoint, never a partial one. Before writing, the state is checked to
  contain only ``weights_only``-safe objects (tensors, numbers, strings, ``None``, and
  lists/tuples/dicts of those), so a bad entry fails at save time, not at resume time.
* :func:`load_checkpoint` uses ``torch.load(weights_only=True)`` and turns a missing or
  corrupt (e.g. truncated) file into an error naming the path.
* :func:`capture_rng_state` / :func:`restore_rng_state` cover Python ``random``, NumPy's global
  RNG, torch CPU and every CUDA device, stored as tensors and primitives only.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import tempfile
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "CheckpointError",
    "capture_rng_state",
    "latest_checkpoint",
    "load_checkpoint",
    "restore_rng_state",
    "save_checkpoint",
]

_SAFE_LEAVES = (
    torch.Tensor,
    bool,
    int,
    float,
    complex,
    str,
    bytes,
    type(None),
    torch.dtype,
    torch.device,
    torch.Size,
)


class CheckpointError(RuntimeError):
    """A checkpoint file is unreadable (truncated, corrupt, or holds unsafe objects)."""


def _check_safe(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first entry ``torch.load(weights_only=True)`` would refuse."""
    if isinstance(obj, _SAFE_LEAVES):
        return
    if isinstance(obj, (dict, OrderedDict)):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                raise TypeError(f"{where}: key {k!r} of type {type(k).__name__} is not allowed")
            _check_safe(v, f"{where}[{k!r}]")
        return
    if isinstance(obj, (list, tuple, set)):
        for i, v in enumerate(obj):
            _check_safe(v, f"{where}[{i}]")
        return
    raise TypeError(
        f"{where}: {type(obj).__module__}.{type(obj).__qualname__} cannot be loaded with "
        "weights_only=True; store tensors, numbers, strings or plain containers instead"
    )


def _fsync_dir(directory: Path) -> None:
    """Persist a rename on POSIX (best effort; not supported everywhere)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` (temp file in the same directory + ``os.replace``).

    Creates the parent directory. On any failure the temp file is removed and an existing
    checkpoint at ``path`` is left untouched. Returns ``path``.
    """
    path = Path(path)
    _check_safe(state)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp_name)
        raise
    _fsync_dir(path.parent)
    return path


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """Load a checkpoint with ``torch.load(weights_only=True)``.

    Raises:
        FileNotFoundError: ``path`` does not exist (the message names it).
        CheckpointError: the file is truncated, corrupt, not a dict, or holds objects that
            ``weights_only`` loading refuses (the message names the path and the cause).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises RuntimeError, EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be loaded"
            f" ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
        ) from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path} holds a {type(state).__name__}, not a dict")
    return state


_STEP_RE = re.compile(r"_(\d+)\.pth?$")


def latest_checkpoint(run_dir: str | Path, name: str = "last.pt") -> Path | None:
    """The checkpoint to resume from in ``run_dir``, or ``None``.

    ``run_dir/name`` if it exists; otherwise the step-numbered checkpoint (``*_<step>.pt`` or
    ``.pth``) with the largest step; otherwise ``None``. Temporary files of an interrupted
    save (hidden ``.*.tmp``) are never returned.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return None
    if (run_dir / name).is_file():
        return run_dir / name
    numbered = []
    for p in run_dir.iterdir():
        m = _STEP_RE.search(p.name)
        if m and p.is_file() and not p.name.startswith("."):
            numbered.append((int(m.group(1)), p.name, p))
    return max(numbered)[2] if numbered else None


# -- RNG state ---------------------------------------------------------------------------------
def capture_rng_state() -> dict[str, Any]:
    """Python, NumPy (global), torch CPU and current-CUDA-device RNG states (spec: resume).

    Everything is a tensor or a primitive, so it survives ``torch.load(weights_only=True)``.
    ``"cuda"`` is ``None`` when CUDA is unavailable or not initialised in this process.
    """
    py_version, py_words, py_gauss = random.getstate()
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np_state
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "state": torch.tensor(py_words, dtype=torch.int64),
            "gauss_next": None if py_gauss is None else float(py_gauss),
        },
        "numpy": {
            "bit_generator": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        # The current device only: one process drives one GPU, and touching the others would
        # create a CUDA context on every visible device.
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`capture_rng_state` returned (tensors may live on any device).

    The CUDA state (of the device that was current at capture) is restored into the current
    device; it is skipped when none was saved or CUDA is unavailable.
    """
    py = state["python"]
    random.setstate(
        (int(py["version"]), tuple(int(x) for x in py["state"].tolist()), py["gauss_next"])
    )
    npy = state["numpy"]
    np.random.set_state(
        (
            npy["bit_generator"],
            npy["keys"].cpu().numpy().astype(np.uint32),
            int(npy["pos"]),
            int(npy["has_gauss"]),
            float(npy["cached_gaussian"]),
        )
    )
    torch.set_rng_state(state["torch"].cpu().to(torch.uint8))
    cuda_state = state.get("cuda")
    if cuda_state is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(cuda_state.cpu().to(torch.uint8))
