#!/usr/bin/env bash
# The detection study (configs/experiment/scenes_study.yaml): Mask R-CNN from scratch at one
# process x 2 images with BN, BRN, GN, MABN, the successors CBN, GN+WS and EvoNorm-S0 and the
# relative PowerNorm, 5 seeds each, paired by seed (seed k: the same initialization and data
# order for every norm); then the 2 processes x 2 images pairs (SyncBN vs MABN, from scratch and fine-tuned), 3 seeds each.
# Seed by seed, so every finished seed completes the pairs; on this machine two one-thread runs
# at a time from one queue across seeds (7 norms per seed would leave a core idle at the end of
# every seed in a per-seed multirun). Every step resumes a run cut short and skips a finished one,
# so relaunching the script continues it:
#   bash scripts/scenes_study.sh                        # two one-thread runs side by side
#   LAUNCHER=slurm bash scripts/scenes_study.sh         # the one-process runs on a cluster, seed by seed
#   SEEDS="0 1" bash scripts/scenes_study.sh            # the first seeds only
# After each run scripts/scenes_report.py updates results/scenes_study.md/.png and keeps each
# finished run's summary in results/scenes_study_runs/; a run kept there is skipped, so the study
# also continues in a fresh clone. Measured on 2 CPU cores, two runs side by side with nothing else
# running: 30-37 minutes per run (CBN about 50), so about 10 hours for the 35 one-process runs;
# 7-10 more for the 12 pair runs (2 processes on both cores: SyncBN 38-54 minutes, MABN 30-44, by machine;
# before the fine-tuned ones, the two classifiers side by side: 4.5 and 6.2 minutes). Beside the test loop (scripts/repeat_tests.sh) a BN or BRN run took 69-77 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/scenes_study}
KEPT=${KEPT:-results/scenes_study_runs}
PRETRAINED=runs/scenes_pretrain/fashion_mnist-resnet18
NORMS=(bn brn gn mabn cbn gn_ws evonorm_s0 powernorm)
kept() { [ -f "$KEPT/$1.json" ]; }
report() {  # one report at a time (two runs may finish together)
    mkdir -p "$OUT" && flock "$OUT/.report.lock" "$PYTHON" scripts/scenes_report.py > /dev/null \
        || echo "warning: the report failed; the study goes on" >&2
}
missing() {  # the norms of one seed not kept yet, as norm,norm,...
    local norm out=()
    for norm in "${NORMS[@]}"; do kept "$norm-b2-scratch-s$1" || out+=("$norm"); done
    (IFS=,; echo "${out[*]}")
}
one() {  # one run at 1 process x 2 images, one thread; a failed run is reported and left to resume
    "$PYTHON" train_coco.py experiment=scenes_study seed="$1" norm="$2" "hydra.run.dir=$OUT/\${run_name}" \
        || echo "warning: $2-b2-scratch-s$1 failed; relaunch the script to resume it" >&2
    report
}
scratch() {  # every seed's one-process runs: two at a time here, or seed by seed on a cluster
    local seed norm
    for seed in ${SEEDS:-0 1 2 3 4}; do
        norm=$(missing "$seed")
        [ -n "$norm" ] || continue
        if [ -n "${LAUNCHER:-}" ]; then
            "$PYTHON" train_coco.py -m "hydra/launcher=$LAUNCHER" experiment=scenes_study seed="$seed" norm="$norm"
            report
            continue
        fi
        for norm in ${norm//,/ }; do
            while [ "$(jobs -rp | wc -l)" -ge 2 ]; do wait -n || true; done
            one "$seed" "$norm" &
        done
    done
    wait
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

scratch
for seed in 0 1 2; do
    two syncbn "$seed" scratch                # SyncBN over 2 processes x 2 images
    two mabn "$seed" scratch                  # MABN at 2 x 2 too: the fair match for SyncBN
done
# the fine-tuning pair: Fashion-MNIST classifiers with their own norm, then detection from them
if ! (for seed in 0 1 2; do kept "mabn-2x2-finetune-s$seed" && kept "syncbn-2x2-finetune-s$seed" || exit 1; done); then
    "$PYTHON" train_imagenet.py experiment=scenes_pretrain norm=bn batch=32 &
    "$PYTHON" train_imagenet.py experiment=scenes_pretrain norm=mabn batch=2 &
    wait
fi
for seed in 0 1 2; do
    two mabn "$seed" finetune weights="$PRETRAINED/mabn-b2-s0/model_final.pt"
    two syncbn "$seed" finetune weights="$PRETRAINED/bn-b32-s0/model_final.pt"
done
