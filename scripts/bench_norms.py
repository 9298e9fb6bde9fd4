"""Forward+backward time of each norm on ResNet-50 layer shapes, as a ratio to nn.BatchNorm2d
measured in the same run (round-robin, median of repeats, so machine noise hits all alike):
one ratio per shape, their geometric mean and maximum, and what each layer saves for its
backward. A second nn.BatchNorm2d row shows the noise floor of the ratios.

    python scripts/bench_norms.py                       # ResNet-50 shapes, batch 32
    python scripts/bench_norms.py --out results/bench_norms_cpu.md
    python scripts/bench_norms.py --authors-mabn /path/to/megvii-model/MABN/MABN.py
    python scripts/bench_norms.py --device cuda --autocast fp16 --channels-last   # as training runs on GPUs
    python scripts/bench_norms.py --compare /tmp/old   # also the layers of another checkout (a git worktree)
    python scripts/bench_norms.py --eager              # BN/BRN/MABN's eager kernels (MABN_FUSED=0)
    python scripts/bench_norms.py --eager-rows         # compiled and eager kernels in the same run

On CPU in fp32 the grouped layers run their compiled kernels (mabn.norms.fused); each is compiled in
the warm-up step, which is not timed.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import statistics
import sys
from pathlib import Path

import timm
import torch
from external_code import load_module
from torch import nn

import mabn
import mabn.norms.fused
from mabn.benchmark import command, markdown_table, round_robin, saved_bytes, setting
from mabn.studies.reporting import publish

# (channels, height, width) of the norms in ResNet-50 at 224x224, one per distinct shape
RESNET50_SHAPES = [
    (64, 112, 112),
    (64, 56, 56),
    (256, 56, 56),
    (128, 28, 28),
    (512, 28, 28),
    (256, 14, 14),
    (1024, 14, 14),
    (512, 7, 7),
    (2048, 7, 7),
]
QUICK_SHAPES = [(64, 16, 16), (256, 8, 8)]
BATCH_NORMS = ("bn", "brn", "mabn", "evonorm_b0", "powernorm")
TIMM_LAYERS = {
    "evonorm_b0": timm.layers.EvoNorm2dB0,  # the whole batch's statistics: as ours with norm. batch 32
    "evonorm_s0": timm.layers.EvoNorm2dS0,
    "frn": timm.layers.FilterResponseNormTlu2d,
}
# cbn and gn_ws act through the conv that feeds them (Taylor step, weight standardization): a layer
# alone would leave that out, so scripts/bench_train.py times them in a training step


def cases(norms, normalization_batches, authors, packages):
    """(label, factory(channels)) for every benchmarked layer; the baseline comes first.
    ``packages``: (tag, mabn package) pairs, this checkout's with tag ""."""
    yield "nn.BatchNorm2d", nn.BatchNorm2d
    yield "nn.BatchNorm2d (again: the noise floor)", nn.BatchNorm2d
    for tag, package in packages:
        for name in norms:
            for nb in normalization_batches if name in BATCH_NORMS else [None]:
                label = f"{name} (norm. batch {nb})" if nb else name
                options = {"normalization_batch": nb} if nb else {}
                if name == "mabn":  # window = 32 / normalization batch, past its warm-up
                    options.update(sma_window=max(1, 32 // nb), warmup_iters=0, renorm_warmup_iters=0)
                yield f"{label} [{tag}]" if tag else label, package.norm_layer(name, **options)
    for name in norms:  # the timm layers ours are built from, as timm trains them (autograd)
        if name in TIMM_LAYERS:
            yield f"timm's {TIMM_LAYERS[name].__name__}", TIMM_LAYERS[name]
    if authors:
        yield "authors' MABN.py (batch 32)", lambda c: authors.MABN2d(c, B=32, real_B=512, warmup_iters=0)


class EagerKernels(nn.Module):
    """A layer run with its eager kernels: MABN_FUSED=0 during its forward (the backward
    follows the forward's choice)."""

    def __init__(self, layer):
        super().__init__()
        self.layer = layer

    def forward(self, x):
        previous = os.environ.get("MABN_FUSED")
        os.environ["MABN_FUSED"] = "0"
        try:
            return self.layer(x)
        finally:
            if previous is None:
                del os.environ["MABN_FUSED"]
            else:
                os.environ["MABN_FUSED"] = previous


class EagerPackage:
    """This checkout's layers with their eager kernels, as a package for ``cases``."""

    @staticmethod
    def norm_layer(name, **options):
        factory = mabn.norm_layer(name, **options)
        return lambda channels: EagerKernels(factory(channels))


def load_checkout(root: Path):
    """The mabn package of another checkout (a git worktree of an older commit, say), imported
    beside this one, so that its layers are timed in the same run."""
    ours = {name: sys.modules.pop(name) for name in list(sys.modules) if name.split(".")[0] == "mabn"}
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("mabn")
    finally:
        sys.path.remove(str(root))
        for name in [name for name in sys.modules if name.split(".")[0] == "mabn"]:
            del sys.modules[name]
        sys.modules.update(ours)


def load_authors(path):
    return load_module(path, "authors_mabn")


def layer_case(layer, x, dy, dtype=None):
    """A ``round_robin`` case: the layer's forward and backward (under autocast to ``dtype`` if given)."""

    def case(_round):
        x.grad = None
        with torch.autocast(x.device.type, dtype=dtype, enabled=dtype is not None):
            y = layer(x)
        y.backward(dy)

    return case


def benchmark(shapes, batch, layers, repeats, device, dtype=None, channels_last=False):
    """({label: median seconds per shape}, {label: saved bytes per shape / bytes of x}); under
    autocast to ``dtype`` if given (x in that dtype, as a conv under autocast gives it)."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    times = {label: [] for label in layers}
    saved = {label: [] for label in layers}
    for channels, height, width in shapes:
        x = torch.randn(batch, channels, height, width, device=device, dtype=dtype)
        x = x.contiguous(memory_format=memory_format).requires_grad_()
        dy = torch.randn_like(x)
        built = {label: factory(channels).to(device).train() for label, factory in layers.items()}
        for layer in built.values():
            layer.wired = True  # each on its own, outside any model: nothing to wire
        for label, layer in built.items():
            saved[label].append(saved_bytes(layer, x, dy, dtype) / (x.numel() * x.element_size()))  # also the warm-up
        cases = {label: layer_case(layer, x, dy, dtype) for label, layer in built.items()}
        samples = round_robin(cases, repeats, warmup=0, device=device)  # saved_bytes was the warm-up
        for label, values in samples.items():
            times[label].append(statistics.median(values))
    return times, saved


def geometric_mean(values) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def table(times, saved, shapes, title):
    """Per-shape ratios to nn.BatchNorm2d, their geometric mean and maximum, saved memory."""
    base = times["nn.BatchNorm2d"]
    rows = []
    for label, seconds in times.items():
        ratios = [t / b for t, b in zip(seconds, base)]
        rows.append(
            [label, *(f"{r:.2f}" for r in ratios), f"{geometric_mean(ratios):.2f}", f"{max(ratios):.2f}"]
            + [f"{sum(seconds) * 1000:.1f}", f"{max(saved[label]):.2f}"]
        )
    columns = ["layer", *(f"{c}x{h}x{w}" for c, h, w in shapes), "geomean", "max", "total ms"]
    return "\n".join([title, "", *markdown_table([*columns, "saved / x (max over shapes)"], rows)])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32, help="per-device batch")
    parser.add_argument("--normalization-batches", type=int, nargs="+", default=[32, 4, 2, 1])
    parser.add_argument(
        "--norms",
        nargs="+",
        default=["bn", "syncbn", "gn", "ln", "in", "brn", "mabn", "evonorm_b0", "evonorm_s0", "frn", "powernorm"],
    )
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (a smoke test)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["fp16", "bf16"], help="run under autocast (x in that dtype)")
    parser.add_argument("--channels-last", action="store_true", help="x in channels_last memory format")
    parser.add_argument("--authors-mabn", type=Path, help="path to the authors' MABN.py, to time it too")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another checkout whose layers get rows too, tagged with its folder name",
    )
    parser.add_argument("--eager", action="store_true", help="the eager kernels of BN/BRN/MABN (MABN_FUSED=0)")
    parser.add_argument("--eager-rows", action="store_true", help="also rows with the eager kernels, tagged [eager]")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)
    mabn.norms.fused.use("1")  # the compiled kernels, as a long run uses them (MABN_FUSED=0: the eager ones)
    if args.eager:
        os.environ["MABN_FUSED"] = "0"

    authors = load_authors(args.authors_mabn) if args.authors_mabn else None
    packages = [("", mabn)] + [(root.name, load_checkout(root)) for root in args.compare]
    packages += [("eager", EagerPackage)] if args.eager_rows else []
    layers = dict(cases(args.norms, args.normalization_batches, authors, packages))
    shapes = QUICK_SHAPES if args.quick else RESNET50_SHAPES
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(args.autocast)
    times, saved = benchmark(shapes, args.batch, layers, args.repeats, args.device, dtype, args.channels_last)
    layout = f"{args.autocast or 'fp32'}{', channels_last' if args.channels_last else ''}"
    compiled = mabn.norms.fused.enabled() and args.device == "cpu" and dtype is None
    kernels = f"compiled (MABN_FUSED={mabn.norms.fused.mode()})" if compiled else "eager"
    title = (
        f"Norm layers, forward+backward, per-device batch {args.batch}, "
        f"{'quick' if args.quick else 'ResNet-50'} shapes (channels x height x width), {layout}, "
        f"{kernels} kernels (mabn.norms.fused), {setting(args.device)}, median of {args.repeats} "
        "(round robin); ratios to nn.BatchNorm2d per shape. "
        "saved / x: bytes saved for the backward over the bytes of the input (1.00: x alone).\n\n" + command()
    )
    publish(table(times, saved, shapes, title), args.out)


if __name__ == "__main__":
    main()
