#!/usr/bin/env bash
# Set up the suite in a virtual environment at .venv (idempotent):
#   bash scripts/setup.sh
# PyTorch is pinned to a release this machine's pip can install; Fashion-MNIST (the embedded
# default) comes from Debian's dataset-fashion-mnist when run as root with apt, else from
# torchvision's download on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -d /usr/share/datasets/fashion-mnist ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/pip install -q --disable-pip-version-check -e ".[test]"
echo "set up: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
