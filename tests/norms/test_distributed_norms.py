"""Two CPU processes (gloo) under DDP: batch-statistics norms use per-process statistics,
syncbn uses the statistics of the global batch, in forward and backward."""

import copy
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hydra_configs import ROOT
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchrun import free_port

import mabn
from mabn.engine.distributed import shutdown_distributed

pytestmark = pytest.mark.multiprocess
WORLD = 2
OPTIONS = {
    "bn": {"normalization_batch": 2},
    "brn": {"normalization_batch": 2},
    "gn": {"num_groups": 2},
    "mabn": {"normalization_batch": 2, "sma_window": 2, "warmup_iters": 0},
    "syncbn": {},
}


def local_data(rank):
    generator = torch.Generator().manual_seed(100 + rank)
    x = torch.randn(4, 4, 3, 3, generator=generator) * (1 + rank) + rank
    dy = torch.randn(4, 4, 3, 3, generator=generator)
    return x, dy


def worker(rank, port, name):
    # mabn.engine.distributed (imported above, before the group exists) lets
    # destroy_process_group free the group: see the comment there
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        check_statistics(rank, name)  # its DDP model is freed when it returns
        dist.barrier()  # no process tears down while another still communicates
    finally:
        shutdown_distributed()


def check_statistics(rank, name):
    torch.manual_seed(0)
    norm = mabn.build_norm(name, 4, **OPTIONS[name])
    norm.wired = True  # on its own, outside a model: nothing to wire
    reference = copy.deepcopy(norm)
    # broadcast_buffers=False: no process overwrites the others' statistics (as in training)
    model = DistributedDataParallel(nn.Sequential(norm), broadcast_buffers=False)
    x, dy = local_data(rank)
    x.requires_grad_(True)
    for _ in range(2):  # the second step reads the windows / running statistics of the first
        x.grad = None
        model(x).backward(dy)

    if name == "syncbn":  # reference: plain BN on the global batch
        data = [local_data(r) for r in range(WORLD)]
        xs = torch.cat([d[0] for d in data]).requires_grad_(True)
        ys = [
            torch.nn.functional.batch_norm(
                xs, reference.running_mean, reference.running_var, reference.weight, reference.bias, True, 0.1
            )
            for _ in range(2)
        ]
        reference.num_batches_tracked += 2
        xs.grad = None
        ys[-1].backward(torch.cat([d[1] for d in data]))
        expected_grad = xs.grad[rank * 4 : (rank + 1) * 4]
    else:  # reference: the same layer on this process's data alone
        xr = x.detach().clone().requires_grad_(True)
        for _ in range(2):
            xr.grad = None
            reference(xr).backward(dy)
        expected_grad = xr.grad
    torch.testing.assert_close(x.grad, expected_grad, rtol=1e-4, atol=1e-5)
    buffers = dict(norm.named_buffers())
    for (key, got), expected in zip(buffers.items(), reference.buffers()):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=key)

    # statistics differ between processes unless synced (so the checks above can fail)
    if buffers:
        mine = torch.cat([v.flatten().float() for v in buffers.values()])
        everyone = [torch.zeros_like(mine) for _ in range(WORLD)]
        dist.all_gather(everyone, mine)
        assert torch.equal(everyone[0], everyone[1]) == (name == "syncbn")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_ddp_statistics_are_per_process_except_syncbn(name):
    mp.spawn(worker, args=(free_port(), name), nprocs=WORLD)


TEARDOWN = """
import os, time, torch, torch.distributed as dist
from torch import nn
from mabn.engine.distributed import shutdown_distributed
dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1)
model = nn.parallel.DistributedDataParallel(nn.Conv2d(2, 2, 1))
model(torch.randn(2, 2, 3, 3)).sum().backward()
del model
shutdown_distributed()
def threads():
    names = []
    for task in os.listdir("/proc/self/task"):
        try:
            names.append(open(f"/proc/self/task/{{task}}/comm").read().strip())
        except FileNotFoundError:  # the thread ended while listed
            pass
    return sorted(names)
# the store's and gloo's threads end asynchronously after teardown: wait for them, boundedly
deadline = time.monotonic() + 30
while any("gloo" in n or "tcpstore" in n for n in threads()) and time.monotonic() < deadline:
    time.sleep(0.05)
print(threads())
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc to list threads")
def test_process_group_teardown_joins_the_gloo_threads_before_interpreter_exit():
    """The cause of the SIGABRT at exit: after DDP, destroy_process_group left the gloo worker
    threads running into interpreter shutdown (the group was pinned by function defaults).
    The threads end asynchronously after teardown, so the child waits for them (at most 30 s)
    before listing them: the symptom checked is threads that never end, and the exit status."""
    result = subprocess.run(
        [sys.executable, "-c", TEARDOWN.format(port=free_port())],
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    threads = result.stdout.strip().splitlines()[-1]
    assert "gloo" not in threads and "tcpstore" not in threads, threads
