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
    # every layer group and the step get a target row; a missed one carries a profile of the fxbns side
    targets = r["targets"]
    groups = {(row["estimator"], row["sample_backward"], row["dtype"], row["layout"]) for row in r["layers"]}
    assert len([t for t in targets if t["target"].startswith("layer")]) == len(groups)
    assert [t["target"] for t in targets].count("resnet50 step") == len(r["steps"])
    for t in targets:
        assert t["met"] == (t["speedup"] >= t["threshold"])
        if not t["met"]:
            assert t["profile"] and all(p["calls"] > 0 for p in t["profile"])
    assert all(t["profile_native"] for t in targets if t["target"] == "resnet50 step" and not t["met"])
    assert all("_steps" not in row for row in r["steps"])
