"""Where a training step of the Fashion-MNIST studies spends its time: data loading (the
per-sample path vs the batched one), and the step with each norm vs the same network without
norms (the norms' share; the rest is convolutions and the optimizer). One thread, one run:

    python scripts/bench_step_breakdown.py --out results/bench_step_breakdown_cpu.md
    python scripts/bench_step_breakdown.py --widths 32,64,128,256 --stem-stride 1   # the default model
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

import mabn
import mabn.norms.fused
from mabn.benchmark import command, markdown_table, round_robin, setting, training_case
from mabn.data.fashion_mnist import FashionMNIST
from mabn.engine.sampling import EpochSampler, SeededSamples
from mabn.models import build_classifier
from mabn.studies.reporting import publish

NORMS = [
    ("bn@32", "bn", {}),
    ("bn@2", "bn", {"normalization_batch": 2}),
    ("brn@2", "brn", {"normalization_batch": 2}),
    ("gn (8 groups)", "gn", {"num_groups": 8}),
    ("mabn@32", "mabn", {"sma_window": 1}),
    ("mabn@2", "mabn", {"normalization_batch": 2, "sma_window": 16}),
    ("no norm", None, {}),
]


class PerSample(torch.utils.data.Dataset):
    """The dataset without its batched path: the DataLoader then fetches one sample at a time."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]


def data_ms(dataset, batches: int) -> float:
    loader = DataLoader(
        SeededSamples(dataset, 0), batch_size=32, sampler=EpochSampler(len(dataset), 32), drop_last=True
    )
    iterator, start = iter(loader), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return 1000 * (time.perf_counter() - start) / batches


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="16,32,64,128")
    parser.add_argument("--stem-stride", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    mabn.norms.fused.use("1")  # the compiled kernels, as a long run uses them (MABN_FUSED=0: the eager ones)
    torch.set_num_threads(1)
    widths = tuple(int(w) for w in args.widths.split(","))
    train = FashionMNIST(train=True, augment=True)
    batched, per_sample = data_ms(train, 100), data_ms(PerSample(train), 100)
    images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    runs = {}
    for label, norm, options in NORMS:
        layer = mabn.norm_layer(norm, **options) if norm else (lambda channels, **_: nn.Identity())
        model = build_classifier("small_resnet", 10, 1, layer, widths=widths, stem_stride=args.stem_stride)
        mabn.wire_norms(model)
        runs[label] = (model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
    cases = {label: training_case(*run, images, labels, args.steps) for label, run in runs.items()}
    times = round_robin(cases, args.rounds)
    ms = {label: 1000 * statistics.median(values) / args.steps for label, values in times.items()}
    lines = [
        f"Training step of small_resnet widths {widths}, stem stride {args.stem_stride}, per-device batch 32, "
        f"{setting('cpu')}; median over {args.rounds} rounds of {args.steps} steps (round robin).",
        "",
        command(),
        "",
        f"Data: {per_sample:.1f} ms per batch of 32 sample by sample, {batched:.1f} ms batched "
        "(FashionMNIST.__getitems__, what the engine uses).",
        "",
        *markdown_table(
            ["norm", "ms/step", "norms' share of the step"],
            [[label, f"{value:.1f}", f"{(value - ms['no norm']) / value:.0%}"] for label, value in ms.items()],
        ),
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
