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


def assert_same_run(a: Path, b: Path, keys) -> None:
    """Two run directories hold the same result: the summary's ``keys``, the training loss of
    every step and the final weights, bit for bit."""
    import torch

    first, second = read_summary(a), read_summary(b)
    assert [first[k] for k in keys] == [second[k] for k in keys]
    assert train_losses(a) == train_losses(b)
    final = lambda run_dir: torch.load(Path(run_dir) / "model_final.pt", weights_only=True)
    weights = final(b)
    for key, value in final(a).items():
        assert torch.equal(value, weights[key]), key
