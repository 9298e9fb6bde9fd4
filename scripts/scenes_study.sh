#!/usr/bin/env bash
# The detection study (configs/experiment/scenes_study.yaml), headline runs first; every step
# resumes a run cut short and skips a finished one, so relaunching the script continues it:
#   bash scripts/scenes_study.sh                        # two one-thread jobs side by side
#   LAUNCHER=slurm bash scripts/scenes_study.sh         # the one-process runs on a cluster
# After each step scripts/scenes_report.py updates results/scenes_study.md/.png and keeps each
# finished run's summary in results/scenes_study_runs/; a run kept there is skipped, so the study
# also continues in a fresh clone. About 5 hours on 2 CPU cores (16 detection runs, 2
# classifier runs) when the machine is quiet.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=runs/scenes_study
KEPT=results/scenes_study_runs
PRETRAINED=runs/scenes_pretrain/fashion_mnist-resnet18
kept() { [ -f "$KEPT/$1.json" ]; }
report() { "$PYTHON" scripts/scenes_report.py > /dev/null || echo "warning: the report failed; the study goes on" >&2; }
coco() {  # one seed of the one-process runs not kept yet: BN, BRN, GN, MABN at 1 process x 2 images
    local seed=$1 norm missing=()
    for norm in bn brn gn mabn; do
        kept "$norm-b2-scratch-s$seed" || missing+=("$norm")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    "$PYTHON" train_coco.py -m "hydra/launcher=${LAUNCHER:-local_parallel}" experiment=scenes_study seed="$seed" \
        norm="$(IFS=,; echo "${missing[*]}")"
    report
}
two() {  # 2 processes x 2 images (gloo on CPU, one thread each), as the paper's 8 GPUs x 2 images
    local norm=$1 seed=$2 start=$3
    shift 3
    kept "$norm-2x2-$start-s$seed" && return
    OMP_NUM_THREADS=1 "$PYTHON" -m torch.distributed.run --nproc_per_node=2 --master_port=$((29600 + seed)) \
        train_coco.py experiment=scenes_study norm="$norm" seed="$seed" start="$start" \
        hydra.run.dir="$OUT/$norm-2x2-$start-s$seed" "$@"
    report
}

coco 0
two syncbn 0 scratch                          # SyncBN over 2 processes x 2 images
coco 1                                        # their second seed
two syncbn 1 scratch
two mabn 0 scratch                            # MABN at 2 x 2 too: the fair match for SyncBN
two mabn 1 scratch
# the fine-tuning pair: Fashion-MNIST classifiers with their own norm, then detection from them
if ! (kept mabn-2x2-finetune-s0 && kept syncbn-2x2-finetune-s0 && kept mabn-2x2-finetune-s1 \
      && kept syncbn-2x2-finetune-s1); then
    "$PYTHON" train_imagenet.py experiment=scenes_pretrain norm=bn batch=32 &
    "$PYTHON" train_imagenet.py experiment=scenes_pretrain norm=mabn batch=2 &
    wait
fi
for seed in 0 1; do
    two mabn "$seed" finetune weights="$PRETRAINED/mabn-b2-s0/model_final.pt"
    two syncbn "$seed" finetune weights="$PRETRAINED/bn-b32-s0/model_final.pt"
done
