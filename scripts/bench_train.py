"""Training throughput (images/s) of ResNet-50 at 224x224 per norm, as a ratio to bn measured
in the same run (round-robin over norms, median step time, so noise hits all alike).

    python scripts/bench_train.py                      # per-device batch 32, ResNet-50, 224
    python scripts/bench_train.py --out results/bench_train_cpu.md
    python scripts/bench_train.py --model resnet18 --image-size 112 --steps 5   # a quick look
    python scripts/bench_train.py --norms cbn --authors-cbn /path/to/mmdet/models/utils/CBN.py

One SGD step = forward, backward and update on a fixed random batch (data loading excluded),
with AMP and channels_last on CUDA as in train_imagenet.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import timm
import torch
from external_code import AuthorsCBN, load_module
from torch import nn

import mabn.norms.fused
from mabn import wire_norms
from mabn.benchmark import (
    command,
    follow_live_memory,
    markdown_table,
    paired_ratio_text,
    peak_bytes,
    round_robin,
    setting,
    training_case,
    training_step_saved_bytes,
)
from mabn.export import build_model
from mabn.models import build_classifier
from mabn.studies.reporting import publish

NOISE_FLOOR = "bn (again: the noise floor)"  # a second bn model: how far the ratios wander by noise alone
# (label, norm name, options): the layers of the comparison at per-device batch 32
CASES = [
    ("bn", "bn", {}),
    (NOISE_FLOOR, "bn", {}),
    ("bn (norm. batch 2)", "bn", {"normalization_batch": 2}),
    ("syncbn", "syncbn", {}),
    ("gn", "gn", {}),
    ("ln", "ln", {}),
    ("in", "in", {}),
    ("brn (norm. batch 2)", "brn", {"normalization_batch": 2}),
    ("mabn", "mabn", {"sma_window": 1}),
    ("mabn (norm. batch 2)", "mabn", {"normalization_batch": 2, "sma_window": 16}),
    # MABN's successors; CBN's burn-in is skipped so that every timed step compensates
    ("cbn", "cbn", {"burnin": 0}),
    ("cbn (norm. batch 2)", "cbn", {"normalization_batch": 2, "burnin": 0}),
    # no past entries: CBN's code without its algorithm's own extra work, the derivative convs
    ("cbn (buffer 0: no derivative convs)", "cbn", {"buffer_num": 0, "burnin": 0}),
    ("evonorm_b0 (norm. batch 2)", "evonorm_b0", {"normalization_batch": 2}),
    ("evonorm_s0", "evonorm_s0", {}),
    ("frn", "frn", {}),
    ("gn_ws", "gn_ws", {}),
    # MABN's relative
    ("powernorm (norm. batch 2)", "powernorm", {"normalization_batch": 2}),
]
# timm's own layers, trained as timm trains them (autograd through the formulas), beside ours
TIMM_CASES = {
    "timm's EvoNorm2dB0": timm.layers.EvoNorm2dB0,  # the whole batch's statistics
    "timm's EvoNorm2dS0": timm.layers.EvoNorm2dS0,
    "timm's FilterResponseNormTlu2d": timm.layers.FilterResponseNormTlu2d,
}


def build(model_name, norm, options, device, channels_last):
    """The model with ``norm`` (a name, or one of ``TIMM_CASES``' layer classes), wired, and its SGD."""
    if isinstance(norm, str):
        model = build_model(model_name, norm, **options)
    else:
        model = wire_norms(build_classifier(model_name, 1000, 3, lambda channels, **_: norm(channels)))
    model = model.to(device).train()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    return model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)


def authors_cbn_model(model_name, path):
    """``model_name`` with the authors' CBN (buffer 3, no burn-in, as the ``cbn`` rows) after every conv."""
    module = load_module(path, "authors_cbn")
    model = build_classifier(
        model_name, 1000, 3, lambda c, **_: AuthorsCBN(module.CBatchNorm2d, c, buffer_num=3, burnin=0)
    )
    last_conv = None
    for layer in model.modules():
        if isinstance(layer, nn.Conv2d):
            last_conv = layer
        elif isinstance(layer, AuthorsCBN):
            layer.conv.append(last_conv)
    return model


