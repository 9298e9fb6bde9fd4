"""A training run in a directory, shared by every engine (``Run``): checkpoints and exact
resume, the hooks around each step, the start and the final summary; and the run that the
classification and torchvision-detection engines train with ``train_loop`` (``TrainingRun``)."""

from __future__ import annotations

import json
import multiprocessing
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.utils.data import DataLoader

from ..config import ConfigError, NormSpec, accumulate_steps, first_line, resolved
from ..norms import fused
from ..norms.accumulation import set_micro_batch
from ..provenance import provenance
from ..schedules import schedule_norms
from . import checkpoint as ckpt
from . import hooks
from .distributed import barrier, init_distributed
from .hooks import Hook, train_loop
from .loggers import RunLogger
from .sampling import EpochSampler, SeededSamples
from .training import build_sgd, check_finite_weights, lr_factor, prepare_model, unwrap

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


# keys added to the configs since runs were first checkpointed, at the values that compute what a
# checkpoint without them computed: such a checkpoint still resumes
ADDED_KEYS = {"accumulate_steps": 1, "precise_stats": {"batches": 0}}


def run_identity(config: dict) -> dict:
    """The part of a resolved config that a resumed run must share with its checkpoint."""
    return {
        k: v for k, v in config.items() if k not in OPERATIONAL_KEYS and not (k in ADDED_KEYS and ADDED_KEYS[k] == v)
    }


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


