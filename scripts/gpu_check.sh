#!/usr/bin/env bash
# Everything a lent GPU should check, in at most 10 minutes on one GPU; writes results/*_cuda*.md
# and prints one summary line per part (logs in $LOGS, default a temporary folder):
#   bash scripts/gpu_check.sh
# Parts and their time limits (seconds), run in this order, each stopped at its limit:
#   smoke 60       one MABN layer forward/backward on CUDA: a broken machine costs a minute
#   tests 150      tests/norms/test_cuda.py (layers vs CPU float64, autocast, folding, probe, compiled
#                  kernels vs eager, a training run with AMP, SyncBN over NCCL)
#   norms 100      scripts/bench_norms.py: fp32 and fp16 x contiguous and channels_last, trimmed
#   train 70       scripts/bench_train.py: ResNet-50 training step per norm (AMP, channels_last)
#   detection 60   scripts/bench_detection.py: a Mask R-CNN iteration per norm (trimmed rounds)
#   fashion 150    300 Fashion-MNIST steps of BN at 32 and MABN at 2 with AMP and channels_last
# Without CUDA it exits at once with one line.
set -uo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python)}
if ! "$python" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    echo "gpu_check.sh: no CUDA device visible to torch: run it on a GPU machine" >&2
    exit 1
fi
LOGS=${LOGS:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
failed=0
part() {  # part NAME SECONDS COMMAND...: run with a time limit, one summary line
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    if timeout "$limit" "$@" > "$LOGS/$name.log" 2>&1; then
        echo "[gpu_check] $name: ok in $((SECONDS - start)) s ($(tail -1 "$LOGS/$name.log" | cut -c1-150))"
    else
        echo "[gpu_check] $name: FAILED (exit $?) after $((SECONDS - start)) s: see $LOGS/$name.log"
        failed=1
    fi
}
part smoke 60 "$python" -c "
import torch, mabn
layer = mabn.build_norm('mabn', 64, normalization_batch=2).cuda()
x = torch.randn(8, 64, 16, 16, device='cuda', requires_grad=True)
layer(x).square().sum().backward(); torch.cuda.synchronize()
assert torch.isfinite(x.grad).all(); print('mabn forward/backward on', torch.cuda.get_device_name())"
[ "$failed" = 0 ] || { echo "[gpu_check] the smoke test failed: stopping (a broken machine)"; exit 1; }
part tests 150 "$python" -m pytest -q -p no:cacheprovider tests/norms/test_cuda.py
part norms 100 bash -c "
for layout in '' '--channels-last'; do for amp in '' '--autocast fp16'; do
  name=results/bench_norms_cuda\$( [ -n \"\$amp\" ] && echo _fp16)\$( [ -n \"\$layout\" ] && echo _channels_last).md
  $python scripts/bench_norms.py --device cuda --repeats 11 --normalization-batches 32 2 \$layout \$amp --out \$name || exit 1
done; done"
part train 70 "$python" scripts/bench_train.py --device cuda --steps 6 --out results/bench_train_cuda.md
part detection 60 "$python" scripts/bench_detection.py --device cuda --repeats 6 --out results/bench_detection_cuda.md
part fashion 150 bash -c "
for run in 'norm=bn batch=32' 'norm=mabn batch=2'; do
  $python train_imagenet.py \$run max_steps=300 amp=true channels_last=true device=cuda workers=4 \
      hydra.run.dir=\$(mktemp -d /tmp/gpu_fashion.XXXXXX) | tail -1 || exit 1
done"
echo "[gpu_check] done: logs in $LOGS"
exit "$failed"
