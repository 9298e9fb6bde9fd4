#!/usr/bin/env bash
# The detection study (configs/experiment/scenes_study.yaml), headline runs first; every step
# resumes a run cut short and skips a finished one, so relaunching the script continues it:
#   bash scripts/scenes_study.sh                        # two one-thread jobs side by side
#   LAUNCHER=slurm bash scripts/scenes_study.sh         # the one-process runs on a cluster
# then: python scripts/scenes_report.py. About 3.5 hours on 2 CPU cores (20 detection runs,
# 2 classifier runs).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=runs/scenes_study
PRETRAINED=runs/scenes_pretrain/fashion_mnist-resnet18
coco() { "$PYTHON" train_coco.py -m "hydra/launcher=${LAUNCHER:-local_parallel}" experiment=scenes_study "$@"; }
two() {  # 2 processes x 2 images (gloo on CPU, one thread each), as the paper's 8 GPUs x 2 images
    local norm=$1 seed=$2 start=$3; shift 3
    OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nproc_per_node=2 --master_port=$((29600 + seed)) \
        train_coco.py experiment=scenes_study norm="$norm" seed="$seed" start="$start" \
        hydra.run.dir="$OUT/$norm-2x2-$start-s$seed" "$@"
}

coco seed=0                                   # 4 runs, one process x 2 images: BN, BRN, GN, MABN
two syncbn 0 scratch                          # SyncBN over 2 processes x 2 images
coco seed=1                                   # their second seed
two syncbn 1 scratch
two mabn 0 scratch                            # MABN at 2 x 2 too: the fair match for SyncBN
two mabn 1 scratch
# the fine-tuning pair: Fashion-MNIST classifiers with their own norm, then detection from them
"$PYTHON" train_imagenet.py experiment=scenes_pretrain norm=bn batch=32 &
"$PYTHON" train_imagenet.py experiment=scenes_pretrain norm=mabn batch=2 &
wait
for seed in 0 1; do
    two mabn "$seed" finetune weights="$PRETRAINED/mabn-b2-s0/model_final.pt"
    two syncbn "$seed" finetune weights="$PRETRAINED/bn-b32-s0/model_final.pt"
done
