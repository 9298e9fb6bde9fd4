#!/usr/bin/env bash
# The speed benchmarks on a CUDA GPU, in the layouts GPU training uses; writes results/*_cuda*.md:
#   bash scripts/bench_gpu.sh            # about 10 minutes on one GPU
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
    echo "bench_gpu.sh: no CUDA device visible to torch: run it on a GPU machine (CPU tables: scripts/bench_norms.py)" >&2
    exit 1
fi
"$python" scripts/bench_norms.py --device cuda --out results/bench_norms_cuda.md
"$python" scripts/bench_norms.py --device cuda --channels-last --out results/bench_norms_cuda_channels_last.md
"$python" scripts/bench_norms.py --device cuda --autocast fp16 --out results/bench_norms_cuda_fp16.md
"$python" scripts/bench_norms.py --device cuda --autocast fp16 --channels-last \
    --out results/bench_norms_cuda_fp16_channels_last.md
"$python" scripts/bench_train.py --device cuda --out results/bench_train_cuda.md
"$python" scripts/bench_detection.py --device cuda --out results/bench_detection_cuda.md
