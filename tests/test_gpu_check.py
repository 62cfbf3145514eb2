"""scripts/gpu-check.sh --smoke: the GPU check's own code, run on the CPU at tiny sizes, so it cannot rot."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_gpu_check_smoke(tmp_path):
    p = subprocess.run(["bash", "scripts/gpu-check.sh", "--smoke", "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600, env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "gpu-check: OK" in p.stdout
    (record,) = tmp_path.glob("gpu-check-smoke-*.json")
    r = json.loads(record.read_text())
    assert r["tests"]["returncode"] == 0 and r["layers"] and all(row["correct"] for row in r["layers"])
    assert any(row.get("runs") == "sampled" for row in r["layers"])
    assert r["steps"] and r["steps"][0]["sampled_sites"] > 0 and r["steps"][0]["speedup"] > 0
