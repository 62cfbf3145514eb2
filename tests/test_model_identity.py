"""transform returns the user's own model: its class, methods and attributes, in swap and in graph mode."""

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import every_layer
from torch import nn

import fxbns
from fxbns import SampledBatchNorm
from fxbns.modules import FunctionalBatchNorm
from fxbns.passes.forward import graph_code


class Net(nn.Module):
    """A user's class: its own attribute, a method besides forward, a functional BatchNorm if asked."""

    def __init__(self, functional: bool = False):
        super().__init__()
        self.temperature = 2.5
        self.functional = functional
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.w, self.b = nn.Parameter(torch.rand(8) + 0.5), nn.Parameter(torch.randn(8))
        self.register_buffer("rm", torch.zeros(8))
        self.register_buffer("rv", torch.ones(8))
        self.head = nn.Linear(8, 3)

    def features(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        if self.functional:
            y = F.batch_norm(y, self.rm, self.rv, self.w, self.b, self.training, 0.1, 1e-5)
        return y

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3))) / self.temperature


def _sampled(model, x):
    """Names of the SampledBatchNorm modules that a training call of ``model.features`` (or ``fn``) reaches."""
    called = []
    hs = [m.register_forward_hook(lambda mod, a, o, n=n: called.append(n))
          for n, m in model.named_modules() if isinstance(m, SampledBatchNorm)]
    model.train()
    model.features(x)
    for h in hs:
        h.remove()
    return called


@pytest.mark.parametrize("functional, policy, mode", [(False, "fs", "swap"), (True, "fs", "graph"),
                                                      (False, "micro", "graph"), (False, "vdn", "graph")])
def test_user_class_methods_and_attributes_survive(functional, policy, mode):
    torch.manual_seed(0)
    m = Net(functional)
    x = torch.randn(4, 3, 8, 8)
    t = fxbns.transform(m, every_layer(policy), example_inputs=x)
    assert isinstance(t, Net) and type(t).__name__ == "Net" and t is not m
    assert t.temperature == 2.5 and fxbns.report(t).mode == mode
    assert isinstance(t.bn, SampledBatchNorm) and type(m.bn) is nn.BatchNorm2d  # the original is untouched
    assert set(t.state_dict()) - set(m.state_dict()) <= {"_fxbns_virtual.samples"}
    # eval: exactly the original model, through forward and through the user's method
    m.eval()
    t.eval()
    with torch.no_grad():
        assert torch.equal(t(x), m(x)) and torch.equal(t.features(x), m.features(x))
    t.temperature = 1.0
    with torch.no_grad():
        if mode == "swap":  # the model's own forward reads the live attribute
            torch.testing.assert_close(t(x), m(x) * 2.5)
        else:  # the traced forward holds the Python values tracing saw (torch.fx); the user's methods read them live
            assert torch.equal(t(x), m(x))
    t.temperature = 2.5
    assert _sampled(t, x) == ["bn"]  # the user's own method reaches the sampled layer
    # training: the real batch comes out, gradients reach every parameter
    t.train()
    out = t(torch.randn(3, 3, 8, 8))
    assert out.shape == (3, 3)
    out.sum().backward()
    assert all(p.grad is not None for n, p in t.named_parameters() if functional or n not in ("w", "b"))
    if functional:
        assert isinstance(t.get_submodule("_fxbns_bn0"), FunctionalBatchNorm)
        assert "_fxbns_bn0" in graph_code(t)


def test_graph_mode_copies_pickles_moves_and_reverts(tmp_path):
    torch.manual_seed(0)
    m = Net(functional=True)
    x = torch.randn(4, 3, 8, 8)
    t = fxbns.transform(m, every_layer("micro"), example_inputs=x)
    assert graph_code(t) is not None
    c = copy.deepcopy(t)
    assert type(c) is type(t) and c.temperature == 2.5 and graph_code(c) == graph_code(t)
    p = pickle.loads(pickle.dumps(t))
    assert isinstance(p, Net) and graph_code(p) == graph_code(t)
    torch.save(t, tmp_path / "whole.pt")
    w = torch.load(tmp_path / "whole.pt", weights_only=False)
    for other in (c, p, w):
        torch.testing.assert_close(other(x), t(x))  # same samples at the same step, same virtual rows
        assert other.rm.data_ptr() != t.rm.data_ptr()
    d = t.to(torch.float64)  # buffers are replaced by .to(): the forward reads the module's live ones
    assert d(x.double()).dtype == torch.float64
    r = fxbns.revert(t)
    assert type(r) is Net and not hasattr(r, "_fxbns") and graph_code(r) is None
    assert type(r.bn) is nn.BatchNorm2d and set(r.state_dict()) == set(m.state_dict())
    assert not any(n.startswith("_fxbns") for n, _ in r.named_modules())
    r.eval()
    t.eval()
    with torch.no_grad():
        torch.testing.assert_close(r(x.double()), t(x.double()))


