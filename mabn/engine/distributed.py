"""One process per device, from torchrun (env://) or from SLURM tasks (submitit), the same path."""

from __future__ import annotations

import atexit
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Imported before any process group exists: its functions take ``group=group.WORLD`` as a
# default argument, so importing it later (DDP does, through torch.distributed._shard) pins
# the default group in those defaults for the life of the process. destroy_process_group()
# then cannot free the group, its gloo worker threads outlive the interpreter, and one that
# releases a collective's tensor during interpreter shutdown aborts the process ("terminate
# called without an active exception", SIGABRT) after the job has finished.
import torch.distributed.nn.functional


@dataclass(frozen=True)
class Distributed:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _export_slurm_environment() -> None:
    """Under ``srun`` with several tasks (e.g. hydra-submitit-launcher), export the env://
    variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's."""
    if "RANK" in os.environ or int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_distributed(device: str | None = None) -> Distributed:
    """Initialize torch.distributed when launched with several processes (nccl on CUDA, gloo
    on CPU) and pick this process's device."""
    _export_slurm_environment()
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            "nccl" if device.type == "cuda" else "gloo", init_method="env://", rank=rank, world_size=world_size
        )
        # one group for the process's life: the jobs of a multirun (torchrun ... -m) reuse it
        # (torch cannot set an env:// group up again in the same processes)
        atexit.register(shutdown_distributed)
    return Distributed(rank, world_size, local_rank, device)


def shutdown_distributed() -> None:
    """Destroy the process group while the interpreter is fully alive, after collecting what
    may still hold it (a DDP model left in a reference cycle), so that its worker threads are
    joined here and not during interpreter shutdown."""
    if dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over processes (identity without torch.distributed)."""
    if dist.is_initialized():
        dist.all_reduce(values)
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Maximum over processes (identity without torch.distributed)."""
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
