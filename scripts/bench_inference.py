"""Inference cost of ResNet-50 per norm (eval mode), as ratios to BN folded into the convs,
measured in one run (round-robin over the models, median time), beside the authors' table:

    python scripts/bench_inference.py --out results/bench_inference_cpu.md
    python scripts/bench_inference.py --batch 1 --repeats 30       # a quick look
    python scripts/bench_inference.py --runtime onnxruntime --batch 1 8 --out results/bench_inference_onnxruntime_cpu.md

With ``--runtime onnxruntime`` each model goes through ``mabn.export.export_onnx`` once (folded
where foldable, a file that takes any batch size, validated against PyTorch) and is timed in ONNX
Runtime, where deployment happens: the paper's norms and MABN's successors, at each ``--batch``
from that one file.

BN and MABN are trained-looking (random running statistics / EMA) and then folded with
``mabn.fold_norms``: both become a conv with a bias, so they should cost the same. GN, LN
and IN normalize at inference too (per-sample statistics), so they cannot be folded.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

import mabn
from mabn.benchmark import command, round_robin, setting
from mabn.export import build_model
from mabn.studies.reporting import describe, publish

AUTHORS = {"bn folded": 237.88, "mabn folded": 237.88, "in": 105.60, "gn": 99.37, "ln": 125.44}
CASES = [
    ("bn folded", "bn", True),
    ("mabn folded", "mabn", True),
    ("bn (not folded)", "bn", False),
    ("mabn (not folded)", "mabn", False),
    ("gn", "gn", False),
    ("ln", "ln", False),
    ("in", "in", False),
]
# in ONNX Runtime: what a deployment exports (foldable norms folded), the successors included
RUNTIME_CASES = [
    ("bn folded", "bn", True),
    ("mabn folded", "mabn", True),
    ("cbn folded", "cbn", True),
    ("gn", "gn", False),
    ("ln", "ln", False),
    ("in", "in", False),
    ("gn_ws", "gn_ws", False),
    ("evonorm_b0", "evonorm_b0", False),
    ("evonorm_s0", "evonorm_s0", False),
    ("frn", "frn", False),
]


@torch.no_grad()
def build(norm: str, fold: bool, device) -> torch.nn.Module:
    model = build_model("resnet50", norm)
    for module in model.modules():  # statistics as after training, not the initial 0 / 1
        for name in ("running_var", "ema_chi2"):
            if getattr(module, name, None) is not None:
                getattr(module, name).uniform_(0.5, 2.0)
    model.eval()
    return (mabn.fold_norms(model) if fold else model).to(device)


def call(function, *inputs):
    """A ``round_robin`` case: ``function(*inputs)``."""
    return lambda _round: function(*inputs)


def onnxruntime_table(args) -> str:
    """Each RUNTIME_CASES model exported (``mabn.export.export_onnx``) and timed in ONNX Runtime,
    round-robin, at each batch; ratios to folded BN in the same run."""
    import tempfile

    import onnxruntime

    from mabn.export import export_onnx

    cuda = args.device.startswith("cuda")
    providers = ["CUDAExecutionProvider"] if cuda else ["CPUExecutionProvider"]
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    rows, paired, sessions = {label: {} for label, _, _ in RUNTIME_CASES}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench_onnx_") as folder:  # ~100 MB per ResNet-50 file
        example = torch.randn(args.batch[0], 3, args.image_size, args.image_size)
        for label, norm, fold in RUNTIME_CASES:  # one file per norm: any batch size (checked against PyTorch)
            path = Path(folder) / f"{norm}.onnx"
            export_onnx(build(norm, False, "cpu"), example, path, fold=fold)
            sessions[label] = onnxruntime.InferenceSession(str(path), options, providers=providers)
    for batch in args.batch:
        feed = torch.randn(batch, 3, args.image_size, args.image_size).numpy()
        cases = {label: call(s.run, None, {s.get_inputs()[0].name: feed}) for label, s in sessions.items()}
        times = round_robin(cases, args.repeats)
        for label, values in times.items():
            rows[label][batch] = 1 / statistics.median(values)
        paired[batch] = describe([b / m for b, m in zip(times["bn folded"], times["mabn folded"])])
    head = " | ".join(f"batch {b}: iterations/s (ratio)" for b in args.batch)
    lines = [
        f"ResNet-50 inference in ONNX Runtime {onnxruntime.__version__} ({providers[0]}) at {args.image_size}x"
        f"{args.image_size}, {setting(args.device)}, median of {args.repeats} runs per model, round robin; each "
        "model exported once by `mabn.export.export_onnx` (foldable norms folded; any batch size; outputs checked "
        "against PyTorch at batch 1, 3 and 8 and two image sizes), every batch timed from that file.",
        "",
        command(),
        "",
        f"| norm | {head} | authors' iterations/s (ratio) |",
        "|---|" + "---|" * len(args.batch) + "---|",
    ]
    for label, speeds in rows.items():
        cells = " | ".join(f"{speeds[b]:.2f} ({speeds[b] / rows['bn folded'][b]:.2f})" for b in args.batch)
        authors = AUTHORS.get(label)
        paper = f"{authors} ({authors / AUTHORS['bn folded']:.2f})" if authors else "-"
        lines.append(f"| {label} | {cells} | {paper} |")
    lines += [""] + [
        f"In ONNX Runtime at batch {b}, folded MABN runs at {p['mean']:.3f}x the speed of folded BN "
        f"(95 % interval of the "
        f"per-round ratio {p['mean'] - p['ci95']:.3f}-{p['mean'] + p['ci95']:.3f}; the authors: 1.00)."
        for b, p in paired.items()
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[8])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=7, help="timed forward passes per model")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--runtime", choices=["torch", "onnxruntime"], default="torch")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.runtime == "onnxruntime":
        publish(onnxruntime_table(args), args.out)
        return
    if len(args.batch) > 1:
        parser.error("the torch runtime takes one --batch")
    args.batch = args.batch[0]
    device = torch.device(args.device)
    images = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    models = {label: build(norm, fold, device) for label, norm, fold in CASES}
    with torch.inference_mode():
        times = round_robin({label: call(model, images) for label, model in models.items()}, args.repeats, 1, device)
    speed = {label: 1 / statistics.median(values) for label, values in times.items()}
    base = speed["bn folded"]
    lines = [
        f"ResNet-50 inference (eval mode) at {args.image_size}x{args.image_size}, batch {args.batch}, "
        f"{setting(args.device)}, median of {args.repeats} passes per model, round robin.",
        "",
        command(),
        "",
        "| norm | iterations/s | ratio to bn folded | authors' iterations/s (ratio) |",
        "|---|---|---|---|",
    ]
    for label, value in speed.items():
        authors = AUTHORS.get(label)
        paper = f"{authors} ({authors / AUTHORS['bn folded']:.2f})" if authors else "-"
        lines.append(f"| {label} | {value:.2f} | {value / base:.2f} | {paper} |")
    # paired by round: the time of BN folded over MABN folded in the same round, with its t-interval
    paired = [b / m for b, m in zip(times["bn folded"], times["mabn folded"])]
    ratio = describe(paired)
    mean, half = ratio["mean"], ratio["ci95"]
    lines += [
        "",
        f"MABN folded runs at {mean:.3f}x the speed of BN folded (95 % interval of the per-round ratio "
        f"{mean - half:.3f}-{mean + half:.3f}; the authors: 1.00); GN, LN and IN at "
        + ", ".join(f"{speed[k] / base:.2f}x" for k in ("gn", "ln", "in"))
        + " (the authors: 0.42x, 0.53x, 0.44x).",
    ]
    publish("\n".join(lines), args.out)


if __name__ == "__main__":
    main()
