#!/usr/bin/env bash
# The main job on the embedded default: rewrite ResNet-18 with the fs preset, report, train, export, check.
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec "$PY" -m fxbns.demo "$@"
