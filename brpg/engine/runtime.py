"""Run-time environment: device choice, distributed set-up, seeding, provenance.

Everything here is about *where* a run executes, not *what* it computes, so the training
step itself stays device-agnostic.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    """Rank and world size of this process (1 process when not launched by torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def resolve_device(name: str) -> torch.device:
    """Map ``auto|cpu|cuda|cuda:N|mps`` to a device; ``auto`` prefers CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            f"train.device={name!r} but CUDA is not available here; use 'cpu' or 'auto'"
        )
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device


def is_distributed() -> bool:
    """Whether more than one process trains (collectives are needed to keep ranks equal)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def init_distributed(device: torch.device) -> DistInfo:
    """Initialise ``torch.distributed`` from torchrun's environment variables, if present.

    NCCL on CUDA, gloo otherwise (the 2-process CPU test uses gloo).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local_rank)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


NATIVE_BF16_ENV = "BRPG_NATIVE_BF16"


def cpu_has_native_bf16() -> bool:
    """True if this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16, read from
    ``/proc/cpuinfo``); False elsewhere, including every non-Linux host.

    ``BRPG_NATIVE_BF16=1`` (or ``0``) overrides the answer. It is for the tests: a machine
    without native bf16 can then check what ``train.amp: auto`` does on one that has it, and
    the other way round (``make test`` runs the precision tests both ways; tests/README.md).
    """
    forced = os.environ.get(NATIVE_BF16_ENV, "")
    if forced:
        if forced not in ("0", "1"):
            raise ValueError(
                f"{NATIVE_BF16_ENV}={forced!r}: use 1 (native bf16), 0 (none) or unset"
            )
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def amp_dtype(setting: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``train.amp`` (``None``: fp32).

    * ``auto``: bf16 on CUDA (fp16 where bf16 is unsupported); on a CPU bf16 only where it
      runs natively (:func:`cpu_has_native_bf16`): without AVX512-BF16/AMX, oneDNN emulates
      it and a DigitScenes step got ~6x *slower* (measured on an AVX2 EPYC), so such CPUs
      stay in fp32; fp32 on MPS.
    * ``bf16``: bf16 autocast on CUDA and on any CPU (slow where not native); fp32 on MPS.
    * ``fp16``: fp16 autocast + GradScaler on CUDA, the official code's setting; fp32 elsewhere.
    * ``off``: fp32 everywhere.
    """
    if setting not in ("auto", "off", "bf16", "fp16"):
        raise ValueError(f"train.amp={setting!r}: use one of auto, off, bf16, fp16")
    if setting == "off" or device.type not in ("cuda", "cpu"):
        return None
    if device.type == "cpu":
        if setting == "fp16":  # a CUDA preset's setting, e.g. in a CPU smoke run
            return None
        if setting == "bf16" or cpu_has_native_bf16():
            return torch.bfloat16
        return None
    if setting in ("auto", "bf16"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16


def dtype_name(amp: torch.dtype | None) -> str:
    """``"fp32"`` for no autocast, else ``"bfloat16"`` / ``"float16"`` (for run summaries)."""
    return "fp32" if amp is None else str(amp).removeprefix("torch.")


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit of the checkout (with ``-dirty`` if modified), or ``unknown``."""
    cwd = Path(cwd) if cwd else Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine_info(device: torch.device) -> dict[str, str | int]:
    """A short description of the hardware a result was measured on."""
    info: dict[str, str | int] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel and ``torch.compile`` wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive inter-process lock on the file ``.<name>.lock`` beside ``path``.

    Two processes that build the same thing (DDP ranks generating DigitScenes, two notebooks
    training the same demo run) take turns: one builds, the other waits and then finds it
    built. A no-op where there is no ``fcntl`` (not POSIX).
    """
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.parent / f".{path.name}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
