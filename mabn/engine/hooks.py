"""The training loop and every per-step behaviour as a hook, shared by every engine.

``train_loop`` is the classification and torchvision-detection loop; detectron2's trainer runs
the same hooks through its own hook list (``detectron2_trainer.AsDetectron2Hook``). A hook has
detectron2's ``HookBase`` methods and reads the run it serves (``mabn.engine.run.Run``) as
``self.run``, whose ``step`` counts the steps done: inside a step it is the step's index from 0,
after it the number of steps done. The run's hooks, in the order the rules need:
``Log`` (first, so that its step times leave the other hooks' work out), ``NonFiniteLoss``,
``Probe``, ``Progress``, ``Estimate``, ``StopOnPreemption`` (before evaluation: a preempted job saves
and stops at once), ``Evaluation`` and ``Checkpoints`` (after evaluation, so that every
evaluation is followed by a checkpoint).
"""

from __future__ import annotations

import json
import signal
import time

import torch
from tqdm import tqdm

from ..probes import BatchStatisticsProbe
from . import checkpoint as ckpt
from .distributed import all_reduce_max
from .training import CheckpointTimer, Preemption, check_finite, unwrap


class Hook:
    """A per-step behaviour (detectron2's ``HookBase`` methods); ``self.run`` is set by the loop."""

    run = None

    def before_train(self):
        pass

    def before_step(self):
        pass

    def after_backward(self):
        """After the step's backward, before the optimizer changes any weight."""

    def after_step(self):
        pass

    def after_train(self):
        """After the last step, and on any exception."""


def call(hooks: list[Hook], method: str) -> None:
    for hook in hooks:
        getattr(hook, method)()


def train_loop(run, hooks: list[Hook], batches) -> None:
    """Train ``run`` from ``run.step`` to ``run.stop_step`` on ``batches`` (an iterator), its
    ``train_step(batch, after_backward)`` one step, with ``hooks`` around each step."""
    for hook in hooks:
        hook.run = run
    call(hooks, "before_train")
    try:
        while run.step < run.stop_step:
            call(hooks, "before_step")
            run.train_step(next(batches), lambda: call(hooks, "after_backward"))
            call(hooks, "after_step")
    finally:
        call(hooks, "after_train")


def any_process(flag: bool, device) -> bool:
    """Whether ``flag`` is set on any process, in one all-reduce: every process takes the same
    decision at the same step (a save on one process only would meet the others' gradient
    all-reduce at its barrier, a hang)."""
    return bool(all_reduce_max(torch.tensor([float(flag)], device=device)).item())


class Log(Hook):
    """Every ``log_every_steps`` and at the last step: the step's loss and its parts, the lr
    and the training images per second (main process: metrics.jsonl, W&B, stdout). The speed
    counts the steps since the run (re)started and their time alone: evaluation, checkpoints
    and the other hooks' work between steps are left out."""

    def before_train(self):
        self.first_step, self.busy = self.run.step, 0.0

    def before_step(self):
        self.tic = time.perf_counter()

    def after_step(self):
        run = self.run
        self.busy += time.perf_counter() - self.tic
        if run.log_due():
            run.images_per_second = (run.step - self.first_step) * run.images_per_step / max(self.busy, 1e-9)
            values = {k: v.item() if torch.is_tensor(v) else v for k, v in run.last_extras.items()}
            record = {"train/loss": run.last_loss.item(), **values, "train/lr": run.scheduler.get_last_lr()[0]}
            run.logger.log(record | {"train/images_per_second": run.images_per_second}, run.step)


class NonFiniteLoss(Hook):
    """Stop on a NaN/inf loss before it reaches the weights or a checkpoint (the last good
    checkpoint stays; what the backward wrote in buffers dies with the process)."""

    def after_backward(self):
        check_finite(self.run.last_loss, self.run.step, self.run.checkpoint_path)


