"""Seconds per Mask R-CNN training iteration (forward, backward, SGD step) for each norm and
engine, as ratios to bn measured in the same run: every case runs one iteration in turn
(round-robin, the order rotating each round) on the same fixed batches; the ratio is the median
over rounds of the case's time over bn's in that round, so machine noise hits all alike. A second
bn model ("bn again") shows the noise floor of the ratios; "mabn-nowc" is MABN without weight
centralization, which splits MABN's cost into its norm layers' and the centralization's; "bn-wcopy"
is bn whose convs that MABN centralizes copy their weight in the forward and its gradient in the
backward: the least that a centralization materializing W - mean(W) adds (a floor). The mask
head trains on the positive proposals, whose number depends on what each model has learnt, so
the table also gives the mask RoIs per iteration: that share of the work differs between norms.
Every case draws the same batches and, at each iteration, the same random numbers, so the two bn
models train alike and their ratio is the timing noise alone.

    python scripts/bench_detection.py                                   # small R18-FPN, fashion_scenes
    python scripts/bench_detection.py --out results/bench_detection_cpu.md
    python scripts/bench_detection.py --detector r50_fpn --min-size 800 --max-size 1333  # the paper's model

Both engines build the model as train_coco.py does (norm in backbone, FPN, box and mask heads;
convs feeding MABN centralized). The detectron2 engine is skipped with a note when detectron2
is not installed. syncbn in one process has no one to synchronize with: it times BN's path.
The norms run their kernels as train_coco.py runs them: compiled in the dynamic-shape mode of
mabn.norms.fused (image sizes and RoI counts change from batch to batch); MABN_FUSED=0 times the eager
ones.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch.nn.utils import parametrize

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("MABN_FUSED", "dynamic")  # as train_coco.py

from hydra import compose, initialize_config_dir  # noqa: E402

from mabn.benchmark import command, markdown_table, paired_ratio_text, round_robin, setting  # noqa: E402
from mabn.config import NormSpec, register_resolvers  # noqa: E402
from mabn.data.coco import coco_dataset, collate_detection, num_classes  # noqa: E402
from mabn.engine.coco.common import split_paths  # noqa: E402
from mabn.engine.coco.torchvision_engine import build_detector  # noqa: E402
from mabn.engine.training import build_sgd, wire  # noqa: E402
from mabn.studies.reporting import publish  # noqa: E402
from mabn.wiring import conv_norm_pairs  # noqa: E402

VARIANTS = {"bn-again": ("bn", []), "bn-wcopy": ("bn", []), "mabn-nowc": ("mabn", ["norm.centralize_weights=false"])}


class _Copied(torch.autograd.Function):
    """The identity, paying a copy each way: the weight forward, the gradient backward."""

    @staticmethod
    def forward(weight):
        return weight.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad.clone()


class CopyWeight(torch.nn.Module):
    def forward(self, weight):
        return _Copied.apply(weight)


def copy_weights(model):
    """Make the convs that MABN would centralize (those feeding a norm) copy their weight and its
    gradient: the traffic of centralization without its arithmetic (same values, same training)."""
    for _, conv, _, _ in conv_norm_pairs(model):
        parametrize.register_parametrization(conv, "weight", CopyWeight())


def count_mask_rois(model) -> list:
    """The RoIs the mask head gets at each iteration (its input's length), appended as they come."""
    counts = []
    model.roi_heads.mask_head.register_forward_pre_hook(lambda module, args: counts.append(len(args[0])))
    return counts


def config(args, norm: str, engine: str):
    register_resolvers()
    norm, extra = VARIANTS.get(norm, (norm, []))
    overrides = [
        *extra,
        f"norm={norm}",
        f"engine={engine}",
        f"detector={args.detector}",
        f"batch={args.batch}",
        f"data.root={args.data_root}",
        f"data.train_images={args.images}",
        "data.val_images=4",
        "workers=0",
        f"device={args.device}",
    ]
    overrides += [f"data.min_size={args.min_size}"] if args.min_size else []
    overrides += [f"data.max_size={args.max_size}"] if args.max_size else []
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        return compose("train_coco", overrides=overrides)


class TorchvisionCase:
    """torchvision Mask R-CNN as mabn.engine.coco.torchvision_engine.DetectionRun builds it."""

    def __init__(self, cfg, batches):
        (images, annotations), _ = split_paths(cfg.data, True)
        dataset = coco_dataset(images, annotations, train=True)
        norm = NormSpec.from_config(cfg.norm)
        self.model = wire(build_detector(cfg, norm, num_classes(dataset.coco)), norm)
        self.device = torch.device(cfg.device)
        self.model.to(self.device).train()
        self.optimizer = build_sgd(self.model, cfg.optim, cfg.batch)
        samples = [dataset[i] for i in range(cfg.batch * batches)]
        self.batches = [collate_detection(samples[i : i + cfg.batch]) for i in range(0, len(samples), cfg.batch)]
        self.index = 0
        self.mask_rois = count_mask_rois(self.model)

    def step(self):
        images, targets = self.batches[self.index % len(self.batches)]
        self.index += 1
        images = [image.to(self.device) for image in images]
        targets = [{k: v.to(self.device) if torch.is_tensor(v) else v for k, v in t.items()} for t in targets]
        loss = sum(self.model(images, targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Detectron2Case:
    """detectron2 Mask R-CNN as mabn.engine.coco.detectron2_trainer builds it."""

    def __init__(self, cfg, batches, work_dir):
        from detectron2.data import build_detection_train_loader, get_detection_dataset_dicts
        from detectron2.data.samplers import TrainingSampler
        from detectron2.utils.env import seed_all_rng
        from detectron2.utils.events import EventStorage

        from mabn.engine.coco.detectron2_config import build_detectron2_cfg
        from mabn.engine.coco.detectron2_trainer import build_detectron2_model

        self.d2cfg = build_detectron2_cfg(cfg, work_dir)
        self.model = build_detectron2_model(self.d2cfg, cfg, NormSpec.from_config(cfg.norm)).train()
        self.optimizer = build_sgd(self.model, cfg.optim, cfg.batch)
        dicts = get_detection_dataset_dicts(self.d2cfg.DATASETS.TRAIN)
        loader = iter(
            build_detection_train_loader(self.d2cfg, dataset=dicts, sampler=TrainingSampler(len(dicts), seed=0))
        )
        seed_all_rng(0)  # the augmentations draw from numpy's global stream: the same batches for every case
        self.batches = [next(loader) for _ in range(batches)]
        self.storage = EventStorage(0)  # detectron2's losses log into one
        self.index = 0
        self.mask_rois = count_mask_rois(self.model)

    def step(self):
        batch = self.batches[self.index % len(self.batches)]
        self.index += 1
        with self.storage:
            loss = sum(self.model(batch).values())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def benchmark(cases: dict, warmup: int, repeats: int, device: str) -> dict:
    """Seconds per iteration of each case in each round (``mabn.benchmark.round_robin``). Each
    iteration starts from the round's seed in every case (RoI sampling draws from the global random
    stream), so cases that learn alike, as the two bn models, do the same work."""
    seeded = lambda case: lambda round_: (torch.manual_seed(round_), case.step())
    return round_robin({label: seeded(case) for label, case in cases.items()}, repeats, warmup, device)


def table(times: dict, mask_rois: dict, notes: list[str], title: str) -> str:
    rows = []
    for (engine, norm), seconds in times.items():
        baseline = times.get((engine, "bn"))
        ratio = paired_ratio_text(seconds, baseline) if baseline else "-"
        rois = statistics.mean(mask_rois[engine, norm])
        rows.append([engine, norm, f"{statistics.median(seconds):.3f}", ratio, f"{rois:.1f}"])
    columns = [
        "engine",
        "norm",
        "s / iteration (median)",
        "ratio to bn (same engine, median over rounds [95 % interval])",
    ]
    lines = [title, "", *markdown_table([*columns, "mask RoIs / iteration (mean)"], rows)]
    return "\n".join(lines + ([""] + [f"- {note}" for note in notes] if notes else []))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--detector", default="r18_fpn_small", help="configs/detector/ option (r50_fpn: the paper's)")
    parser.add_argument(
        "--norms",
        nargs="+",
        default=["bn", "bn-again", "gn", "brn", "mabn", "mabn-nowc", "bn-wcopy", "syncbn"],
        help="norm options; bn-again: a second bn model (the noise floor); mabn-nowc: mabn without "
        "weight centralization; bn-wcopy: bn copying the weights MABN centralizes (a floor)",
    )
    parser.add_argument("--engines", nargs="+", default=["torchvision", "detectron2"])
    parser.add_argument("--batch", type=int, default=2, help="images per iteration (the normalization batch)")
    parser.add_argument(
        "--data-root",
        default=str(ROOT / "data" / "fashion_scenes_bench"),
        help="fashion_scenes folder (generated on first use)",
    )
    parser.add_argument("--images", type=int, default=16, help="fashion_scenes training images to generate")
    parser.add_argument("--min-size", type=int, help="shorter image side (default: the data config's, 128)")
    parser.add_argument("--max-size", type=int)
    parser.add_argument("--batches", type=int, default=4, help="distinct fixed batches cycled through")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations per case")
    parser.add_argument("--repeats", type=int, default=40, help="timed iterations (rounds) per case")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args = parser.parse_args(argv)

    notes, cases = [], {}
    with tempfile.TemporaryDirectory() as work_dir:
        for engine in args.engines:
            if engine == "detectron2":
                try:
                    import mabn.engine.coco.detectron2_trainer  # noqa: F401
                except ImportError as error:
                    notes.append(f"detectron2 skipped: {error}")
                    continue
            elif engine != "torchvision":
                parser.error(f"unknown engine {engine!r}: use torchvision and/or detectron2")
            for norm in args.norms:
                cfg = config(args, norm, engine)
                torch.manual_seed(0)
                with contextlib.redirect_stdout(sys.stderr):  # keep stdout for the table
                    cases[(engine, norm)] = (
                        Detectron2Case(cfg, args.batches, work_dir)
                        if engine == "detectron2"
                        else TorchvisionCase(cfg, args.batches)
                    )
                if norm == "bn-wcopy":  # the parameters stay the same objects: the optimizer still holds them
                    copy_weights(cases[(engine, norm)].model)
        if "bn-wcopy" in args.norms:
            notes.append(
                "bn-wcopy: bn whose convs that MABN centralizes copy their weight (forward) and its gradient "
                "(backward), which trains exactly as bn: the least time that centralizing by materializing "
                "W - mean(W) and its projected gradient adds to bn"
            )
        if "syncbn" in args.norms:
            notes.append(
                "syncbn runs in one process here: nothing to synchronize, so it times BN's path "
                "(this suite's SyncBatchNorm falls back to batch_norm without a process group)"
            )
        with contextlib.redirect_stdout(sys.stderr):
            times = benchmark(cases, args.warmup, args.repeats, args.device)

    cfg = config(args, "bn", "torchvision")
    title = (
        f"Mask R-CNN training iteration (forward + backward + SGD step), detector {args.detector} "
        f"({cfg.detector.backbone}, {cfg.detector.channels}-channel FPN/heads), {args.batch} images of "
        f"{cfg.data.min_size}-{cfg.data.max_size} px per iteration, {setting(args.device)}, "
        f"{args.repeats} round-robin rounds after {args.warmup} warm-up iterations, "
        f"norm kernels: MABN_FUSED={os.environ['MABN_FUSED']} (mabn.norms.fused).\n\n"
        + command(["scripts/bench_detection.py", *(argv if argv is not None else sys.argv[1:])])
    )
    rois = {key: case.mask_rois[-args.repeats :] for key, case in cases.items()}  # the timed iterations'
    notes.append(
        "mask RoIs: the positive proposals the mask head trains on, which depend on what each model has "
        "learnt, so this share of the work differs between norms (the two bn models, trained alike, "
        "match); the box head's samples are fixed by the config"
    )
    publish(table(times, rois, notes, title), args.out)


if __name__ == "__main__":
    main()