def test_inplace_keeps_the_object():
    m = Net(functional=True)
    t = fxbns.transform(m, "fs", inplace=True)
    assert t is m and isinstance(m, Net) and isinstance(m.bn, SampledBatchNorm)


def test_swap_mode_runs_the_models_own_code():
    """No functional site and no virtual batch: nothing but the BatchNorm modules changes; resnet's in-place
    residual adds are its own."""
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=4)
    t = fxbns.transform(m, "fs")
    assert type(t) is torchvision.models.ResNet and graph_code(t) is None
    assert type(t).forward is torchvision.models.ResNet.forward
    x = torch.randn(2, 3, 32, 32)  # every layer under the preset's min_elements: exact statistics
    assert torch.equal(t(x), m(x))


def test_graph_mode_with_separate_eval_graph():
    class Drop(nn.Module):  # reads self.training while tracing: a train graph and an eval graph
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return F.dropout(self.bn(self.conv(x)), 0.5, self.training)

    torch.manual_seed(0)
    m = Drop()
    t = fxbns.transform(m, every_layer("vdn"), example_inputs=torch.randn(2, 3, 6, 6))
    assert graph_code(t, True) != graph_code(t, False)
    x = torch.randn(2, 3, 6, 6)
    m.eval()
    t.eval()
    assert torch.equal(t(x), m(x))  # the eval graph: no dropout, running statistics
    t.train()
    assert (t(x) == 0).any()  # the training graph: dropout


def test_sync_batchnorm_conversion_is_reported(tiny_samples):
    """nn.SyncBatchNorm.convert_sync_batchnorm on the result keeps the user's class; the report reads the live
    modules and says the sites are SyncBatchNorm now."""
    m = Net()
    t = fxbns.transform(m, every_layer("fs"), example_inputs=torch.randn(4, 3, 8, 8))
    assert fxbns.report(t).rows[0]["runs"] == "sampled"
    s = nn.SyncBatchNorm.convert_sync_batchnorm(t)
    assert isinstance(s, Net) and type(s.bn) is nn.SyncBatchNorm
    row = fxbns.report(s).rows[0]
    assert row["runs"] == "exact" and row["module_type"] == "SyncBatchNorm" and "replaced" in row["why"]
    assert row["via"] is None


timm = pytest.importorskip("timm")


@pytest.mark.parametrize("name, policy", [("resnet18", "fs"), ("resnet18", "micro"), ("resnet26d", "bs")])
def test_timm_models_keep_their_api(name, policy):
    torch.manual_seed(0)
    m = timm.create_model(name, pretrained=False, num_classes=5)
    x = torch.randn(2, 3, 64, 64)
    t = fxbns.transform(m, every_layer(policy), example_inputs=x)
    assert isinstance(t, type(m))
    assert t.num_classes == 5 and t.pretrained_cfg == m.pretrained_cfg
    assert t.get_classifier() is not None
    n_sampled = sum(isinstance(b, SampledBatchNorm) for b in t.modules())
    rows = fxbns.report(t).rows
    assert n_sampled == sum(r["via"] is not None for r in rows) > 0
    # forward_features reaches the sampled layers (module hooks count the calls)
    called = []
    hs = [b.register_forward_hook(lambda *a: called.append(1)) for b in t.modules() if isinstance(b, SampledBatchNorm)]
    t.train()
    feats = t.forward_features(x)
    for h in hs:
        h.remove()
    assert len(called) == n_sampled and feats.shape[0] == 2
    t.reset_classifier(3)
    assert t.num_classes == 3 and t(x).shape == (2, 3)
    t.eval()
    m.reset_classifier(3)
    m.load_state_dict({k: v for k, v in t.state_dict().items() if not k.startswith("_fxbns")})
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(t(x), m(x))


def test_methods_called_after_a_virtual_batch_forward_see_only_real_rows():
    """With a micro-batch regime, the user's own method (no virtual batch appended there) normalises the rows it
    is given with their own statistics, also right after a forward that appended virtual rows."""
    torch.manual_seed(0)
    t = fxbns.transform(Net(), every_layer("micro"), example_inputs=torch.randn(2, 3, 8, 8))
    t.train()
    t(torch.randn(2, 3, 8, 8))  # batch 2 <= 4: virtual rows appended inside the forward
    seen = {}
    t.bn.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    t.features(torch.randn(3, 3, 8, 8))
    assert seen["x"].shape[0] == 3
    ref = F.batch_norm(seen["x"], None, None, t.bn.weight, t.bn.bias, True, 0.0, t.bn.eps)
    torch.testing.assert_close(seen["y"], ref)
