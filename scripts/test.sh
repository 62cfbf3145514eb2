#!/usr/bin/env bash
# The whole test suite (model-zoo tests included).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
exec "$PY" -m pytest -q "$@"