class Run:
    """What every engine's run shares: its folder, checkpoints and exact resume, the hooks around
    each step, and the start and end (logger, announcements, summary.json, model_final.pt).

    An engine's run sets ``cfg``, ``run_dir``, ``env``, ``norm`` (the ``NormSpec``), ``model``,
    ``optimizer``, ``scheduler``, ``scaler``, ``amp``, ``per_device_batch`` (images per forward),
    ``accumulate_steps``, ``images_per_step``, ``total_steps``, ``stop_step`` and
    ``norm_schedule``, and defines ``fit`` (train with ``hooks()`` to ``stop_step``, each step
    through ``optimizer_step``), ``evaluate``, ``evaluation_due`` and ``summary``. While it
    trains, ``last_loss`` and ``last_extras`` hold the current step's loss and its parts."""

    step, images_per_second, wandb_run_id, logger = 0, 0.0, None, None
    last_loss, last_extras = None, {}

    def fit(self) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict:
        raise NotImplementedError

    def evaluation_due(self) -> bool:
        """Whether to evaluate (and checkpoint) after the current step, besides the last."""
        raise NotImplementedError

    def summary(self, metrics: dict) -> dict:
        """The engine's headline results for summary.json."""
        raise NotImplementedError

    def final_metrics(self) -> dict:
        """Metrics only the end of a run computes, beside the last evaluation's (none here)."""
        return {}

    @property
    def checkpoint_path(self) -> Path:
        return ckpt.checkpoint_path(self.run_dir)

    def evaluates_now(self) -> bool:
        return self.step == self.stop_step or self.evaluation_due()

    def log_due(self) -> bool:
        return self.step % self.cfg.log_every_steps == 0 or self.step == self.stop_step

    def hooks(self) -> list[Hook]:
        """Every per-step behaviour, in the order the rules need (``mabn.engine.hooks``)."""
        probe = self.cfg.get("probe")
        return [
            hooks.Log(),
            hooks.NonFiniteLoss(),
            *([hooks.Probe(probe)] if probe and probe.every and self.env.is_main else []),
            hooks.Progress(),
            hooks.Estimate(),
            hooks.StopOnPreemption(),
            hooks.Evaluation(),
            hooks.Checkpoints(),
        ]

    def optimizer_step(self, micro_batches: list, loss_of, after_backward) -> None:
        """One optimizer step on the step's ``micro_batches`` (``accumulate_steps`` of them, in
        order; ``slices`` makes them): each micro-batch's loss (``loss_of(micro_batch) -> (loss,
        extras)``, under autocast) is back-propagated divided by their number, the layers told which micro-batch runs
        (``mabn.set_micro_batch``) and DDP's gradient all-reduce left to the last; then
        ``after_backward()`` and the optimizer. ``last_loss`` and ``last_extras`` are the means
        over the micro-batches."""
        k = self.accumulate_steps
        self.optimizer.zero_grad(set_to_none=True)
        losses, parts = [], []
        for index, micro_batch in enumerate(micro_batches):
            if k > 1:
                set_micro_batch(unwrap(self.model), index, k)
            with torch.autocast(self.env.device.type, enabled=self.amp):
                loss, extras = loss_of(micro_batch)
            last = index == k - 1
            with self.model.no_sync() if not last and hasattr(self.model, "no_sync") else nullcontext():
                self.scaler.scale(loss if k == 1 else loss / k).backward()
            losses.append(loss.detach())
            parts.append(extras)
        self.last_loss = losses[0] if k == 1 else torch.stack(losses).mean()
        self.last_extras = parts[0] if k == 1 else {key: sum(p[key] for p in parts) / k for key in parts[0]}
        after_backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def save(self) -> None:
        """Write the checkpoint after the current step (every engine: one format, one writer):
        weights, optimizer, lr schedule, AMP scaler, RNG states, the config and the W&B run;
        atomically, the previous one kept, on the main process; refused if the weights are not
        finite."""
        check_finite_weights(self.model, self.step, self.checkpoint_path)
        if self.env.is_main:
            state = {
                "model": unwrap(self.model).state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict(),
                "step": self.step,
                "rng": ckpt.rng_states(),
                "config": resolved(self.cfg),
                "images_per_second": self.images_per_second,
                "wandb_run_id": self.wandb_run_id,
                "provenance": provenance(self.env.device),
            }
            ckpt.save_atomic(state, self.checkpoint_path, keep_previous=True)
        barrier()

    def resume(self) -> bool:
        """Load the folder's checkpoint (``load_run_checkpoint``) into the model, optimizer, lr
        schedule and AMP scaler, with the step, speed and W&B run, then ``restore_rng``. False: a
        new run."""
        state = load_run_checkpoint(self.run_dir, self.cfg)
        if state is None:
            return False
        unwrap(self.model).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.images_per_second = state["step"], state["images_per_second"]
        self.wandb_run_id = state["wandb_run_id"]
        self.restore_rng(state["rng"])
        return True

    def restore_rng(self, states: dict) -> None:
        """The checkpoint's RNG states, restored now (an engine whose setup still draws from them
        restores them later)."""
        ckpt.restore_rng_states(states)

    def execute(self) -> dict:
        """Train (or resume) to ``stop_step``, then write summary.json and model_final.pt and
        return the summary; a run that finished in its folder already returns its summary."""
        resumed = self.resume()
        summary_path = self.run_dir / "summary.json"
        if resumed and self.step >= self.stop_step and summary_path.is_file():
            return json.loads(summary_path.read_text())
        cfg, env = self.cfg, self.env
        self.logger = RunLogger(
            self.run_dir, env.is_main, wandb_options(cfg, self.run_dir), run_record(cfg, env), self.wandb_run_id
        )
        self.wandb_run_id, self.metrics = self.logger.run_id, {}
        try:
            if resumed and env.is_main:
                print(f"resumed from step {self.step} of {self.stop_step} ({self.checkpoint_path})", flush=True)
            announce_start(cfg, self.norm, self.stop_step, self.step, env, self.run_dir)
            self.fit()
            if not self.metrics:  # resumed after its last step's checkpoint
                self.metrics = self.evaluate()
                self.logger.log(self.metrics, self.step)
            return self.end()
        finally:
            self.logger.finish()

    def end(self) -> dict:
        """Log the final metrics and the summary, write model_final.pt and summary.json; returns
        the summary, with the config."""
        metrics = self.metrics = {**self.metrics, **self.final_metrics()}
        summary = {
            **self.summary(metrics),
            "images_per_second": self.images_per_second,
            "images_per_step": self.images_per_step,
            "steps": self.step,
            **summary_keys(self.cfg, self.norm, self.env, self.norm_schedule),
        }
        self.logger.log({f"final/{k}": v for k, v in metrics.items()}, self.step)
        self.logger.summary({k: v for k, v in summary.items() if isinstance(v, float)})
        summary["config"] = resolved(self.cfg)
        summary_path = self.run_dir / "summary.json"
        if self.env.is_main:
            ckpt.save_atomic(unwrap(self.model).state_dict(), self.run_dir / "model_final.pt")
            summary_path.write_text(json.dumps(summary, indent=2))
        announce_end(summary, summary_path, self.env)
        return summary


def worker_start_method() -> str | None:
    """How loader workers start: the interpreter's way, unless a launcher replaced it (joblib's
    loky workers, hydra/launcher=local_parallel, have their own, which cannot start them)."""
    methods = multiprocessing.get_all_start_methods()  # the platform's default first
    return None if multiprocessing.get_start_method(allow_none=True) in (None, *methods) else methods[0]


