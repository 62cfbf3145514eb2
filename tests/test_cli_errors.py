"""CLI behaviours a new user meets: output permissions, outputs checked before any work, one-sentence load
errors without torch's warnings, misfit state dicts summarised, --num-classes read from the checkpoint."""

import os
import pickle
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, umask=None):
    env = dict(os.environ, PYTHONWARNINGS="default")  # torch's warnings visible: none may reach the user
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, str(ROOT / "tools" / "rewrite.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=600, preexec_fn=pre)


def _error(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.strip() and not ln.startswith("[fxbns]")]
    assert len(lines) == 1 and lines[0].startswith("fxbns: error:"), p.stderr  # no warning before it
    return lines[0]


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_outputs_get_umask_permissions(tmp_path, umask):
    p = run("--input-shape", "2,3,32,32", "--out", tmp_path / "ck.pt", "--report", tmp_path / "r.json",
            "--save-policy", tmp_path / "p.yaml", umask=umask)
    assert p.returncode == 0, p.stderr
    for name in ("ck.pt", "r.json", "p.yaml"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


@pytest.mark.parametrize("where, needle", [
    ("/proc/fxbns-out.json", "folder '/proc' does not accept new files"),
    ("FILE/r.json", "is a file, not a folder"),
    ("missing/r.json", "does not exist"),
])
@pytest.mark.parametrize("flag", ["--report", "--out", "--onnx"])
def test_unwritable_output_fails_before_any_work(tmp_path, where, needle, flag):
    (tmp_path / "FILE").write_text("a file")
    p = run("--arch", "torchvision:resnet18", flag, where.replace("FILE", str(tmp_path / "FILE"))
            .replace("missing", str(tmp_path / "missing")))
    assert p.returncode == 1
    line = _error(p)
    assert line.startswith(f"fxbns: error: {flag}: cannot write") and needle in line
    assert "loading the model" not in p.stderr  # refused before the model was built
    assert ".tmp" not in line and sorted(os.listdir(tmp_path)) == ["FILE"]


def test_load_errors_are_one_sentence_without_torch_warnings(tmp_path):
    sd = torchvision.models.resnet18(num_classes=10).state_dict()
    torch.save(sd, tmp_path / "good.pt")
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with open(tmp_path / "proto4.pt", "wb") as f:  # a pickle torch.load warns about (protocol 4), then refuses
        pickle.dump({"a": 1}, f, protocol=4)
    (tmp_path / "empty.pt").write_bytes(b"")
    cases = {"trunc.pt": "its zip archive is incomplete or damaged", "proto4.pt": "not a PyTorch file",
             "empty.pt": "empty or was cut short"}
    for name, needle in cases.items():
        p = run(tmp_path / name, "--arch", "torchvision:resnet18")
        assert p.returncode in (1, 2), (name, p.stderr)
        line = _error(p)
        assert needle in line, (name, line)
        assert "Detected pickle protocol" not in p.stderr and "Weights only load failed" not in p.stderr
        assert not line.endswith(("...", ",")) and len(line) < 300, line


def test_wrong_architecture_is_summarised(tmp_path):
    torch.save(torchvision.models.mobilenet_v2(num_classes=10).state_dict(), tmp_path / "mv2.pt")
    p = run(tmp_path / "mv2.pt", "--arch", "torchvision:resnet18")
    assert p.returncode == 1
    line = _error(p)
    assert "does not fit torchvision:resnet18: 122 missing keys (e.g. conv1.weight, " in line
    assert "314 unexpected keys (e.g. features.0.0.weight, " in line and line.endswith("check --arch")
    assert len(line) < 400


def test_num_classes_from_the_state_dict_torchvision_and_timm(tmp_path):
    torch.save(torchvision.models.resnet18(num_classes=7).state_dict(), tmp_path / "r18.pt")
    p = run(tmp_path / "r18.pt", "--arch", "torchvision:resnet18", "--input-shape", "2,3,32,32", "--out",
            tmp_path / "ck.pt")
    assert p.returncode == 0, p.stderr
    assert "--num-classes 7: read from the state dict (fc.weight has 7 outputs)" in p.stderr
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["state_dict"]["fc.weight"].shape[0] == 7
    # an explicit --num-classes that does not fit: the shapes say why
    p = run(tmp_path / "r18.pt", "--arch", "torchvision:resnet18", "--num-classes", "5")
    line = _error(p)
    assert "2 with another shape" in line and "fc.weight: 7x512 in the file, 5x512 in the model" in line
    assert line.endswith("check --arch and --num-classes")
    timm = pytest.importorskip("timm")
    torch.save(timm.create_model("resnet18", pretrained=False, num_classes=3).state_dict(), tmp_path / "t.pt")
    p = run(tmp_path / "t.pt", "--arch", "timm:resnet18", "--input-shape", "2,3,32,32", "--explain")
    assert p.returncode == 0, p.stderr
    assert "--num-classes 3: read from the state dict (fc.weight has 3 outputs)" in p.stderr
