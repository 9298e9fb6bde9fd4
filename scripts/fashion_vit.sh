#!/usr/bin/env bash
# The transformer study (configs/experiment/fashion_vit.yaml): LN, BN, PowerNorm and MABN in a small
# ViT on Fashion-MNIST; Hydra multiruns into runs/fashion_vit, resumable; runs kept in
# results/fashion_vit_runs are skipped (also in a fresh clone). Then: python scripts/relatives_report.py.
#   bash scripts/fashion_vit.sh                       # two one-thread jobs side by side
#   LAUNCHER=slurm bash scripts/fashion_vit.sh        # on a cluster (configs/hydra/launcher)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
run() { "$PYTHON" train_imagenet.py -m "hydra/launcher=${LAUNCHER:-local_parallel}" kept_runs=results/fashion_vit_runs "$@"; }

run experiment=fashion_vit norm=ln batch=32                                # 3: LN ignores the batch
run experiment=fashion_vit norm=bn,powernorm,mabn batch=32,2               # 18