class TrainingRun(Run):
    """A classification or torchvision-detection run in ``run_dir``, trained by ``train_loop``;
    relaunching in the same directory resumes it exactly. Subclasses build the model and data
    and define the schedule, the loss, the evaluation and the summary."""

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
        self.accumulate_steps = accumulate_steps(cfg)
        step_batch = per_device_batch * self.accumulate_steps  # a step's images on this device
        self.images_per_step = step_batch * self.env.world_size
        self.optimizer = build_sgd(self.model, cfg.optim, self.images_per_step, self.norm.gamma_lr_factor)
        self.sampler = EpochSampler(len(train_set), step_batch, True, cfg.seed, self.env.rank, self.env.world_size)
        self.steps_per_epoch = self.sampler.batches_per_epoch()
        if self.steps_per_epoch == 0:
            raise ConfigError(
                f"the training set ({len(train_set)} images) is smaller than one step of "
                f"{self.images_per_step} images: use more data or a smaller batch"
            )
        self.total_steps, milestones, warmup = self.schedule()
        if cfg.max_steps:
            self.total_steps = min(self.total_steps, cfg.max_steps)
        self.stop_step = stop_step(cfg, self.total_steps)
        self.norm_schedule = schedule_norms(unwrap(self.model), self.total_steps, self.norm)
        fused.choose_for_run(self.total_steps, cfg.get("fused_min_steps", 0))  # eager for short runs
        lr = cfg.optim.schedule
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, lr.name, milestones, lr.gamma, warmup, lr.warmup_factor),
        )

    def loader(self, dataset, sampler) -> DataLoader:
        """Batches in the sampler's order. The loader's own generator keeps it from drawing
        from the global RNG (which the model's sampling uses), wherever a run resumes."""
        return DataLoader(
            dataset,
            batch_size=sampler.batch_size,
            sampler=sampler,
            num_workers=self.cfg.workers,
            pin_memory=self.env.device.type == "cuda",
            drop_last=sampler.drop_last,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(self.cfg.seed),
            multiprocessing_context=worker_start_method() if self.cfg.workers else None,
        )

    def val_sampler(self) -> EpochSampler:
        """The validation set in order, split over the processes, nothing dropped, in batches of a
        step's images per device (no activations are kept for a backward)."""
        size = self.sampler.batch_size
        return EpochSampler(len(self.val_set), size, False, 0, self.env.rank, self.env.world_size, drop_last=False)

    def batches(self):
        """Training batches from the current step on, epoch after epoch (each epoch's order
        drawn from the seed, so a resumed run continues inside its epoch)."""
        while True:
            epoch, start_batch = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, start_batch)
            self.train_set.set_epoch(epoch)
            yield from self.loader(self.train_set, self.sampler)

    def train_step(self, batch, after_backward) -> None:
        """One optimizer step on ``batch`` (``optimizer_step``); ``after_backward()`` runs before
        the weights change."""
        epoch = self.step // self.steps_per_epoch
        parts = (slices(part, self.accumulate_steps) for part in batch)  # (inputs, targets)
        self.optimizer_step(list(zip(*parts)), self.loss, after_backward)
        self.last_extras = {**self.last_extras, "epoch": epoch}
        self.scheduler.step()
        self.step += 1

    def fit(self) -> None:
        """Train to ``stop_step`` (on a preemption signal: save a checkpoint and exit)."""
        self.model.train()
        batches = self.batches()
        try:
            train_loop(self, self.hooks(), batches)
        finally:
            batches.close()  # the loader's worker processes end here


def slices(samples, k: int) -> list:
    """``samples`` (a tensor along its first dimension, or a list) as ``k`` equal slices, in order
    (itself, for one)."""
    if k == 1:
        return [samples]
    if torch.is_tensor(samples):
        return list(samples.chunk(k))
    size = len(samples) // k
    return [samples[i * size : (i + 1) * size] for i in range(k)]


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


def announce_start(cfg, norm: NormSpec, total_steps: int, step: int, env, run_dir: Path) -> None:
    """One line saying what the run does, which norm kernels it uses (``mabn.norms.fused`` mode), where
    its folder is and when its time estimate comes; main process."""
    if env.is_main:
        label = norm.display_name
        model = OmegaConf.select(cfg, "model.name") or OmegaConf.select(cfg, "detector.name")
        per_device = OmegaConf.select(cfg, "per_device_batch", default=cfg.batch)
        k = accumulate_steps(cfg)
        per_device = f"{per_device} x {k} micro-batches per step" if k > 1 else per_device
        window = hooks.Estimate.WINDOW[1]
        estimate = f"a time estimate follows after {window} steps" if total_steps - step > window else "a short run"
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
