"""Evaluate detection checkpoints with the backbone's running statistics re-estimated (a
diagnosis: is a dip in a norm's AP its evaluation statistics? mabn.studies.eval_statistics):

    python scripts/detection_eval_statistics.py runs/scenes_study/cbn-b2-scratch-s4/checkpoint.pt

Per checkpoint (any step of a torchvision-engine run): box and mask AP with its own running
statistics, then with those of every norm in the backbone (ResNet and FPN) re-estimated from
training images, over all of them at once and as the mean of the variances of groups of g
images (``--groups``); the heads keep theirs (their norms see RoIs, not images).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from mabn.engine.training import unwrap
from mabn.studies.eval_statistics import detection_backbone_input, load_detection_checkpoint, reestimate
from mabn.studies.reporting import publish


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint.pt files of detection runs")
    parser.add_argument("--images", type=int, default=64, help="training images to re-estimate from")
    parser.add_argument("--groups", type=int, nargs="*", default=[2, 8], help="group sizes of the variance estimator")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if any(g < 1 or args.images % g for g in args.groups):
        parser.error(f"--groups {args.groups}: each must divide --images {args.images}")
    estimators = [None, *args.groups]
    header = " | ".join(f"{'all images at once' if g is None else f'groups of {g}'} box / mask" for g in estimators)
    lines = [
        f"| run | step | own running statistics box / mask | {header} |",
        "|---|---|" + "---|" * (1 + len(estimators)),
    ]
    for checkpoint in args.checkpoints:
        with tempfile.TemporaryDirectory() as scratch:
            run = load_detection_checkpoint(checkpoint, Path(scratch))
            model = unwrap(run.model)
            images = detection_backbone_input(run, args.images)
            cells = []
            for group in [False, *estimators]:  # False: the checkpoint's own statistics, first
                if group is not False:
                    reestimate(model.backbone, images, group)
                metrics = run.evaluate()
                cells.append(f"{metrics['eval/box_AP']:.2f} / {metrics['eval/mask_AP']:.2f}")
        lines.append(f"| {checkpoint.parent.name} | {run.step} | " + " | ".join(cells) + " |")
        print(lines[-1], file=sys.stderr)
    publish(
        f"Box / mask AP of detection checkpoints with their own running statistics and with the backbone's "
        f"re-estimated from {args.images} training images (`python scripts/detection_eval_statistics.py "
        + " ".join(p.as_posix() for p in args.checkpoints)
        + "`).\n\n"
        + "\n".join(lines),
        args.out,
    )


if __name__ == "__main__":
    main()
