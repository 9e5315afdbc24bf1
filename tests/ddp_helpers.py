"""Launching 2-process gloo runs from the tests (one helper for every DDP test)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(
    args: list[str], nproc: int = 2, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=N <args>`` from the repository root,
    one thread per process, on a free loopback port; output captured as text."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={free_port()}",
        "--master_addr=127.0.0.1",
        *args,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
