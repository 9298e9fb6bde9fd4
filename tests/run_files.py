"""What a training run wrote in its directory: summary.json and metrics.jsonl."""

import json
from pathlib import Path


def read_summary(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "summary.json").read_text())


def read_metrics(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl, in order."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir: Path) -> dict:
    """Training loss by step."""
    return {r["step"]: r["train/loss"] for r in read_metrics(run_dir) if "train/loss" in r}