class Probe(Hook):
    """The batch-statistics probe (``mabn.probes``) of the config's ``probe`` group, on the main
    process: it records the steps it is due at, appended to probes.jsonl after each step (a
    resumed run repeats some steps: readers keep the last record of each step)."""

    def __init__(self, probe_cfg):
        self.cfg, self.probe = probe_cfg, None

    def before_train(self):
        cfg, run = self.cfg, self.run
        self.probe = BatchStatisticsProbe(
            unwrap(run.model),
            cfg.layers,
            cfg.channels,
            cfg.every,
            [b for b in cfg.batches if b <= run.per_device_batch],
        ).attach()

    def before_step(self):
        self.probe.step(self.run.step + 1)

    def after_step(self):
        if self.probe.records:
            with open(self.run.run_dir / "probes.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.probe.records)
            self.probe.records.clear()


class Progress(Hook):
    """A progress bar with the last logged loss (main process; closed on errors too)."""

    def before_train(self):
        run = self.run
        self.bar = tqdm(
            total=run.stop_step,
            initial=run.step,
            disable=not run.env.is_main,
            desc=run.cfg.run_name,
            mininterval=5,
            dynamic_ncols=True,
        )

    def after_step(self):
        self.bar.update()
        if self.run.log_due():
            self.bar.set_postfix(loss=f"{self.run.last_loss.item():.3f}")

    def after_train(self):
        self.bar.close()


class Estimate(Hook):
    """After ``WINDOW[1]`` steps, the speed measured over the steps from ``WINDOW[0]`` (the first
    compile the kernels and warm the caches) and the time the rest of the run needs."""

    WINDOW = (5, 25)

    def before_train(self):
        self.first_step, self.window_start = self.run.step, None

    def after_step(self):
        run, (first, last) = self.run, self.WINDOW
        done = run.step - self.first_step
        if done == first:
            self.window_start = time.perf_counter()
        elif done == last and self.window_start is not None and run.env.is_main:
            per_step = (time.perf_counter() - self.window_start) / (last - first)
            left = run.stop_step - run.step
            print(
                f"\n[estimate] {per_step * 1000:.0f} ms per step over steps {self.first_step + first + 1}-{run.step} "
                f"on this machine: about {left * per_step / 60:.1f} min for the {left} steps left, evaluation aside",
                flush=True,
            )


class StopOnPreemption(Hook):
    """SIGTERM, SIGUSR1 or SIGUSR2 (``training.Preemption``), or ``debug.preempt_at_step``, on any
    process: save a checkpoint and exit, so that the relaunched or requeued job resumes there."""

    def before_train(self):
        self.signals = Preemption()

    def after_step(self):
        run = self.run
        if run.cfg.debug.preempt_at_step == run.step:
            self.signals.signum = signal.SIGTERM
        if any_process(self.signals.signum is not None, run.env.device):
            run.save()
            self.signals.stop()

    def after_train(self):
        self.signals.restore()


class Evaluation(Hook):
    """Evaluate (and log) where the run says it is due (``Run.evaluates_now``: its engine's
    interval and the last step); the last metrics are the run's ``metrics``. The RNG states are
    put back after it (a loader that draws its seed, detectron2's), so that a run trains the
    same with or without evaluations between its steps, and resumes so."""

    def after_step(self):
        run = self.run
        if run.evaluates_now():
            states = ckpt.rng_states()
            run.metrics = run.evaluate()
            ckpt.restore_rng_states(states)
            run.logger.log(run.metrics, run.step)


class Checkpoints(Hook):
    """A checkpoint after every evaluation and every ``checkpoint_every_minutes`` of wall time
    (by any process's clock: one decision for all)."""

    def before_train(self):
        self.timer = CheckpointTimer(self.run.cfg.checkpoint_every_minutes)

    def after_step(self):
        run = self.run
        if any_process(self.timer.expired(), run.env.device) or run.evaluates_now():
            run.save()
            self.timer.reset()
