"""The precision and the provenance of a run: the autocast dtype ``train.amp`` resolves to on
this device (and whether this CPU computes bf16 natively), the git commit and the machine a
summary records. The device, the process group and seeding are :mod:`brpg.distributed`'s.
"""

from __future__ import annotations

import os
import platform
import subprocess
from pathlib import Path

import torch

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


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or what :mod:`platform` knows elsewhere."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_id() -> str:
    """The CPU's vendor, family and model numbers (``/proc/cpuinfo``), e.g. ``AuthenticAMD
    family 25 model 17``, or ``""`` where they cannot be read. The model name alone can hide
    the generation (``AMD EPYC`` names both an AVX2 and an AVX-512 part), and fp32 kernels can
    round differently from one generation to the next."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if not line.strip():
                    break  # the first processor's block is enough
                key, _, value = line.partition(":")
                fields[key.strip()] = value.strip()
    except OSError:
        return ""
    parts = [fields.get("vendor_id", "")]
    parts += [
        f"{k.removeprefix('cpu ')} {fields[k]}" for k in ("cpu family", "model") if k in fields
    ]
    return " ".join(p for p in parts if p)


def machine_info(device: torch.device) -> dict[str, str | int | bool]:
    """A short description of the hardware a result was measured on.

    Besides the host, cores and threads it names the CPU model and generation (:func:`cpu_id`),
    the instruction set PyTorch's kernels use on it (``cpu_capability``: e.g. ``AVX2``,
    ``AVX512``) and whether it computes bf16 natively: fp32 kernels chosen by instruction set
    and tuned to the CPU may round differently, so two runs of one seed on two machines can end
    apart (tests/README.md).
    """
    info: dict[str, str | int | bool] = {
        "host": platform.node(),
        "cpu": platform.processor() or platform.machine(),
        "cpu_model": cpu_model(),
        "cpu_id": cpu_id(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "cpu_count": os.cpu_count() or 0,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info
