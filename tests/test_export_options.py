"""export_onnx's options and its TorchScript fallback, each checked in onnxruntime against the original model."""

import dataclasses
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxbns
from fxbns.export import check_onnx


def _ort(path, x):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


def _close(got, ref):
    assert float(np.abs(ref).max()) <= 20  # bounded outputs: the absolute tolerance below means something
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def _batch_dim(path):
    return onnx.load(str(path)).graph.input[0].type.tensor_type.shape.dim[0]


def _opset(path):
    return next(o.version for o in onnx.load(str(path)).opset_import if o.domain in ("", "ai.onnx"))


def _conv_bn():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    with torch.no_grad():
        m[1].running_mean.normal_()
        m[1].running_var.uniform_(0.5, 2)
        m[1].weight.uniform_(0.5, 1.5)
    return m.eval()


class ValueDependent(nn.Module):
    """Python control flow on a tensor's value: torch.export refuses it, the TorchScript tracer records one path."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.bn(self.conv(x))
        return y * (1.0 if int((y > -1e9).sum()) >= 0 else 2.0)


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.rand_like(x)


@pytest.mark.parametrize("dynamic_batch", [True, False])
def test_torchscript_fallback(tmp_path, dynamic_batch):
    m = ValueDependent().eval()
    x = torch.randn(3, 3, 8, 8)
    with pytest.warns(torch.jit.TracerWarning):  # the tracer says it recorded one branch
        r = fxbns.export_onnx(m, x, tmp_path / "m.onnx", dynamic_batch=dynamic_batch)
    assert r.exporter == "torchscript"
    assert r.fallback_reason.startswith("TorchExportError: ") and "\x1b" not in r.fallback_reason
    assert r.opset == 17 == _opset(r.path)  # the TorchScript exporter's default
    assert r.max_error is not None and r.max_error < 1e-4
    assert r.nodes_before == 0 and r.bn_folded == 0  # not traceable by fx: exported unfolded
    n = 5 if dynamic_batch else 3
    assert r.checked_batches == ([1, 4] if dynamic_batch else [3])
    assert bool(_batch_dim(r.path).dim_param) == dynamic_batch
    xi = torch.randn(n, 3, 8, 8)
    with torch.no_grad():
        _close(_ort(r.path, xi), m(xi).numpy())


def test_dynamo_exporter_needs_no_fallback(tmp_path):
    m = _conv_bn()
    r = fxbns.export_onnx(m, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx")
    assert r.exporter == "dynamo" and r.fallback_reason is None and r.bn_folded == 1
    d = r.to_dict()  # a JSON-ready dict of every field, with the values above
    assert json.loads(json.dumps(d)) == d
    assert set(d) == {f.name for f in dataclasses.fields(fxbns.ExportResult)}
    assert d["path"] == r.path and d["bn_folded"] == 1 and d["checked_batches"] == r.checked_batches


def test_fixed_batch(tmp_path):
    m = _conv_bn()
    x = torch.randn(3, 3, 8, 8)
    r = fxbns.export_onnx(m, x, tmp_path / "m.onnx", dynamic_batch=False)
    assert r.exporter == "dynamo" and r.checked_batches == [3] and r.max_error < 1e-4
    dim = _batch_dim(r.path)
    assert not dim.dim_param and dim.dim_value == 3
    with pytest.raises(ValueError, match="fixed batch size \\(3\\), not a dynamic axis"):
        check_onnx(r.path)
    with torch.no_grad():
        _close(_ort(r.path, x), m(x).numpy())
    with pytest.raises(Exception, match="(?i)dimension|shape"):  # onnxruntime refuses another batch size
        _ort(r.path, torch.randn(2, 3, 8, 8))
    # a batch of one stays one (with a dynamic axis it is widened to two for the exporter)
    r1 = fxbns.export_onnx(m, torch.randn(1, 3, 8, 8), tmp_path / "one.onnx", dynamic_batch=False)
    assert _batch_dim(r1.path).dim_value == 1 and r1.checked_batches == [1]
    r2 = fxbns.export_onnx(m, torch.randn(1, 3, 8, 8), tmp_path / "dyn.onnx")
    assert _batch_dim(r2.path).dim_param and r2.checked_batches == [1, 3]


@pytest.mark.parametrize("opset", [18, 20])
def test_opset(tmp_path, opset):
    m = _conv_bn()
    x = torch.randn(2, 3, 8, 8)
    r = fxbns.export_onnx(m, x, tmp_path / "m.onnx", opset=opset)
    assert r.exporter == "dynamo" and r.opset == opset == _opset(r.path)
    xi = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        _close(_ort(r.path, xi), m(xi).numpy())


def test_opset_on_the_fallback(tmp_path):
    with pytest.warns(torch.jit.TracerWarning):
        r = fxbns.export_onnx(ValueDependent().eval(), torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", opset=16)
    assert r.exporter == "torchscript" and r.opset == 16 == _opset(r.path)


def test_verify_false_skips_the_check(tmp_path):
    m = _conv_bn()
    r = fxbns.export_onnx(m, torch.randn(2, 3, 8, 8), tmp_path / "m.onnx", verify=False)
    assert r.max_error is None and r.checked_batches == []
    xi = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        _close(_ort(r.path, xi), m(xi).numpy())  # the file is the same good export
    # a model onnxruntime cannot reproduce: refused when verified, written as asked when not
    with pytest.raises(ValueError, match="differs from PyTorch"):
        fxbns.export_onnx(Noisy(), torch.randn(2, 3, 8, 8), tmp_path / "noisy.onnx", fold=False)
    assert not (tmp_path / "noisy.onnx").exists()
    r = fxbns.export_onnx(Noisy(), torch.randn(2, 3, 8, 8), tmp_path / "noisy.onnx", fold=False, verify=False)
    assert r.max_error is None and (tmp_path / "noisy.onnx").exists()


def test_ort_providers():
    from fxbns.export import ort_providers

    got = ort_providers()
    assert got[-1] == "CPUExecutionProvider"
    cuda = torch.cuda.is_available() and "CUDAExecutionProvider" in ort.get_available_providers()
    assert got == (["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"])
