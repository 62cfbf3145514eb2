#!/usr/bin/env bash
# The GPU check in one command: cuda-marked tests, per-layer speed at ResNet-50 b64 shapes, training steps.
# Needs a CUDA build of torch >= 2.5 already installed; uses nothing but this repository (no network, no installs).
#   bash scripts/gpu-check.sh           # on a machine with a CUDA GPU (about 6 minutes on an H200)
#   bash scripts/gpu-check.sh --smoke   # the same script on the CPU at tiny sizes (under 2 minutes)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec "$PY" tools/gpu_check.py "$@"
