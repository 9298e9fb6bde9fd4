"""Launching an entry point as 2 CPU processes with torchrun, as the DDP tests do."""

import os
import socket
import subprocess
import sys

from hydra_configs import ROOT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(script: str, *overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=2 script overrides`` (gloo on CPU, one thread per process)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={free_port()}",
            script,
            *overrides,
        ],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
