"""Evaluate trained Fashion-MNIST runs with re-estimated running statistics (a diagnosis:
does a norm evaluate badly because of the statistics it keeps? mabn.studies.eval_statistics):

    python scripts/eval_statistics.py runs/fashion_study/cbn-b*-s0 --out results/fashion_cbn_eval_statistics.md

Per run: the error with its own running statistics, then with the mean and variance of each
norm's input re-estimated from training images (augmented as in training, a fixed draw): over
all of them at once, and as the mean of the variances of groups of b (the run's normalization
batch), and of groups of (buffer_num + 1) b for CBN (the window its training normalizes with).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from mabn.data.fashion_mnist import FashionMNIST
from mabn.studies.eval_statistics import load_run, reestimate, top1_error
from mabn.studies.reporting import publish


def images_of(dataset, indices: list[int]):
    samples = dataset.__getitems__(indices)
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="classification run folders (summary.json, model_final.pt)")
    parser.add_argument("--images", type=int, default=4096, help="training images to re-estimate from")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    train, val = FashionMNIST(train=True, augment=True), FashionMNIST(train=False)
    order = torch.randperm(len(train))[: args.images].tolist()
    estimation, _ = images_of(train, order)
    val_images, val_labels = images_of(val, list(range(len(val))))
    lines = [
        "| run | normalization batch | summary | own running statistics | all images at once | "
        "groups of b | groups of (k + 1) b (CBN's window) |",
        "|---|---|---|---|---|---|---|",
    ]
    runs = sorted(
        (load_run(run_dir) + (run_dir,) for run_dir in args.runs),
        key=lambda run: (run[1]["norm"], -run[1]["batch"], run[1]["seed"]),
    )
    for model, summary, run_dir in runs:
        options = summary["config"]["norm"]["options"]
        b = options.get("normalization_batch") or summary["config"]["per_device_batch"]
        errors = [top1_error(model, val_images, val_labels)]
        estimators = [(None, False), (b, True)]
        if "buffer_num" in options:
            estimators.append(((options["buffer_num"] + 1) * b, False))
        for group, unbiased in estimators:
            reestimate(model, estimation, group, unbiased)
            errors.append(top1_error(model, val_images, val_labels))
        cells = [f"{e:.2f}" for e in errors] + ["-"] * (4 - len(errors))  # no window column but for CBN
        lines.append(f"| {run_dir.name} | {b} | {summary['top1_error']:.2f} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr)
    publish(
        "Top-1 error (%) on the Fashion-MNIST test set of trained runs, evaluated with their own running "
        f"statistics and with statistics re-estimated from {args.images} augmented training images "
        "(`python scripts/eval_statistics.py "
        + " ".join(p.as_posix() for p in args.runs)
        + "`).\n\n"
        + "\n".join(lines),
        args.out,
    )


if __name__ == "__main__":
    main()
