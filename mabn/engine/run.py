"""A training run in a directory, shared by classification and detection: the loop, AMP,
checkpoints and exact resume, preemption, logging and the final summary. Subclasses build
the model and data and define the loss, the evaluation and the summary."""

from __future__ import annotations

import json
import multiprocessing
import signal
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader
from tqdm import tqdm

from .. import fused
from ..config import ConfigError, NormSpec, first_line, resolved
from ..probes import BatchStatisticsProbe
from ..provenance import provenance
from ..schedules import schedule_norms
from . import checkpoint as ckpt
from .distributed import barrier, init_distributed
from .loggers import RunLogger
from .sampling import EpochSampler, SeededSamples
from .training import (
    CheckpointTimer,
    Preemption,
    between_steps,
    build_sgd,
    check_finite,
    check_finite_weights,
    lr_factor,
    prepare_model,
    unwrap,
)

# config keys a resumed run may change (they do not change what is computed)
OPERATIONAL_KEYS = (
    "debug",
    "workers",
    "threads",
    "log_every_steps",
    "checkpoint_every_minutes",
    "logger",
    "device",
    "kept_runs",
    "stop_at_step",  # where it stops, not what it computes: a stopped run continues without it
)


def run_identity(config: dict) -> dict:
    """The part of a resolved config that a resumed run must share with its checkpoint."""
    return {k: v for k, v in config.items() if k not in OPERATIONAL_KEYS}


def load_run_checkpoint(run_dir: Path, cfg) -> dict | None:
    """The run directory's checkpoint, checked to come from this config (None: a new run).
    A detectron2 run's checkpoint from before the one format (its step under ``iteration``)
    reads as the format's."""
    state = ckpt.load_checkpoint(run_dir)
    if state is not None and run_identity(state["config"]) != run_identity(resolved(cfg)):
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different config: use another run "
            "directory (hydra.run.dir=...) or delete it to start over"
        )
    if state is not None and "iteration" in state:
        state["step"] = state.pop("iteration")
    return state


def save_run(run, step: int, scaler) -> None:
    """Write ``run``'s checkpoint after ``step`` (both engines: one format, one writer): weights,
    optimizer, lr schedule, AMP scaler, RNG states, the config and the W&B run; atomically, the
    previous one kept, on the main process; refused if the weights are not finite."""
    path = ckpt.checkpoint_path(run.run_dir)
    check_finite_weights(run.model, step, path)
    if run.env.is_main:
        state = {
            "model": unwrap(run.model).state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "scheduler": run.scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "step": step,
            "rng": ckpt.rng_states(),
            "config": resolved(run.cfg),
            "images_per_second": run.images_per_second,
            "wandb_run_id": run.wandb_run_id,
            "provenance": provenance(run.env.device),
        }
        ckpt.save_atomic(state, path, keep_previous=True)
    barrier()


def resume_run(run, restore) -> bool:
    """Load ``run``'s checkpoint (``load_run_checkpoint``) into its model, optimizer and lr
    schedule, and its step, speed and W&B run, then ``restore(checkpoint)``: the engine's AMP
    scaler and RNG states, restored when it has built what draws from them. False: a new run."""
    state = load_run_checkpoint(run.run_dir, run.cfg)
    if state is None:
        return False
    unwrap(run.model).load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.images_per_second = state["step"], state["images_per_second"]
    run.wandb_run_id = state["wandb_run_id"]
    restore(state)
    return True


class StepRules:
    """What both engines decide after each training step, in one place: log (every
    ``log_every_steps`` and at ``last_step``), stop (a preemption signal on any process, or
    ``debug.preempt_at_step``: checkpoint, then exit), evaluate (when the engine says it is due;
    then checkpoint) and checkpoint (every ``checkpoint_every_minutes``)."""

    def __init__(self, cfg, preemption: Preemption, last_step: int, device):
        self.cfg, self.preemption, self.last_step, self.device = cfg, preemption, last_step, device
        self.checkpoints = CheckpointTimer(cfg.checkpoint_every_minutes)

    def log_due(self, step: int) -> bool:
        return step % self.cfg.log_every_steps == 0 or step == self.last_step

    def after_step(self, step: int, evaluation_due: bool, evaluate, save) -> None:
        """``evaluate()`` (it logs) if ``evaluation_due``; ``save()`` where a checkpoint is due."""
        if self.cfg.debug.preempt_at_step == step:
            self.preemption.signum = signal.SIGTERM
        stop, save_due = between_steps(self.preemption, self.checkpoints, self.device)
        if stop:
            save()
            self.preemption.stop()
        if evaluation_due:
            evaluate()
        if evaluation_due or save_due:
            save()
            self.checkpoints.reset()


