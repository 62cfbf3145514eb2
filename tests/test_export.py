"""ONNX export: folding, no training-mode BatchNormalization, dynamic batch, onnxruntime agreement."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torchvision
from conftest import every_layer
from torch import nn

import fxbns


def _trained(preset, model=None, shape=(4, 3, 32, 32)):
    """``model`` (default resnet18) transformed with ``preset`` and trained two steps.  Every BatchNorm keeps a
    cumulative average (``momentum=None``), so after two steps its running statistics are the mean of two
    batches'; at batch 16 the eval outputs of resnet18 stay of the order of one (an absolute tolerance then
    means something)."""
    torch.manual_seed(0)
    model = model or torchvision.models.resnet18(num_classes=10)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = None
    x = torch.randn(shape)
    gm = fxbns.transform(model, every_layer(preset), example_inputs=x)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        gm(x).square().mean().backward()
        opt.step()
    return model, gm, x


# absolute + relative: with outputs bounded by OUT_BOUND, an error of 1e-3 anywhere fails
RTOL, ATOL, OUT_BOUND = 1e-4, 1e-4, 5.0


def _close(got, ref):
    assert float(np.abs(ref).max()) <= OUT_BOUND  # the tolerance is tight only for bounded outputs
    np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)
    assert not np.allclose(got + 1e-3, ref, rtol=RTOL, atol=ATOL)  # a 1e-3 error would not pass


def _ort(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {s.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["fs", "vdn"])
def test_transformed_export_matches_folded_original(tmp_path, preset):
    _, gm, x = _trained(preset, shape=(16, 3, 32, 32))  # batch 16: 16 values per channel on the 1x1 maps
    a = fxbns.export_onnx(gm, x, tmp_path / "t.onnx")
    # an independent reference: the original, untransformed architecture holding the trained state, in eval mode
    orig = torchvision.models.resnet18(num_classes=10)
    # the same keys (the rewrite keeps the BatchNorms' parameter names), less the VDN's virtual samples
    orig.load_state_dict({k: v for k, v in gm.state_dict().items() if not k.startswith("_fxbns_virtual.")})
    orig.eval()
    b = fxbns.export_onnx(orig, x, tmp_path / "o.onnx")
    assert a.exporter == "dynamo" and a.bn_folded == 20 and a.max_error < 1e-4
    assert a.providers == ["CPUExecutionProvider"]
    ma, mb = onnx.load(a.path), onnx.load(b.path)
    assert [n.op_type for n in ma.graph.node] == [n.op_type for n in mb.graph.node]  # same structure
    assert not any(n.op_type == "BatchNormalization" for n in ma.graph.node)
    assert ma.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    for n in (1, 7):
        xi = torch.randn(n, 3, 32, 32)
        with torch.no_grad():
            ref = orig(xi).numpy()
        _close(_ort(a.path, xi), ref)
        _close(_ort(b.path, xi), ref)


def test_fold_alone_and_refuses_training():
    _, gm, x = _trained("bs", nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                                            nn.Linear(8 * 30 * 30, 6), nn.BatchNorm1d(6)))
    with pytest.raises(ValueError, match="eval"):
        fxbns.fold(gm)
    gm.eval()
    r = fxbns.fold(gm)
    assert r.folded == ["1", "5"] and r.nodes_after == r.nodes_before - 2
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in r.module.modules())
    with torch.no_grad():
        torch.testing.assert_close(r.module(x), gm(x), rtol=1e-4, atol=1e-4)  # folding re-rounds: the export tolerance


def test_fold_skips_what_cannot_fold():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)
            self.bn2 = nn.BatchNorm2d(4, track_running_stats=False)
            self.conv2 = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y, self.bn2(self.conv2(y))

    m = M().eval()
    r = fxbns.fold(m)
    assert r.folded == []
    assert "other users" in r.skipped["bn"] and "track_running_stats" in r.skipped["bn2"]


@pytest.mark.slow
def test_export_any_module_without_fold_and_atomicity(tmp_path):
    m = torchvision.models.mobilenet_v3_small(num_classes=5).eval()
    x = torch.randn(2, 3, 64, 64)
    r = fxbns.export_onnx(m, x, tmp_path / "m.onnx", fold=False)
    assert r.max_error < 1e-4 and r.checked_batches[0] == 1
    assert os.listdir(tmp_path) == ["m.onnx"]  # no temporary left behind
    # a failing export leaves the existing file untouched and no partial file
    before = (tmp_path / "m.onnx").read_bytes()

    class Noisy(nn.Module):  # exports fine, but onnxruntime cannot reproduce its random output
        def forward(self, x):
            return x + torch.rand_like(x)

    with pytest.raises(ValueError, match="differs from PyTorch"):
        fxbns.export_onnx(Noisy(), x, tmp_path / "m.onnx", fold=False)
    assert (tmp_path / "m.onnx").read_bytes() == before
    assert os.listdir(tmp_path) == ["m.onnx"]
