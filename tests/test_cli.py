"""The CLI, driven as a subprocess: exit codes, messages, outputs (atomic), ONNX checked in onnxruntime."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torchvision

import fxbns

ROOT = Path(__file__).resolve().parents[1]
# every test here runs the CLI in subprocesses: a hang fails after 300 s (pytest-timeout), each run after 240 s
pytestmark = pytest.mark.timeout(300)


def run(*args, cwd=None, warnings="ignore", prefix=()):
    env = dict(os.environ, PYTHONWARNINGS=warnings)
    return subprocess.run([*prefix, sys.executable, str(ROOT / "tools" / "rewrite.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=240)


def unprivileged():
    """A command prefix under which a folder's permission bits bind: none for a normal user; for root (as in
    CI containers) ``setpriv`` dropping the capabilities that override them.  ``None`` where neither works."""
    if os.geteuid() != 0:
        return ()
    if shutil.which("setpriv") is None:
        return None
    return ("setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--")


def _one_error_line(p):
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("fxbns: error:")]
    assert len(lines) == 1, p.stderr
    assert "Traceback" not in p.stderr
    return lines[0]


@pytest.mark.slow
def test_default_model_all_outputs(tmp_path):
    p = run("--policy", "fs", "--out", tmp_path / "ck.pt", "--onnx", tmp_path / "m.onnx", "--report",
            tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    # at the default 2x3x32x32 every layer is under the fs preset's 2**19 elements: exact, and the report says so
    assert "20 BatchNorm sites: 0 sampled, 20 exact" in p.stdout and "fs(band" in p.stdout
    rep = json.loads((tmp_path / "r.json").read_text())
    assert len(rep["sites"]) == 20 and rep["sites"][0]["spec"]["kind"] == "fs"
    # the checkpoint rebuilds
    gm = fxbns.load(tmp_path / "ck.pt", torchvision.models.resnet18(num_classes=10))
    assert fxbns.report(gm).rows[0]["estimator"].startswith("fs")
    # the ONNX file runs in onnxruntime and matches PyTorch
    gm.eval()
    x = torch.randn(3, 3, 32, 32)
    s = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    y = s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(y, gm(x).numpy(), rtol=1e-4, atol=1e-4)
    assert "onnxruntime" in p.stdout and "max relative error" in p.stdout
    assert "[fxbns] exporting ONNX and checking it in onnxruntime ..." in p.stderr  # progress (test_progress_lines)
    assert sorted(os.listdir(tmp_path)) == ["ck.pt", "m.onnx", "r.json"]  # no temporaries left


def test_state_dict_with_arch_and_explain(tmp_path):
    m = torchvision.models.mobilenet_v2(num_classes=7)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    p = run(tmp_path / "sd.pt", "--arch", "torchvision:mobilenet_v2", "--num-classes", "7", "--policy", "bs",
            "--input-shape", "2,3,64,64", "--explain", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    assert "52 BatchNorm sites" in p.stdout and "bs(ratio=0.125, device speed rule)" in p.stdout
    assert json.loads((tmp_path / "r.json").read_text())["sites"][0]["shape"] == [2, 32, 32, 32]
    # without --num-classes: read from the state dict's classifier
    p = run(tmp_path / "sd.pt", "--arch", "torchvision:mobilenet_v2", "--input-shape", "2,3,64,64", "--explain")
    assert p.returncode == 0 and "--num-classes 7: read from the state dict" in p.stderr
    # a state_dict without --arch
    p = run(tmp_path / "sd.pt")
    assert p.returncode == 2 and "--arch" in _one_error_line(p)


def test_pickled_module_needs_trust(tmp_path):
    m = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(m, tmp_path / "whole.pt")
    p = run(tmp_path / "whole.pt", "--input-shape", "2,3,16,16")
    assert p.returncode == 2
    line = _one_error_line(p)
    assert "--trust" in line and "runs code" in line
    p = run(tmp_path / "whole.pt", "--trust", "--input-shape", "2,3,16,16", "--out", tmp_path / "ck.pt")
    assert p.returncode == 0, p.stderr
    assert "1 BatchNorm site: 0 sampled, 1 exact" in p.stdout and (tmp_path / "ck.pt").exists()


@pytest.mark.parametrize("args, code, needle", [
    (["missing.pt"], 1, "does not exist"),
    (["--policy", "fastest"], 2, "unknown preset 'fastest'"),
    (["--input-shape", "2,x,3"], 2, "--input-shape"),
    (["--input-shape", "2,4,32,32"], 1, "does not run on an input of shape"),
    (["--arch", "torchvision:resnet181"], 1, "did you mean resnet18"),
    (["--out", "no/such/folder/ck.pt"], 1, "does not exist"),
    (["--tune", "--tune-steps", "0"], 2, "--tune-steps must be >= 1"),
    (["--save-policy", "no/such/folder/p.json"], 1, "does not exist"),
])
def test_errors_are_one_clear_line(tmp_path, args, code, needle):
    p = run(*args, cwd=tmp_path)
    assert p.returncode == code, (p.stdout, p.stderr)
    assert needle in _one_error_line(p)


def test_corrupt_file_and_existing_output_kept(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00not a torch file at all")
    keep = tmp_path / "r.json"
    keep.write_bytes(b"keep me\n")
    # a failing run whose output exists: the model cannot be read, the existing report is untouched
    p = run(bad, "--arch", "torchvision:resnet18", "--report", keep)
    assert p.returncode == 1 and "not a PyTorch file or it is corrupt" in _one_error_line(p)
    assert keep.read_bytes() == b"keep me\n"
    # an unwritable output folder: refused before any work, its existing file and the other outputs untouched
    prefix = unprivileged()
    if prefix is None:
        pytest.skip("running as root without setpriv: folder permissions do not bind")
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "ck.pt").write_bytes(b"old checkpoint")
    ro.chmod(0o555)
    try:
        probe = subprocess.run([*prefix, sys.executable, "-c", f"import os; print(os.access({str(ro)!r}, os.W_OK))"],
                               capture_output=True, text=True, timeout=60)
        assert probe.stdout.strip() == "False", probe  # the folder really is read-only for the CLI
        p = run("--report", keep, "--out", ro / "ck.pt", prefix=prefix)
        assert p.returncode == 1, p.stderr
        line = _one_error_line(p)
        assert "--out" in line and "does not accept new files" in line
    finally:
        ro.chmod(0o755)
    assert (ro / "ck.pt").read_bytes() == b"old checkpoint"
    assert keep.read_bytes() == b"keep me\n"  # nor the report, whose folder is writable
    assert sorted(os.listdir(tmp_path)) == ["bad.pt", "r.json", "ro"] and os.listdir(ro) == ["ck.pt"]


def test_progress_lines(monkeypatch, capsys):
    """Each step announces itself; one that took over a second also says how long (the clock is forced here)."""
    from fxbns import cli

    clock = iter([10.0, 12.5, 20.0, 20.4])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    with cli._step("exporting"):
        pass
    with cli._step("planning"):
        pass
    err = capsys.readouterr().err.splitlines()
    assert err == ["[fxbns] exporting ...", "[fxbns] exporting: done in 2.5 s", "[fxbns] planning ..."]


def test_debug_shows_traceback(tmp_path):
    p = run("--policy", "fastest", "--debug", cwd=tmp_path)
    assert p.returncode != 0 and "Traceback" in p.stderr


def test_console_script_is_installed():
    exe = Path(sys.executable).parent / "fxbns"
    assert exe.exists()
    p = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "--policy" in p.stdout


def test_min_elements_flag(tmp_path):
    p = run("--policy", "bs", "--min-elements", "0", "--explain", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    rep = json.loads((tmp_path / "r.json").read_text())
    assert all(s["spec"]["min_elements"] == 0 and not s["exact_below_batch"] for s in rep["sites"])
    p = run("--policy", "fs", "--min-elements", "-3", "--explain")
    assert p.returncode == 2
    assert "--min-elements" in _one_error_line(p) and "integer >= 0" in p.stderr


def test_sample_backward_flag(tmp_path):
    p = run("--policy", "fs", "--sample-backward", "--explain", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    sites = json.loads((tmp_path / "r.json").read_text())["sites"]
    sampled = [s for s in sites if s["spec"] is not None]
    assert sampled and all(s["spec"]["sample_backward"] for s in sampled)
    assert all(s["spec"]["min_elements"] is None for s in sampled)  # the preset's other settings kept (the device rule)
    # rewriting with it warns, in one line, with where to read why (gradients inflate on deep models)
    p = run("--policy", "bs", "--sample-backward", "--out", tmp_path / "ck.pt",
            warnings="ignore,default:sample_backward")  # torch's own warnings stay silenced
    assert p.returncode == 0, p.stderr
    warned = [ln for ln in p.stderr.splitlines() if ln.startswith("fxbns: warning: sample_backward is on for")]
    assert len(warned) == 1 and "gradient_stability" in warned[0]
    assert "warning" not in run("--policy", "bs", "--out", tmp_path / "ck2.pt",
                                warnings="ignore,default:sample_backward").stderr
    p = run("--policy", "vdn", "--sample-backward", "--explain")
    assert p.returncode == 2
    assert "--sample-backward" in _one_error_line(p) and "no BS or FS" in p.stderr


def test_tune_flag_writes_the_tuned_policy_and_uses_it(tmp_path):
    p = run("--input-shape", "16,3,32,32", "--policy", "fs", "--min-elements", "0", "--tune", "--tune-steps", "2",
            "--save-policy", tmp_path / "p.json", "--out", tmp_path / "ck.pt", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    assert "sampled sites timed over 2 step pairs" in p.stdout
    pol = json.loads((tmp_path / "p.json").read_text())
    exact = {n for n, s in pol.get("module_name", {}).items() if s["kind"] == "exact"}
    n_set = int(p.stdout.split("step pairs: ")[1].split(" set exact")[0])
    assert len(exact) == n_set
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["tune"]["steps"] == 2 and {r["name"] for r in rep["tune"]["sites"] if r["choice"] == "exact"} == exact
    # the checkpoint holds the tuned policy: a load rebuilds the same choice
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["policy"].get("module_name", {}).keys() == pol.get("module_name", {}).keys()


def test_calibrate_flag_uses_the_calibrated_policy(tmp_path):
    from fxbns.datasets import photo_crops

    x = photo_crops(size=32, count=32, seed=0)
    torch.save(list(x.split(16)), tmp_path / "batches.pt")
    p = run("--calibrate", tmp_path / "batches.pt", "--target-error", "0.2", "--save-policy", tmp_path / "p.json",
            "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr
    assert "target error 0.2" in p.stdout and "2 batches of 16x3x32x32" in p.stdout
    pol = json.loads((tmp_path / "p.json").read_text())
    rep = json.loads((tmp_path / "r.json").read_text())
    assert set(pol["module_name"]) == {s["name"] for s in rep["sites"]}  # every site named by the calibration
    chosen = {n: s["kind"] for n, s in pol["module_name"].items()}
    assert {s["name"]: (s["spec"] or {"kind": "exact"})["kind"] for s in rep["sites"]} == chosen
    assert "fs" in chosen.values()
    torch.save({"x": x}, tmp_path / "dict.pt")
    for args, code, needle in [(["--calibrate", tmp_path / "dict.pt"], 1, "holds a dict"),
                               (["--calibrate", tmp_path / "none.pt"], 1, "no such file"),
                               (["--target-error", "0.1"], 2, "add --calibrate"),
                               (["--calibrate", tmp_path / "batches.pt", "--target-error", "2"], 2, "(0, 1]")]:
        p = run(*args)
        assert p.returncode == code, (args, p.stderr)
        assert needle in _one_error_line(p)
