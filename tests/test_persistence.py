"""save / load / revert / report: errors on the wrong input, and the module-swap mode (an untraceable root)."""

import pytest
import torch
import torchvision
from torch import nn

import fxbns
from fxbns import SampledBatchNorm


class UntraceableRoot(nn.Module):
    """A root whose own forward cannot be traced (control flow on a value): transform swaps its BatchNorms."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.head = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.mean() > 100:
            x = x * 0
        return self.head(torch.relu(self.bn(self.conv(x))))


def _rows_seen(bn):
    """The batch sizes ``bn`` is called with from now on."""
    seen = []
    bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].shape[0]))
    return seen


def _train(model, x, steps=2):
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()


def test_load_of_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such checkpoint: .*nothing.pt"):
        fxbns.load(tmp_path / "nothing.pt", nn.Sequential(nn.BatchNorm2d(3)))
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt.* is not a readable fxbns checkpoint"):
        fxbns.load(tmp_path / "junk.pt", nn.Sequential(nn.BatchNorm2d(3)))


def test_load_for_another_architecture(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    gm = fxbns.transform(torchvision.models.resnet18(num_classes=4), "bs", example_inputs=x)
    fxbns.save(gm, tmp_path / "r18.pt")
    with pytest.raises(ValueError, match=r"r18.pt' does not fit this MobileNetV2: Missing key.*architecture"):
        fxbns.load(tmp_path / "r18.pt", torchvision.models.mobilenet_v2(num_classes=4))
    with pytest.raises(ValueError, match=r"does not fit this ResNet: .*size mismatch for fc.weight.*num_classes"):
        fxbns.load(tmp_path / "r18.pt", torchvision.models.resnet18(num_classes=10))
    # a policy naming a layer the other model lacks is refused by name
    pol = fxbns.Policy.from_preset("bs").set_module_name("layer4.1.bn2", None)
    fxbns.save(fxbns.transform(torchvision.models.resnet18(num_classes=4), pol), tmp_path / "named.pt")
    small = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="policy names module 'layer4.1.bn2', which is not in the model"):
        fxbns.load(tmp_path / "named.pt", small)


def test_save_report_revert_need_a_transformed_model(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ValueError, match="fxbns.save takes a model returned by fxbns.transform.*torch.save"):
        fxbns.save(m, tmp_path / "ck.pt")
    assert not (tmp_path / "ck.pt").exists()
    with pytest.raises(ValueError, match="not produced by fxbns.transform.*fxbns.explain"):
        fxbns.report(m)
    with pytest.raises(ValueError, match="not produced by fxbns.transform"):
        fxbns.revert(m)
    # a reverted model is a plain model again
    r = fxbns.revert(fxbns.transform(m, "bs"))
    with pytest.raises(ValueError, match="not produced by fxbns.transform"):
        fxbns.report(r)
    assert fxbns.transform(r, "bs") is not None  # and can be transformed again


def test_module_swap_mode_with_vdn_save_load_revert(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(3, 3, 8, 8)
    gm = fxbns.transform(UntraceableRoot(), "vdn", example_inputs=x)
    rep = fxbns.report(gm)
    assert isinstance(gm, UntraceableRoot) and rep.mode == "swap"
    assert isinstance(gm.bn, SampledBatchNorm) and isinstance(gm.head[1], SampledBatchNorm)
    assert all(r["estimator"].startswith("vdn") for r in rep.rows)
    samples = gm._fxbns_virtual.samples.clone()
    assert samples.shape == (4, 3, 8, 8)
    _train(gm, x)
    fxbns.save(gm, tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["format"] == "fxbns-checkpoint" and torch.equal(ck["state_dict"]["_fxbns_virtual.samples"], samples)

    g2 = fxbns.load(tmp_path / "ck.pt", UntraceableRoot())
    assert isinstance(g2, UntraceableRoot) and fxbns.report(g2).mode == "swap"
    assert torch.equal(g2._fxbns_virtual.samples, samples)  # the saved virtual rows, not fresh ones
    sd, sd2 = gm.state_dict(), g2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    gm.train()  # the same training step from both: the same outputs and running statistics
    g2.train()
    rows = _rows_seen(g2.bn)
    ya, yb = gm(x), g2(x)
    assert rows == [3 + 4] and ya.shape[0] == 3  # the BatchNorm sees the virtual rows; the output has them stripped
    torch.testing.assert_close(yb, ya, rtol=0, atol=0)
    torch.testing.assert_close(g2.bn.running_var, gm.bn.running_var, rtol=0, atol=0)
    gm.eval()
    g2.eval()
    torch.testing.assert_close(g2(x), gm(x), rtol=0, atol=0)

    # revert: plain BatchNorms with the trained state, no virtual rows, the original's keys
    r = fxbns.revert(gm)
    assert type(r.bn) is nn.BatchNorm2d and type(r.head[1]) is nn.BatchNorm2d
    assert not hasattr(r, "_fxbns_virtual") and not r._forward_pre_hooks and not r._forward_hooks
    assert set(r.state_dict()) == set(UntraceableRoot().state_dict())
    r.eval()
    torch.testing.assert_close(r(x), gm(x), rtol=0, atol=0)
    # in training the reverted model is exact BatchNorm over the real rows: the original architecture's step
    plain = UntraceableRoot()
    plain.load_state_dict(r.state_dict())
    r.train()
    plain.train()
    rows = _rows_seen(r.bn)
    torch.testing.assert_close(r(x), plain(x))
    assert rows == [3]
    torch.testing.assert_close(r.bn.running_mean, plain.bn.running_mean)
    # reverting a copy leaves the transformed model as it was: it still injects its virtual rows
    gm.train()
    rows = _rows_seen(gm.bn)
    assert gm(x).shape[0] == 3 and rows == [3 + 4]


def test_checkpoint_records_the_version_and_leaf_modules(tmp_path):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fxbns.save(fxbns.transform(m, "bs", leaf_modules=("0",)), tmp_path / "ck.pt")
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    assert ck["fxbns_version"] == fxbns.__version__ and ck["leaf_modules"] == ["0"]
    assert fxbns.report(fxbns.load(tmp_path / "ck.pt", m)).rows[0]["name"] == "1"
