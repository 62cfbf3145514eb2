"""Every torchvision classification model with BatchNorm, with every preset (slow: marked, still run in CI).

For each: (a) eval output equals the original's, (b) a training step runs with a finite loss and a
gradient for every parameter, (c) the state_dict round-trips both ways, (d) the report lists every
BatchNorm.
"""

import copy

import pytest
import torch
from conftest import every_layer
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision import models as M

import fxbns
from fxbns.passes.virtual import VIRTUAL_NAME

ZOO = {
    "resnet18": (M.resnet18, 32, {}),
    "resnet50": (M.resnet50, 32, {}),
    "resnext50_32x4d": (M.resnext50_32x4d, 32, {}),
    "wide_resnet50_2": (M.wide_resnet50_2, 32, {}),
    "densenet121": (M.densenet121, 32, {}),
    "mobilenet_v2": (M.mobilenet_v2, 32, {}),
    "mobilenet_v3_small": (M.mobilenet_v3_small, 32, {}),
    "mobilenet_v3_large": (M.mobilenet_v3_large, 32, {}),
    "efficientnet_b0": (M.efficientnet_b0, 32, {}),
    "efficientnet_v2_s": (M.efficientnet_v2_s, 32, {}),
    "mnasnet0_5": (M.mnasnet0_5, 32, {}),
    "shufflenet_v2_x0_5": (M.shufflenet_v2_x0_5, 32, {}),
    "regnet_y_400mf": (M.regnet_y_400mf, 32, {}),
    # training output is a GoogLeNetOutputs namedtuple (aux heads): exercises output stripping
    "googlenet": (M.googlenet, 32, {"aux_logits": True, "init_weights": False}),
    # the aux head needs a 299 input; at 96 it is switched off
    "inception_v3": (M.inception_v3, 96, {"aux_logits": False, "init_weights": False}),
    "vgg11_bn": (M.vgg11_bn, 32, {}),
    "maxvit_t": (M.maxvit_t, 224, {}),
}
PRESETS = ["exact", "bs", "fs", "vdn", "micro"]


def _tensors(out):
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _tensors(o)]
    return []


@pytest.mark.slow
@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo(name, preset):
    fn, size, kw = ZOO[name]
    torch.manual_seed(0)
    model = fn(num_classes=10, **kw)
    x = torch.randn(2, 3, size, size)
    gm = fxbns.transform(model, every_layer(preset), example_inputs=x)

    # (a) eval equals the original's eval
    model.eval()
    gm.eval()
    with torch.no_grad():
        ref, out = model(x), gm(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))

    # (b) one training step: finite loss, every parameter gets a gradient
    gm.train()
    xb = torch.randn(4, 3, size, size)
    outs = _tensors(gm(xb))
    assert all(t.shape[0] == 4 for t in outs), "virtual rows leaked into an output"
    loss = sum(torch.nn.functional.cross_entropy(t, torch.arange(4) % 10) for t in outs)
    assert torch.isfinite(loss)
    loss.backward()
    missing = [n for n, p in gm.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in gm.parameters())

    # (c) state_dict round trip, both ways
    sd = gm.state_dict()
    extra = set(sd) - set(model.state_dict())
    assert extra <= {f"{VIRTUAL_NAME}.samples"}
    assert (preset in ("vdn", "micro")) == bool(extra)
    fresh = fn(num_classes=10, **kw)
    res = fresh.load_state_dict(sd, strict=False)
    assert not res.missing_keys and set(res.unexpected_keys) == extra
    assert fxbns.revert(gm).state_dict().keys() == fresh.state_dict().keys()
    fresh.load_state_dict(fxbns.revert(gm).state_dict())  # strict: the reverted model has the original keys
    gm2 = fxbns.transform(fn(num_classes=10, **kw), every_layer(preset), example_inputs=x)
    gm2.load_state_dict(model.state_dict())  # original -> transformed, strict
    gm2.load_state_dict(sd)  # transformed -> transformed, including the virtual samples
    if extra:
        assert torch.equal(gm2.get_buffer(f"{VIRTUAL_NAME}.samples"), sd[f"{VIRTUAL_NAME}.samples"])
    fresh.eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), gm(x), rtol=1e-5, atol=1e-6)

    # (d) the report lists every BatchNorm
    rep = fxbns.report(gm)
    bn_names = {n for n, m in copy.deepcopy(model).named_modules() if isinstance(m, _BatchNorm)}
    assert {r["name"] for r in rep.rows} == bn_names
    sampled = [r for r in rep.rows if r["estimator"] != "exact"]
    assert (len(sampled) == 0) == (preset == "exact")
