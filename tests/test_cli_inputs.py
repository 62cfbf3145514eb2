"""The CLI's input forms: an fxbns checkpoint, a {"state_dict": ...} file, --arch package.module:factory and
timm:NAME, a policy file, --save-policy YAML, --seed, --explain writing nothing.  Run as subprocesses."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torchvision
import yaml

import fxbns

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)  # subprocesses: a hang fails


def run(*args, cwd=None, pythonpath=None):
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, str(ROOT / "tools" / "rewrite.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def _state(path):
    obj = torch.load(path, weights_only=True)
    return {k: v for k, v in obj["state_dict"].items() if not k.startswith("_fxbns_virtual.")}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained_r18():
    torch.manual_seed(5)
    m = torchvision.models.resnet18(num_classes=3)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)  # not the factory's initialisation: a rebuilt model must have read these
        for b in m.buffers():
            if b.dtype.is_floating_point:
                b.add_(0.5)
    return m


def test_fxbns_checkpoint_as_input(tmp_path):
    m = _trained_r18()
    gm = fxbns.transform(m, "vdn", example_inputs=torch.randn(2, 3, 32, 32))
    fxbns.save(gm, tmp_path / "in.pt")
    p = run(tmp_path / "in.pt", "--arch", "torchvision:resnet18", "--num-classes", "3", "--policy", "bs",
            "--input-shape", "2,3,32,32", "--out", tmp_path / "out.pt")
    assert p.returncode == 0, p.stderr
    assert "20 BatchNorm sites" in p.stdout
    out = torch.load(tmp_path / "out.pt", weights_only=True)
    assert out["policy"]["default"]["kind"] == "bs"  # rewritten with the policy asked for, not the saved one
    assert _same_state(_state(tmp_path / "out.pt"), m.state_dict())  # the checkpoint's weights, VDN rows dropped


def test_state_dict_wrapped_in_a_mapping(tmp_path):
    m = _trained_r18()
    torch.save({"state_dict": m.state_dict(), "epoch": 7}, tmp_path / "train.pt")
    p = run(tmp_path / "train.pt", "--arch", "torchvision:resnet18", "--num-classes", "3", "--policy", "fs",
            "--input-shape", "2,3,32,32", "--out", tmp_path / "out.pt")
    assert p.returncode == 0, p.stderr
    assert _same_state(_state(tmp_path / "out.pt"), m.state_dict())
    # a mapping whose values are not tensors is refused by name
    torch.save({"epoch": 7, "lr": 0.1}, tmp_path / "meta.pt")
    p = run(tmp_path / "meta.pt", "--arch", "torchvision:resnet18")
    assert p.returncode == 1 and "is not a state_dict" in p.stderr


FACTORY = '''
import torch
from torch import nn


def tiny(num_classes=10):
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, num_classes))


class Noise(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


def noisy(num_classes=None):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), Noise())
'''


def test_arch_package_module_factory(tmp_path):
    (tmp_path / "my_models.py").write_text(textwrap.dedent(FACTORY))
    p = run("--arch", "my_models:tiny", "--num-classes", "6", "--policy", "bs", "--min-elements", "0",
            "--input-shape", "4,3,16,16", "--out", tmp_path / "ck.pt", "--report", tmp_path / "r.json",
            pythonpath=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "model: my_models:tiny" in p.stdout and "2 BatchNorm sites:" in p.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [s["name"] for s in rep["sites"]] == ["1", "4"] and rep["sites"][0]["shape"] == [4, 8, 14, 14]
    assert _state(tmp_path / "ck.pt")["7.weight"].shape == (6, 8)  # --num-classes reached the factory
    p = run("--arch", "my_models:nothing", pythonpath=tmp_path)
    assert p.returncode == 1 and "cannot import 'nothing' from 'my_models'" in p.stderr
    # a failing export leaves an existing ONNX file byte-identical, and no temporary beside it
    (tmp_path / "m.onnx").write_bytes(b"an older export")
    p = run("--arch", "my_models:noisy", "--input-shape", "2,3,8,8", "--onnx", tmp_path / "m.onnx",
            pythonpath=tmp_path)
    assert p.returncode == 1 and "differs from PyTorch" in p.stderr
    assert (tmp_path / "m.onnx").read_bytes() == b"an older export"
    assert sorted(f for f in os.listdir(tmp_path) if not f.startswith("__")) == ["ck.pt", "m.onnx", "my_models.py",
                                                                                 "r.json"]


def test_arch_timm(tmp_path):
    pytest.importorskip("timm")
    p = run("--arch", "timm:resnet18", "--num-classes", "5", "--policy", "fs", "--input-shape", "2,3,32,32",
            "--explain", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    assert "model: timm:resnet18" in p.stdout and "20 BatchNorm sites" in p.stdout
    assert json.loads((tmp_path / "r.json").read_text())["sites"][0]["shape"] == [2, 64, 16, 16]
    p = run("--arch", "timm:no_such_net_xyz", "--explain")
    assert p.returncode == 1 and "no_such_net_xyz" in p.stderr and "Traceback" not in p.stderr


def test_policy_file_and_save_policy_yaml(tmp_path):
    pol = {"default": {"kind": "bs", "ratio": 0.25, "min_elements": 0},
           "module_name": {"layer1.0.bn1": {"kind": "exact"}},
           "module_name_regex": [["layer4\\..*", {"kind": "fs", "area_ratio": 0.25}]]}
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(pol))
    p = run("--policy", tmp_path / "in.yaml", "--explain", "--report", tmp_path / "r.json",
            "--save-policy", tmp_path / "used.yaml")
    assert p.returncode == 0, p.stderr
    sites = {s["name"]: s for s in json.loads((tmp_path / "r.json").read_text())["sites"]}
    assert sites["layer1.0.bn1"]["estimator"] == "exact"
    assert sites["bn1"]["estimator"] == "bs(ratio=0.25)"
    assert sites["layer4.1.bn2"]["estimator"].startswith("fs(patch, area=0.25")
    used = yaml.safe_load((tmp_path / "used.yaml").read_text())  # YAML, by its extension
    assert fxbns.Policy.from_dict(used).to_dict() == fxbns.Policy.from_dict(pol).to_dict()
    # a preset saved as YAML loads back as the same policy
    p = run("--policy", "micro", "--explain", "--save-policy", tmp_path / "micro.yml")
    assert p.returncode == 0, p.stderr
    text = (tmp_path / "micro.yml").read_text()
    assert not text.lstrip().startswith("{")  # block YAML, not JSON
    assert yaml.safe_load(text) == fxbns.Policy.from_preset("micro").to_dict()


def test_seed_sets_the_weights_and_the_sampling_seed(tmp_path):
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        p = run("--seed", seed, "--policy", "fs", "--out", tmp_path / f"{name}.pt")
        assert p.returncode == 0, p.stderr
    a, b, c = (torch.load(tmp_path / f"{n}.pt", weights_only=True) for n in "abc")
    assert a["policy"]["seed"] == 1 and c["policy"]["seed"] == 2
    assert _same_state(a["state_dict"], b["state_dict"])  # the same seed: the same initial weights
    assert not torch.equal(a["state_dict"]["conv1.weight"], c["state_dict"]["conv1.weight"])


def test_explain_writes_nothing_but_the_report(tmp_path):
    p = run("--explain", "--policy", "bs", "--out", tmp_path / "ck.pt", "--onnx", tmp_path / "m.onnx",
            cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "20 BatchNorm sites" in p.stdout and "checkpoint:" not in p.stdout and "onnx:" not in p.stdout
    assert os.listdir(tmp_path) == []
    p = run("--explain", "--report", tmp_path / "r.json", "--out", tmp_path / "ck.pt", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert os.listdir(tmp_path) == ["r.json"]
