#!/usr/bin/env python3
"""Thin wrapper over the ``fxbns`` console script: ``python tools/rewrite.py MODEL --policy fs``."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fxbns.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
