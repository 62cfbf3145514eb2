# Sourced by the other scripts: create .venv and install fxbns with its test extra when missing.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
VENV="${FXBNS_VENV:-.venv}"
STAMP="$VENV/.fxbns-installed"
if [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
    echo "[setup] creating $VENV and installing fxbns[test,dev] (first run only)" >&2
    python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[test,dev]'
    touch "$STAMP"
fi
PY="$VENV/bin/python"
# Keep large allocations mapped between steps (see ../shared/MEASURING.md); harmless elsewhere.
export MALLOC_MMAP_THRESHOLD_="${MALLOC_MMAP_THRESHOLD_:-4294967296}"
export MALLOC_TRIM_THRESHOLD_="${MALLOC_TRIM_THRESHOLD_:-68719476736}"
export MALLOC_TOP_PAD_="${MALLOC_TOP_PAD_:-1073741824}"
