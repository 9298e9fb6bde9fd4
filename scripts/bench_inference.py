"""Inference cost of ResNet-50 per norm (eval mode), as ratios to BN folded into the convs,
measured in one run (round-robin over the models, median time), beside the authors' table:

    python scripts/bench_inference.py --out results/bench_inference_cpu.md
    python scripts/bench_inference.py --batch 1 --repeats 30       # a quick look

BN and MABN are trained-looking (random running statistics / EMA) and then folded with
``mabn.fold_norms``: both become a conv with a bias, so they should cost the same. GN, LN
and IN normalize at inference too (per-sample statistics), so they cannot be folded.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

import mabn
from mabn.models import build_classifier
from report import describe, machine, publish

AUTHORS = {"bn folded": 237.88, "mabn folded": 237.88, "in": 105.60, "gn": 99.37, "ln": 125.44}
CASES = [("bn folded", "bn", True), ("mabn folded", "mabn", True), ("bn (not folded)", "bn", False),
         ("mabn (not folded)", "mabn", False), ("gn", "gn", False), ("ln", "ln", False), ("in", "in", False)]


@torch.no_grad()
def build(norm: str, fold: bool, device) -> torch.nn.Module:
    model = build_classifier("resnet50", 1000, 3, mabn.norm_layer(norm))
    if norm == "mabn":
        mabn.centralize_weights(model)
    for module in model.modules():  # statistics as after training, not the initial 0 / 1
        for name in ("running_var", "ema_chi2"):
            if getattr(module, name, None) is not None:
                getattr(module, name).uniform_(0.5, 2.0)
    model.eval()
    return (mabn.fold_norms(model) if fold else model).to(device)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed forward passes per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    models = {label: build(norm, fold, device) for label, norm, fold in CASES}
    times = {label: [] for label in models}
    with torch.inference_mode():
        for repeat in range(args.repeats + 1):
            for label, model in models.items():
                start = time.perf_counter()
                model(images)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if repeat:  # the first pass of each model is a warm-up
                    times[label].append(time.perf_counter() - start)
    speed = {label: 1 / statistics.median(values) for label, values in times.items()}
    base = speed["bn folded"]
    lines = [f"ResNet-50 inference (eval mode) at {args.image_size}x{args.image_size}, batch {args.batch}, "
             f"{machine(args.device)}, torch {torch.__version__}, median of {args.repeats} passes per model, "
             "round-robin.", "", f"Command: `python {' '.join(sys.argv)}`", "",
             "| norm | iterations/s | ratio to bn folded | authors' iterations/s (ratio) |", "|---|---|---|---|"]
    for label, value in speed.items():
        authors = AUTHORS.get(label)
        paper = f"{authors} ({authors / AUTHORS['bn folded']:.2f})" if authors else "-"
        lines.append(f"| {label} | {value:.2f} | {value / base:.2f} | {paper} |")
    # paired by round: the time of BN folded over MABN folded in the same round, with its t-interval
    paired = [b / m for b, m in zip(times["bn folded"], times["mabn folded"])]
    ratio = describe(paired)
    mean, half = ratio["mean"], ratio["ci95"]
    lines += ["", f"MABN folded runs at {mean:.3f}x the speed of BN folded (95 % interval of the per-round ratio "
              f"{mean - half:.3f}-{mean + half:.3f}; the authors: 1.00); GN, LN and IN at "
              + ", ".join(f"{speed[k] / base:.2f}x" for k in ("gn", "ln", "in"))
              + " (the authors: 0.42x, 0.53x, 0.44x)."]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
