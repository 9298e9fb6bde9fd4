"""Metrics to stdout, to ``metrics.jsonl`` in the run directory and to W&B (main process only).

W&B runs offline when no API key is configured (compute nodes often have no internet; sync
later with ``wandb sync <run_dir>/wandb/offline-run-*``). The run id is stored in the run
directory, so a resumed or requeued job continues the same W&B run.
"""

from __future__ import annotations

import json
import netrc
import os
import uuid
from pathlib import Path

from tqdm import tqdm

WANDB_ID_FILE = "wandb_run_id.txt"


def wandb_mode(requested: str | None) -> str:
    """``requested`` if set, else online with an API key (env or ~/.netrc), else offline."""
    if requested:
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError):
        has_key = False
    return "online" if has_key else "offline"


class RunLogger:
    """Writes each ``log(metrics, step)`` call to the enabled sinks; a no-op off the main process."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        wandb_options: dict | None = None,
        config: dict | None = None,
        run_id: str | None = None,
    ):
        """``run_id``: the W&B run id a checkpoint recorded, used if the run directory lost
        its id file; ``self.run_id`` is the id in use (None without W&B)."""
        self.run_dir, self.enabled, self.wandb, self.run_id = Path(run_dir), enabled, None, run_id
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_file = open(self.run_dir / "metrics.jsonl", "a")
        if wandb_options is not None:
            self.wandb = self._start_wandb(dict(wandb_options), config)

    def _start_wandb(self, options: dict, config: dict | None):
        import wandb

        id_file = self.run_dir / WANDB_ID_FILE
        if id_file.is_file():
            self.run_id = id_file.read_text().strip()
        self.run_id = self.run_id or uuid.uuid4().hex[:12]
        id_file.write_text(self.run_id)
        run = wandb.init(
            id=self.run_id,
            resume="allow",
            dir=str(self.run_dir),
            config=config,
            mode=wandb_mode(options.pop("mode", None)),
            **options,
        )
        for key in ("train/*", "eval/*", "final/*"):
            run.define_metric(key, step_metric="step")
        return run

    def log(self, metrics: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()))
        self.metrics_file.write(json.dumps(record) + "\n")
        self.metrics_file.flush()
        if self.wandb is not None:  # the training step as W&B's step: resumed runs line up
            self.wandb.log(record, step=step)

    def summary(self, values: dict) -> None:
        if self.enabled and self.wandb is not None:
            self.wandb.summary.update(values)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.metrics_file.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