def worker_start_method() -> str | None:
    """How loader workers start: the interpreter's way, unless a launcher replaced it (joblib's
    loky workers, hydra/launcher=local_parallel, have their own, which cannot start them)."""
    methods = multiprocessing.get_all_start_methods()  # the platform's default first
    return None if multiprocessing.get_start_method(allow_none=True) in (None, *methods) else methods[0]


class TrainingRun:
    """One run in ``run_dir``; relaunching in the same directory resumes it exactly."""

    collate_fn = None

    def build(self):
        """(model, train_set, val_set) from ``self.cfg``."""
        raise NotImplementedError

    def schedule(self) -> tuple[int, list[int], int]:
        """(total steps, lr milestones in steps, warm-up steps); ``steps_per_epoch`` is known."""
        raise NotImplementedError

    def loss(self, batch) -> tuple[torch.Tensor, dict]:
        """The training loss of a batch (on ``self.env.device``) and extra values to log."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def evaluation_due(self) -> bool:
        """Whether to evaluate (and checkpoint) after the current step, besides the last."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> dict:
        """The headline results for summary.json (the config is added)."""
        raise NotImplementedError

    def __init__(self, cfg, run_dir: str | Path, per_device_batch: int):
        self.cfg, self.run_dir, self.per_device_batch = cfg, Path(run_dir), per_device_batch
        self.norm = NormSpec.from_config(cfg.norm)  # the norm group, read once
        if cfg.get("threads"):
            torch.set_num_threads(cfg.threads)
        self.env = init_distributed(cfg.device)
        torch.manual_seed(cfg.seed)
        try:
            model, train_set, self.val_set = self.build()
        except (FileNotFoundError, ValueError, TypeError, OmegaConfBaseException) as error:
            raise ConfigError(first_line(error, 1000)) from error
        self.train_set = SeededSamples(train_set, cfg.seed)
        self.model = prepare_model(model, self.norm, self.env, cfg.channels_last)
        self.amp = cfg.amp and self.env.device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        images_per_step = per_device_batch * self.env.world_size
        self.optimizer = build_sgd(self.model, cfg.optim, images_per_step, self.norm.gamma_lr_factor)
        self.sampler = EpochSampler(
            len(train_set), per_device_batch, True, cfg.seed, self.env.rank, self.env.world_size
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({len(train_set)} images) is smaller than one step of "
                f"{images_per_step} images: use more data or a smaller batch"
            )
        self.total_steps, milestones, warmup = self.schedule()
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.stop_step = stop_step(cfg, self.total_steps)
        self.norm_schedule = schedule_norms(unwrap(self.model), self.total_steps, self.norm)
        fused.choose_for_run(self.total_steps, cfg.get("fused_min_steps", 0))  # eager for short runs
        self.probe = self._probe(cfg.get("probe"))
        lr = cfg.optim.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, lr.name, milestones, lr.gamma, warmup, lr.warmup_factor),
        )
        self.step = 0
        self.images_per_second = 0.0
        self.wandb_run_id = None

    def _probe(self, probe_cfg) -> BatchStatisticsProbe | None:
        """The statistics probe of ``probe`` (main process; off when ``probe.every`` is 0)."""
        if not probe_cfg or not probe_cfg.every or not self.env.is_main:
            return None
        return BatchStatisticsProbe(
            unwrap(self.model),
            probe_cfg.layers,
            probe_cfg.channels,
            probe_cfg.every,
            [b for b in probe_cfg.batches if b <= self.per_device_batch],
        ).attach()

    def write_probe_records(self) -> None:
        """Append the probe's new records to probes.jsonl (a resumed run repeats some steps:
        readers keep the last record of each step)."""
        if self.probe and self.probe.records:
            with open(self.run_dir / "probes.jsonl", "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in self.probe.records)
            self.probe.records.clear()

    # -- checkpoints -------------------------------------------------------------------
    def save(self) -> None:
        save_run(self, self.step, self.scaler)

    def resume(self) -> bool:
        return resume_run(self, self.restore_states)

    def restore_states(self, state: dict) -> None:
        self.scaler.load_state_dict(state["scaler"])
        ckpt.restore_rng_states(state["rng"])

    # -- training ----------------------------------------------------------------------
    def loader(self, dataset, sampler) -> DataLoader:
        """Batches in the sampler's order. The loader's own generator keeps it from drawing
        from the global RNG (which the model's sampling uses), wherever a run resumes."""
        return DataLoader(
            dataset,
            batch_size=self.per_device_batch,
            sampler=sampler,
            num_workers=self.cfg.workers,
            pin_memory=self.env.device.type == "cuda",
            drop_last=sampler.drop_last,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            multiprocessing_context=worker_start_method() if self.cfg.workers else None,
        )

    def val_sampler(self) -> EpochSampler:
        """The validation set in order, split over the processes, nothing dropped."""
        return EpochSampler(
            len(self.val_set), self.per_device_batch, False, 0, self.env.rank, self.env.world_size, drop_last=False
        )

    def train_step(self, batch) -> tuple[torch.Tensor, dict]:
        with torch.autocast(self.env.device.type, enabled=self.amp):
            loss, extras = self.loss(batch)
        check_finite(loss.detach(), self.step, ckpt.checkpoint_path(self.run_dir))
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return loss.detach(), extras

    def fit(self, logger: RunLogger, preemption: Preemption) -> dict:
        """Train to ``stop_step`` and return the final metrics; on a preemption signal,
        save a checkpoint and exit (``Preemption.stop``)."""
        cfg = self.cfg
        self.model.train()
        metrics = {}
        with tqdm(
            total=self.stop_step,
            initial=self.step,
            disable=not self.env.is_main,
            desc=cfg.run_name,
            mininterval=5,
            dynamic_ncols=True,
        ) as progress:  # closed on errors too
            rules = StepRules(cfg, preemption, self.stop_step, self.env.device)
            first_step, window_start = self.step, None

            def evaluate():
                nonlocal metrics
                metrics = self.evaluate()
                logger.log(metrics, self.step)

            while self.step < self.stop_step:
                epoch, start_batch = divmod(self.step, self.steps_per_epoch)
                self.sampler.set_epoch(epoch, start_batch)
                self.train_set.set_epoch(epoch)
                tic, images_seen = time.perf_counter(), 0
                for batch in self.loader(self.train_set, self.sampler):
                    if self.probe:
                        self.probe.step(self.step + 1)
                    loss, extras = self.train_step(batch)
                    self.write_probe_records()
                    images_seen += self.per_device_batch * self.env.world_size
                    progress.update()
                    if self.step - first_step == ESTIMATE_AFTER[0]:
                        window_start = time.perf_counter()
                    elif self.step - first_step == ESTIMATE_AFTER[1] and window_start is not None:
                        announce_estimate(
                            self.step, first_step, time.perf_counter() - window_start, self.stop_step, self.env
                        )
                    if rules.log_due(self.step):
                        self.images_per_second = images_seen / (time.perf_counter() - tic)
                        logger.log(
                            {
                                "train/loss": loss.item(),
                                **{k: float(v) for k, v in extras.items()},
                                "train/lr": self.scheduler.get_last_lr()[0],
                                "train/images_per_second": self.images_per_second,
                                "epoch": epoch,
                            },
                            self.step,
                        )
                        progress.set_postfix(loss=f"{loss.item():.3f}")
                    due = self.step == self.stop_step or self.evaluation_due()
                    rules.after_step(self.step, due, evaluate, self.save)
                    if self.step == self.stop_step:
                        break
        return metrics or self.evaluate()


def stop_step(cfg, total_steps: int) -> int:
    """The step a run of ``total_steps`` trains to: ``stop_at_step`` where set, every schedule (lr,
    the norms' warm-ups) still that of ``total_steps``, so a shortened rerun of a kept run is the
    same run cut at that step; its end otherwise."""
    stop = cfg.get("stop_at_step")
    return min(total_steps, stop) if stop else total_steps


def summary_keys(cfg, norm: NormSpec, env, norm_schedule: dict) -> dict:
    """The fields a run's summary is grouped and paired by in the study reports, and its provenance."""
    return {
        "world_size": env.world_size,
        "norm": norm.name,
        "label": norm.display_name,
        "batch": cfg.batch,
        "seed": cfg.seed,
        "norm_schedule": norm_schedule,
        "provenance": provenance(env.device),
    }


def announce_start(
    cfg, norm: NormSpec, total_steps: int, step: int, env, run_dir: Path, estimate: str | None = None
) -> None:
    """One line saying what the run does, which norm kernels it uses (``mabn.fused`` mode), where
    its folder is and when its time estimate comes (``estimate``: where else it comes from);
    main process."""
    if env.is_main:
        label = norm.display_name
        model = OmegaConf.select(cfg, "model.name") or OmegaConf.select(cfg, "detector.name")
        per_device = OmegaConf.select(cfg, "per_device_batch", default=cfg.batch)
        if estimate is None:
            estimate = (
                f"a time estimate follows after {ESTIMATE_AFTER[1]} steps"
                if total_steps - step > ESTIMATE_AFTER[1]
                else "a short run"
            )
        print(
            f"[{cfg.task}] {cfg.data.name} / {model} / norm {label} at normalization batch "
            f"{cfg.normalization_batch or 'all'} (per-device batch {per_device}, {env.world_size} "
            f"process(es) on {env.device.type}): steps {step + 1}-{total_steps}, "
            f"{KERNELS[fused.mode()]} BN/BRN/MABN kernels, run folder {run_dir}; {estimate}",
            flush=True,
        )


KERNELS = {"0": "eager", "1": "compiled", "dynamic": "compiled (dynamic shapes)"}


def announce_end(summary: dict, summary_path: Path, env) -> None:
    """One line with the headline metrics and the summary's path (main process)."""
    if env.is_main:
        keys = [k for k in ("top1_error", "top5_error", "box_AP", "mask_AP") if isinstance(summary.get(k), float)]
        print("[done] " + ", ".join(f"{k} {summary[k]:.2f}" for k in keys) + f"; summary: {summary_path}", flush=True)


# (first, last) step of the window whose speed gives the time estimate: after the first steps,
# which compile the kernels and warm the caches
ESTIMATE_AFTER = (5, 25)


def announce_estimate(step: int, first_step: int, seconds: float, total_steps: int, env) -> None:
    """The measured speed over the estimate window and the time the rest of the run needs."""
    if env.is_main:
        per_step = seconds / (ESTIMATE_AFTER[1] - ESTIMATE_AFTER[0])
        left = (total_steps - step) * per_step
        print(
            f"\n[estimate] {per_step * 1000:.0f} ms per step over steps "
            f"{first_step + ESTIMATE_AFTER[0] + 1}-{step} on this "
            f"machine: about {left / 60:.1f} min for the {total_steps - step} steps left, evaluation aside",
            flush=True,
        )


def start_run(run) -> tuple[dict | None, RunLogger | None]:
    """Resume ``run`` from its folder (both engines): (its summary, None) where it finished there
    already; else (None, its logger), having said where it resumes."""
    resumed = run.resume()
    summary_path = run.run_dir / "summary.json"
    if resumed and run.step >= run.stop_step and summary_path.is_file():
        return json.loads(summary_path.read_text()), None
    cfg, env = run.cfg, run.env
    logger = RunLogger(
        run.run_dir, env.is_main, wandb_options(cfg, run.run_dir), run_record(cfg, env), run.wandb_run_id
    )
    run.wandb_run_id = logger.run_id
    if resumed and env.is_main:
        print(f"resumed from step {run.step} of {run.stop_step} ({ckpt.checkpoint_path(run.run_dir)})", flush=True)
    return None, logger


def end_run(run, logger: RunLogger, metrics: dict, summary: dict) -> dict:
    """Log the final metrics and the summary, write model_final.pt and summary.json (both
    engines); returns the summary, with the config."""
    logger.log({f"final/{k}": v for k, v in metrics.items()}, run.step)
    logger.summary({k: v for k, v in summary.items() if isinstance(v, float)})
    summary["config"] = resolved(run.cfg)
    summary_path = run.run_dir / "summary.json"
    if run.env.is_main:
        ckpt.save_atomic(unwrap(run.model).state_dict(), run.run_dir / "model_final.pt")
        summary_path.write_text(json.dumps(summary, indent=2))
    announce_end(summary, summary_path, run.env)
    return summary


def run_training(run_class, cfg, run_dir: str | Path) -> dict:
    """Run (or resume) a ``run_class`` run in ``run_dir``; write summary.json and return it."""
    run = run_class(cfg, run_dir)
    finished, logger = start_run(run)
    if finished is not None:
        return finished
    preemption = Preemption()
    announce_start(cfg, run.norm, run.stop_step, run.step, run.env, run.run_dir)
    try:
        metrics = run.fit(logger, preemption)
        summary = {
            **run.summary(metrics),
            "images_per_second": run.images_per_second,
            "steps": run.step,
            **summary_keys(cfg, run.norm, run.env, run.norm_schedule),
        }
        return end_run(run, logger, metrics, summary)
    finally:
        preemption.restore()
        logger.finish()


def run_record(cfg, env) -> dict:
    """What a run's logger records as its config: the resolved config and the provenance."""
    return resolved(cfg) | {"provenance": provenance(env.device)}


def wandb_options(cfg, run_dir) -> dict | None:
    """W&B init options from ``logger`` (None: W&B off); name, group and tags from the run. The
    group is ``logger.group``, else the sweep's folder (``<data>-<model>``: a sweep's runs share it)."""
    if cfg.logger.name != "wandb":
        return None
    return {
        "project": cfg.logger.project,
        "entity": cfg.logger.entity,
        "mode": cfg.logger.mode,
        "group": cfg.logger.group or Path(run_dir).resolve().parent.name,
        "job_type": cfg.task,
        "name": cfg.run_name,
        "tags": [f"norm={cfg.norm.name}", f"batch={cfg.batch}", f"seed={cfg.seed}", *cfg.logger.tags],
    }