def build_runs(args, device):
    """{label: (model, optimizer)} of the chosen cases."""
    chosen = None if args.norms is None else {"bn", NOISE_FLOOR, *args.norms.split(",")}
    cases = CASES + [(label, layer, {}) for label, layer in TIMM_CASES.items()]
    runs = {
        label: build(args.model, norm, options, device, device.type == "cuda")
        for label, norm, options in cases
        if chosen is None or label in chosen
    }
    if args.authors_cbn:
        model = authors_cbn_model(args.model, args.authors_cbn).to(device).train()
        runs["authors' CBN.py"] = model, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    return runs


def peaks_in_a_fresh_process(argv) -> dict:
    """{label: peak bytes of a step} measured by this script in a child process (``--peaks-to``): on
    CPU, ``peak_bytes`` needs ``follow_live_memory`` from the process's start, which slows every step
    (each freed block goes back to the system), so the timed process does without it."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "peaks.json"
        subprocess.run([sys.executable, __file__, *argv, "--peaks-to", str(path)], check=True)
        return json.loads(path.read_text())


def step_peaks(cases, device) -> dict:
    """{label: the peak memory one more step of the case adds} (``peak_bytes``)."""
    return {label: peak_bytes(partial(case, 0), device) for label, case in cases.items()}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--batch", type=int, default=32, help="per-device batch")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument(
        "--steps", type=int, default=6, help="timed steps per norm, after one warm-up (6 or more give intervals)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument(
        "--norms", help="comma-separated labels of CASES or TIMM_CASES to run (bn and its noise floor always run)"
    )
    parser.add_argument("--authors-cbn", type=Path, help="path to the authors' CBN.py, to time their layer too")
    parser.add_argument("--peaks-to", type=Path, help=argparse.SUPPRESS)  # the child of peaks_in_a_fresh_process
    args = parser.parse_args(argv)
    if args.peaks_to:
        follow_live_memory()  # before any tensor
    mabn.norms.fused.use("1")  # the compiled kernels, as a long run uses them (MABN_FUSED=0: the eager ones)

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    # on CPU the peaks come from a child process, run first, so that two sets of models never share the memory
    peaks = None if cuda or args.peaks_to else peaks_in_a_fresh_process(argv)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    if cuda:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 1000, (args.batch,), device=device)
    runs = build_runs(args, device)
    cases = {label: training_case(*run, images, labels, amp=cuda) for label, run in runs.items()}
    if args.peaks_to:  # one step each (the warm-up: the optimizer's state, the kernels), then one measured
        round_robin(cases, 0, warmup=1, device=args.device)
        args.peaks_to.write_text(json.dumps(step_peaks(cases, device)))
        return
    # bytes saved for the backward by a whole training step, in fp32 (exact, the same on any device)
    saved = {label: training_step_saved_bytes(model, images, labels) for label, (model, _) in runs.items()}
    times = round_robin(cases, args.steps, warmup=1, device=args.device)
    if cuda:
        peaks = step_peaks(cases, device)
    speed = {label: args.batch / statistics.median(values) for label, values in times.items()}
    peak = lambda label: "n/a" if peaks[label] is None else f"{peaks[label] / 2**20:.0f}"
    peak_ratio = lambda label: (
        f"{peaks[label] / peaks['bn']:.2f}" if peaks[label] is not None and peaks["bn"] else "n/a"
    )
    lines = [
        f"Training images/s, {args.model} at {args.image_size}x{args.image_size}, per-device batch "
        f"{args.batch}, {setting(args.device)}, median of {args.steps} steps (round robin, after one warm-up); "
        "ratio: the median over steps of bn's step time over the norm's, with a distribution-free 95 % interval "
        "(order statistics, mabn.benchmark.median_interval; none under 6 steps); saved: the bytes a training step "
        "keeps for its backward (saved-tensor hooks, fp32), over bn's; peak: the memory a step adds at its "
        "peak above what was in use before it, after one warm-up step (CUDA's max_memory_allocated; on CPU the "
        "process's peak resident memory, measured in a second process: mabn.benchmark.peak_bytes).",
        "",
        command(),
        "",
        *markdown_table(
            ["norm", "images/s", "ratio to bn", "saved for backward, ratio to bn", "peak MiB", "peak, ratio to bn"],
            [
                [label, f"{value:.1f}", paired_ratio_text(times["bn"], times[label])]
                + [f"{saved[label] / saved['bn']:.2f}", peak(label), peak_ratio(label)]
                for label, value in speed.items()
            ],
        ),
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
