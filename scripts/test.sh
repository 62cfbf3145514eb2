#!/usr/bin/env bash
# The whole test suite (model-zoo tests included); extra arguments go to pytest.
#   bash scripts/test.sh                 the suite
#   bash scripts/test.sh --cov [ARGS]    the suite under coverage (pytest-cov) over fxbns: a per-file table with
#                                        the lines missed on the terminal, and out/coverage/ (HTML) + out/coverage.json
# Hypothesis profile: HYPOTHESIS_PROFILE=dev|ci|thorough (default: ci under CI, dev otherwise; tests/conftest.py).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
if [[ "${1:-}" == "--cov" ]]; then
    shift
    mkdir -p out
    exec "$PY" -m pytest -q --cov=fxbns --cov-branch --cov-report=term-missing:skip-covered \
        --cov-report=html:out/coverage --cov-report=json:out/coverage.json "$@"
fi
exec "$PY" -m pytest -q "$@"
