"""Cost of the batch-statistics probe (mabn.probes) on a training step of the study's small
ResNet (MABN at normalization batch 2, per-device batch 32), as ratios to no probe, measured
in one run (round robin, the median over rounds of each round's ratio):

    python scripts/bench_probe.py --out results/bench_probe_cpu.md

"off" is the engine's default (probe.every=0): no probe object, no hook, the same code as no
probe; "attached" keeps the hooks on every step but records one step in 125 (the study's
setting); "recording" records every step.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import mabn
import mabn.norms.fused
from mabn.benchmark import command, markdown_table, paired_ratio, round_robin, setting, training_step
from mabn.models import build_classifier
from mabn.probes import BatchStatisticsProbe
from mabn.studies.reporting import publish


def setup(mode: str):
    torch.manual_seed(0)
    norm = mabn.norm_layer("mabn", normalization_batch=2, sma_window=16)
    model = build_classifier("small_resnet", 10, 1, norm, widths=(16, 32, 64, 128), stem_stride=2)
    mabn.wire_norms(model)
    probe = None
    if mode == "off":
        probe = BatchStatisticsProbe(model, every=125)  # built, never attached
    elif mode in ("attached", "recording"):
        probe = BatchStatisticsProbe(model, every=125 if mode == "attached" else 1).attach()
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9), probe


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20, help="steps per model per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    mabn.norms.fused.use("1")  # the compiled kernels, as a long run uses them (MABN_FUSED=0: the eager ones)
    images, labels = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
    runs = {mode: setup(mode) for mode in ("no probe", "off", "attached", "recording")}

    def steps(model, optimizer, probe):
        def run(round_):
            for k in range(args.steps):
                if probe is not None:
                    probe.step(round_ * args.steps + k + 2)  # never step 1: "attached" records one step in 125
                    probe.records.clear()
                training_step(model, optimizer, images, labels)

        return run

    times = round_robin({mode: steps(*run) for mode, run in runs.items()}, args.rounds)
    per_step = {mode: statistics.median(values) / args.steps for mode, values in times.items()}
    lines = [
        f"Training step with the batch-statistics probe, small ResNet (study), MABN at normalization batch 2, "
        f"{setting('cpu')}; median over {args.rounds} rounds of {args.steps} steps (round robin).",
        "",
        command(),
        "",
        *markdown_table(
            ["probe", "ms/step", "ratio to no probe"],
            [
                [mode, f"{1000 * per_step[mode]:.1f}", f"{paired_ratio(times[mode], times['no probe']):.3f}"]
                for mode in times
            ],
        ),
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
