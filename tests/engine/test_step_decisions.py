"""Between steps every process takes the same decisions (stop on a preemption signal, save a
checkpoint when its interval has passed): a save on one process only meets the others' next
gradient all-reduce at its barrier, and training hangs."""

import signal
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchrun import free_port

from mabn.engine import hooks, training
from mabn.engine.distributed import shutdown_distributed

WORLD, STEPS, PREEMPTED_AT = 2, 40, 33
TICK = {0: 10.0, 1: 7.0}  # seconds per step on each process's clock: the clocks drift apart


def test_a_checkpoint_is_due_when_any_process_finds_its_interval_passed(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(training.time, "monotonic", lambda: clock[0])
    timer = training.CheckpointTimer(minutes=2)
    assert not hooks.any_process(timer.expired(), "cpu")
    clock[0] += 121
    assert hooks.any_process(timer.expired(), "cpu")
    timer.reset()
    other_process = torch.tensor([1.0])  # another process's clock has passed its interval
    monkeypatch.setattr(hooks, "all_reduce_max", lambda flags: torch.maximum(flags, other_process))
    assert not timer.expired() and hooks.any_process(timer.expired(), "cpu")


def worker(rank, port):
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )  # a hang becomes an error
    clock = [0.0]
    training.time.monotonic = lambda: clock[0]
    preemption, timer = training.Preemption(), training.CheckpointTimer(minutes=1)
    try:
        decisions, own_clock_due = [], []
        for step in range(1, STEPS + 1):
            dist.all_reduce(torch.ones(3))  # the step's gradient all-reduce
            clock[0] += TICK[rank]
            if rank == 1 and step == PREEMPTED_AT:
                preemption.signum = signal.SIGTERM
            own_clock_due.append(timer.expired())
            # as the hooks: StopOnPreemption, then Checkpoints, each one all-reduce
            stop = hooks.any_process(preemption.signum is not None, "cpu")
            save = hooks.any_process(timer.expired(), "cpu")
            decisions.append((stop, save))
            if save:
                dist.barrier()  # as a checkpoint's save
                timer.reset()
            if stop:
                break
        everyone = [None] * WORLD
        dist.all_gather_object(everyone, (decisions, own_clock_due))
        (decisions_0, due_0), (decisions_1, due_1) = everyone
        assert due_0 != due_1, "the clocks did not drift apart: the test could not fail"
        assert decisions_0 == decisions_1
        assert len(decisions_0) == PREEMPTED_AT and decisions_0[-1][0]  # both stopped at the signal
        assert sum(save for _, save in decisions_0) >= 3
    finally:
        preemption.restore()
        shutdown_distributed()


@pytest.mark.multiprocess
def test_every_process_saves_and_stops_at_the_same_step_when_their_clocks_drift_apart():
    mp.spawn(worker, args=(free_port(),), nprocs=WORLD)
