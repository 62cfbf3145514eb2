"""The FX pass on hard cases: untraceable code, shared modules, functional BN, MLPs, multi-output models,
BN subclasses; the policy; persistence."""

import collections
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import every_layer
from torch import nn

import fxbns
from fxbns import BatchSampling, Exact, FeatureSampling, MicroBatch, Policy, SampledBatchNorm, VirtualDataset
from fxbns.modules import FunctionalBatchNorm


class IfOnValue(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:
            return self.bn(x)
        return self.bn(-x)


class LoopOverBatch(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(torch.cat([x[i:i + 1] * 2 for i in range(x.shape[0])]))


class AssertShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        assert x.shape[1] == 3, "expects RGB"
        return self.bn(self.conv(x))


class Hard(nn.Module):
    """Untraceable submodules, a shared BN, a functional BN and a dict + tuple output."""

    def __init__(self):
        super().__init__()
        self.stem = AssertShape()
        self.a = IfOnValue()
        self.loop = LoopOverBatch()
        self.shared = nn.BatchNorm2d(4)
        self.fw = nn.Parameter(torch.rand(4) + 0.5)
        self.fb = nn.Parameter(torch.randn(4))
        self.register_buffer("frm", torch.zeros(4))
        self.register_buffer("frv", torch.ones(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        y = self.shared(self.stem(x))
        y = self.a(y) + self.loop(y)
        y = F.batch_norm(y, self.frm, self.frv, self.fw, self.fb, self.training, 0.1, 1e-5)
        y = self.shared(y)
        return {"logits": self.head(y.mean((2, 3))), "extra": (y, y.mean())}


def _hard_model():
    torch.manual_seed(0)
    return Hard()


@pytest.mark.parametrize("preset", ["bs", "fs", "vdn", "micro"])
def test_untraceable_parts_become_opaque_and_are_still_rewritten(preset):
    m = _hard_model()
    x = torch.randn(3, 3, 8, 8)
    gm = fxbns.transform(m, every_layer(preset), example_inputs=x)
    rep = fxbns.report(gm)
    assert rep.mode == "graph"
    assert set(rep.opaque) == {"stem", "a", "loop"}
    assert "control flow" in rep.opaque["a"] and "control flow" in rep.opaque["stem"]
    names = {r["name"]: r for r in rep.rows}
    assert set(names) == {"stem.bn", "a.bn", "loop.bn", "shared", "batch_norm"}
    assert all(r["estimator"] != "exact" for r in rep.rows)
    assert "opaque leaf 'a'" in names["a.bn"]["reason"]
    assert "called from 2 places" in names["shared"]["reason"]
    assert names["batch_norm"]["kind"] == "functional"
    for q in ("stem.bn", "a.bn", "loop.bn", "shared"):
        assert isinstance(gm.get_submodule(q), SampledBatchNorm)
    assert isinstance(gm.get_submodule("_fxbns_bn0"), FunctionalBatchNorm)
    # eval equals the original
    m.eval()
    gm.eval()
    with torch.no_grad():
        torch.testing.assert_close(gm(x)["logits"], m(x)["logits"], rtol=0, atol=0)
    # training: outputs keep the real batch, everything gets gradients, running stats move
    gm.train()
    before = gm.get_buffer("frm").clone()
    out = gm(torch.randn(3, 3, 8, 8))
    assert out["logits"].shape == (3, 3) and out["extra"][0].shape[0] == 3
    out["logits"].sum().backward()
    assert all(p.grad is not None for p in gm.parameters())
    assert not torch.equal(before, gm.get_buffer("frm"))
    assert set(gm.state_dict()) - set(m.state_dict()) <= {"_fxbns_virtual.samples"}


def test_shared_module_each_call_gets_its_own_statistics():
    m = nn.Sequential()
    bn = nn.BatchNorm2d(2, momentum=1.0)

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = bn

        def forward(self, x):
            return self.bn(x), self.bn(x * 10 + 5)

    m = Twice()
    gm = fxbns.transform(m, BatchSampling(ratio=1.0))
    a, b = gm(torch.randn(8, 2, 4, 4))
    # each call normalises its own input to zero mean / unit variance
    assert a.mean().abs() < 1e-5 and b.mean().abs() < 1e-5
    assert (b.std() - 1).abs() < 0.05
    # the last call's statistics are what momentum 1 keeps
    assert gm.get_submodule("bn").running_mean.mean() > 2


def test_root_untraceable_falls_back_to_module_swap():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            if x.mean() > 100:  # value-dependent control flow in the root itself
                x = x * 0
            return self.bn(self.conv(x))

    m = Root()
    x = torch.randn(2, 3, 8, 8)
    out = fxbns.transform(m, "fs", example_inputs=x)
    assert isinstance(out, Root) and isinstance(out.bn, SampledBatchNorm)
    rep = fxbns.report(out)
    assert rep.mode == "swap" and rep.root_error and "control flow" in rep.root_error
    m.eval()
    out.eval()
    assert torch.equal(out(x), m(x))
    # VDN on an untraceable root: virtual rows are injected by hooks and stripped again
    v = fxbns.transform(Root(), "vdn", example_inputs=x)
    v.train()
    y = v(torch.randn(5, 3, 8, 8))
    assert y.shape[0] == 5
    y.sum().backward()
    assert v.bn.weight.grad is not None


def test_detection_model_taking_a_list():
    torch.manual_seed(0)
    m = torchvision.models.detection.fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=3)
    gm = fxbns.transform(m, "fs")
    rep = fxbns.report(gm)
    assert rep.mode == "swap"
    n_bn = sum(isinstance(x, nn.BatchNorm2d) for x in m.modules())
    assert n_bn > 0 and sum(r["estimator"] != "exact" for r in rep.rows) == n_bn
    images = [torch.rand(3, 96, 128), torch.rand(3, 80, 100)]
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 50.0, 60.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[5.0, 5.0, 40.0, 30.0]]), "labels": torch.tensor([2])}]
    m.eval()
    gm.eval()
    with torch.no_grad():
        a, b = m(images), gm(images)
    for da, db in zip(a, b):
        torch.testing.assert_close(da["scores"], db["scores"], rtol=0, atol=0)
    gm.train()
    losses = gm(images, targets)
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is not None for n, p in gm.backbone.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match="not a tensor"):
        v = fxbns.transform(m, "vdn")
        v.train()
        v(images, targets)


def test_linear_bn1d_mlp_and_flat_fs_fallback(tiny_samples):
    m = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2))
    x = torch.randn(32, 8)
    gm = fxbns.transform(m, every_layer("fs"), example_inputs=x)
    row = fxbns.report(gm).rows[0]
    assert row["producer"] == "linear" and row["shape"] == [32, 16] and row["runs"] == "sampled"
    assert row["sample"] == 2 and row["fraction"] == pytest.approx(1 / 16)  # FS on (N, C) -> 1/16 of the rows
    assert "falls back to bs(ratio=0.0625)" in row["reason"]
    m.eval()
    gm.eval()
    assert torch.equal(gm(x), m(x))
    gm.train()
    gm(x).sum().backward()
    assert gm.get_submodule("1").num_batches_tracked == 1


def test_multi_output_namedtuple_dict_stripped():
    Out = collections.namedtuple("Out", "main aux")

    class Multi(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.bn = nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return Out(y, {"pooled": [y.mean((2, 3))], "scalar": y.sum()})

    gm = fxbns.transform(Multi(), "vdn", example_inputs=torch.randn(2, 3, 8, 8))
    gm.train()
    out = gm(torch.randn(3, 3, 8, 8))
    assert isinstance(out, Out)
    assert out.main.shape[0] == 3 and out.aux["pooled"][0].shape[0] == 3 and out.aux["scalar"].ndim == 0


def test_bn_subclasses_frozen_and_lazy():
    class BatchNormAct2d(nn.BatchNorm2d):  # as timm's: BN then an activation in the same module
        def forward(self, x):
            return torch.relu(super().forward(x))

    m = nn.Sequential(nn.Conv2d(3, 4, 3), BatchNormAct2d(4), nn.Conv2d(4, 4, 1),
                      torchvision.ops.misc.FrozenBatchNorm2d(4), nn.Conv2d(4, 4, 1), nn.SyncBatchNorm(4),
                      nn.Conv2d(4, 4, 1), nn.LazyBatchNorm2d())
    rep = fxbns.explain(m, "fs")
    reasons = {r["name"]: r["reason"] or "" for r in rep.rows}
    assert "fused activation" in reasons["1"]
    assert "FrozenBatchNorm2d" in reasons["3"]
    assert reasons["5"] == "" and {r["name"]: r["sync"] for r in rep.rows}["5"] == "world"  # a synchronized site
    assert "LazyBatchNorm" in reasons["7"] and "example_inputs" in reasons["7"]
    x = torch.randn(2, 3, 8, 8)
    gm = fxbns.transform(m, "fs", example_inputs=x)  # materialises the lazy BN
    by = {r["name"]: r for r in fxbns.report(gm).rows}
    assert by["7"]["estimator"] != "exact" and by["1"]["estimator"] == "exact"
    assert type(gm.get_submodule("1")) is BatchNormAct2d
    assert gm.get_submodule("5").sync and gm.get_submodule("5").process_group is None
    gm.eval()
    m.eval()
    torch.testing.assert_close(gm(x), m(x), rtol=0, atol=0)


def test_policy_priority_and_callable():
    m = torchvision.models.resnet18(num_classes=4)
    pol = (Policy(BatchSampling())
           .set_conv_bn(FeatureSampling(patch=(2, 2)))
           .set_object_type(nn.BatchNorm2d, FeatureSampling(area_ratio=0.25))
           .set_module_name_regex(r"layer4\..*", VirtualDataset(num_samples=2))
           .set_module_name_regex(r"layer4\.0\..*", Exact())  # later regex: never reached for layer4.0
           .set_module_name("layer3.0.bn1", None)
           .set_module_name("layer2.0.bn1", BatchSampling(ratio=0.5)))
    rep = {r["name"]: r["estimator"] for r in fxbns.explain(m, pol).rows}
    assert rep["layer1.0.bn1"] == FeatureSampling(area_ratio=0.25).describe()  # type beats conv-pair
    assert rep["layer4.0.bn1"].startswith("vdn")  # first regex wins
    assert rep["layer3.0.bn1"] == "exact"
    assert rep["layer2.0.bn1"] == "bs(ratio=0.5)"
    pol.set_callable(lambda name, mod, site: Exact() if name == "layer2.0.bn1" else ...)
    rep = {r["name"]: r["estimator"] for r in fxbns.explain(m, pol).rows}
    assert rep["layer2.0.bn1"] == "exact" and rep["layer1.0.bn1"] != "exact"


def test_policy_unknown_name_lists_closest():
    m = torchvision.models.resnet18(num_classes=4)
    with pytest.raises(ValueError, match=r"layer1\.0\.bn1"):
        fxbns.transform(m, Policy().set_module_name("layer1.0.bnl", None))
    with pytest.raises(ValueError, match="unknown preset 'fss'.*fs"):
        fxbns.transform(m, "fss")


@pytest.mark.parametrize("ext", ["json", "yaml"])
def test_policy_files_round_trip(tmp_path, ext):
    pol = (Policy.from_preset("fs").set_module_name_regex(r"layer4\..*", BatchSampling(ratio=0.25))
           .set_object_type(nn.BatchNorm1d, None).set_module_name("bn1", Exact())
           .set_micro_batch(MicroBatch(threshold=2)).set_seed(3))
    path = tmp_path / f"p.{ext}"
    pol.save(path)
    back = Policy.load(path)
    assert back.to_dict() == pol.to_dict()
    m = torchvision.models.resnet18(num_classes=4)
    r1 = [r["estimator"] for r in fxbns.explain(m, pol).rows]
    r2 = [r["estimator"] for r in fxbns.explain(m, str(path)).rows]
    assert r1 == r2
    if ext == "json":
        assert json.loads(path.read_text())["micro_batch"]["threshold"] == 2


def test_bad_policy_files(tmp_path):
    p = tmp_path / "bad.json"
    p.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        fxbns.transform(nn.Sequential(nn.BatchNorm2d(2)), str(p))
    p.write_text(json.dumps({"default": {"kind": "bs", "ratio": 7}}))
    with pytest.raises(ValueError, match="ratio"):
        fxbns.transform(nn.Sequential(nn.BatchNorm2d(2)), str(p))
    with pytest.raises(ValueError, match="does not exist"):
        fxbns.transform(nn.Sequential(nn.BatchNorm2d(2)), str(tmp_path / "missing.yaml"))


@pytest.mark.parametrize("name", list(fxbns.PRESETS))
def test_presets_documented(name):
    doc, _ = fxbns.PRESETS[name]
    assert doc
    assert Policy.from_preset(name).to_dict()["preset"] == name


def test_sample_backward_warns_at_transform():
    """sample_backward inflates gradients on deep models (examples/gradient_stability.py): transform says so, once,
    naming how many sites use it; the presets as shipped (sample_backward off) stay silent."""
    import warnings
    m = torchvision.models.resnet18(num_classes=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails here
        fxbns.transform(m, "fs")
        fxbns.transform(m, Policy.from_preset("bs").set_sample_backward(False))
    with pytest.warns(UserWarning, match=r"sample_backward is on for 20 BatchNorm site\(s\).*gradient_stability") as rec:
        fxbns.transform(m, Policy.from_preset("fs").set_sample_backward())
    assert len([w for w in rec if "sample_backward" in str(w.message)]) == 1
    with pytest.warns(UserWarning, match="on for 1 BatchNorm site"):
        fxbns.transform(m, Policy.from_preset("fs").set_module_name("bn1", BatchSampling(sample_backward=True)))


def test_code_shows_estimators_and_report_table():
    from fxbns.passes.forward import graph_code

    pol = Policy.from_preset("fs").set_module_name("bn1", BatchSampling())
    gm = fxbns.transform(torchvision.models.resnet18(num_classes=4), pol)
    assert graph_code(gm) is None and fxbns.report(gm).mode == "swap"  # a module swap suffices: its own forward
    # a micro-batch regime needs the traced graph (the virtual batch): the forward runs its code
    gm = fxbns.transform(torchvision.models.resnet18(num_classes=4), pol.set_micro_batch(MicroBatch(threshold=2)))
    code = graph_code(gm)
    assert "bn1__bs = self.bn1(conv1, n_real)" in code
    assert "layer1_0_bn1__fs_band" in code
    text = str(fxbns.report(gm))
    assert "fs(band" in text and "20 BatchNorm sites" in text
    d = fxbns.report(gm).to_dict()
    assert len(d["sites"]) == 20 and d["mode"] == "graph"


def test_explain_does_not_change_the_model():
    m = torchvision.models.resnet18(num_classes=4)
    m.train()
    # every module by name: the same object, the same type, the same mode; every tensor: the same values
    before_mods = {n: (id(x), type(x), x.training) for n, x in m.named_modules()}
    before = {k: v.clone() for k, v in m.state_dict().items()}
    hooks = {n: (dict(x._forward_hooks), dict(x._forward_pre_hooks)) for n, x in m.named_modules()}
    rep = fxbns.explain(m, "vdn", torch.randn(2, 3, 32, 32))
    assert {n: (id(x), type(x), x.training) for n, x in m.named_modules()} == before_mods
    assert sum(type(x) is nn.BatchNorm2d for x in m.modules()) == 20  # the plain BatchNorms are all still there
    assert set(m.state_dict()) == set(before)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert {n: (dict(x._forward_hooks), dict(x._forward_pre_hooks)) for n, x in m.named_modules()} == hooks
    assert rep.rows[0]["shape"] == [2, 64, 16, 16] and len(rep.rows) == 20
    assert not hasattr(m, "_fxbns_virtual") and getattr(m, "_fxbns", None) is None


def test_revert_save_load(tmp_path):
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=4)
    x = torch.randn(4, 3, 32, 32)
    gm = fxbns.transform(m, "vdn", example_inputs=x)
    opt = torch.optim.SGD(gm.parameters(), lr=0.01)
    for _ in range(2):
        opt.zero_grad()
        gm(x).sum().backward()
        opt.step()
    # revert: plain BN modules, trained state, original keys, same eval output
    r = fxbns.revert(gm)
    assert not any(isinstance(x_, SampledBatchNorm) for x_ in r.modules())
    assert set(r.state_dict()) == set(m.state_dict())
    gm.eval()
    r.eval()
    torch.testing.assert_close(r(x), gm(x))
    r.train()
    assert r(x).shape == (4, 4)
    # save / load: rebuilt by re-running the transform, trains identically
    path = tmp_path / "ck.pt"
    fxbns.save(gm, path)
    g2 = fxbns.load(path, torchvision.models.resnet18(num_classes=4))
    g2.eval()
    torch.testing.assert_close(g2(x), gm(x))
    gm.train()
    g2.train()
    torch.testing.assert_close(g2(x), gm(x))  # same virtual samples, same sampling step
    with pytest.raises(ValueError, match="not an fxbns checkpoint"):
        torch.save({"a": 1}, tmp_path / "other.pt")
        fxbns.load(tmp_path / "other.pt", m)
    with pytest.raises(ValueError, match="already transformed"):
        fxbns.transform(gm, "fs")


@pytest.mark.parametrize("preset", ["bs", "fs"])
def test_trained_model_pickles_whole(tmp_path, preset):
    """``torch.save(model)`` (the whole module, not a state dict) after training steps: the layers' per-shape
    cache (draw closures, cached plans) is not pickled; the reloaded model trains on as the original does."""
    torch.manual_seed(0)
    gm = fxbns.transform(torchvision.models.resnet18(num_classes=4), Policy.from_preset(preset).set_sample_backward())
    x = torch.randn(16, 3, 64, 64)
    for _ in range(2):
        gm(x).sum().backward()
    assert any(getattr(b, "_exact_cache", None) for b in gm.modules() if isinstance(b, SampledBatchNorm))
    torch.save(gm, tmp_path / "whole.pt")
    g2 = torch.load(tmp_path / "whole.pt", weights_only=False)
    torch.testing.assert_close(g2(x), gm(x))  # the same sample at the same step
    g2(x).sum().backward()
    assert all(p.grad is not None for p in g2.parameters())


@pytest.mark.parametrize("preset,batch", [("vdn", 16), ("micro", 2)])
def test_graph_mode_model_pickles_whole(tmp_path, preset, batch):
    """``torch.save(model)`` of a graph-mode model (a virtual batch: its forward runs the traced graph) after
    training steps: it reloads as the user's class, with its virtual samples, and trains on as the original."""
    torch.manual_seed(0)
    x = torch.randn(batch, 3, 32, 32)
    gm = fxbns.transform(torchvision.models.resnet18(num_classes=4), preset, example_inputs=x)
    assert gm._fxbns.mode == "graph"
    for _ in range(2):
        gm(x).sum().backward()
    torch.save(gm, tmp_path / "whole.pt")
    g2 = torch.load(tmp_path / "whole.pt", weights_only=False)
    assert isinstance(g2, torchvision.models.ResNet) and g2._fxbns.mode == "graph"
    torch.testing.assert_close(g2._fxbns_virtual.samples, gm._fxbns_virtual.samples, rtol=0, atol=0)
    y2, y = g2(x), gm(x)
    torch.testing.assert_close(y2, y)  # the same virtual rows and sample at the same step
    y2.sum().backward()
    assert all(p.grad is not None for p in g2.parameters())
    g2.eval()
    gm.eval()
    torch.testing.assert_close(g2(x), gm(x), rtol=0, atol=0)


def test_compiled_transformed_model_trains():
    torch._dynamo.reset()
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=4)
    gm = fxbns.transform(m, every_layer("fs"))
    cgm = torch.compile(gm, fullgraph=True)  # no graph break anywhere in a transformed ResNet
    opt = torch.optim.SGD(gm.parameters(), lr=0.05)
    x = torch.randn(8, 3, 32, 32)
    y = torch.arange(8) % 4
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = F.cross_entropy(cgm(x), y)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]


def test_inplace_and_non_inplace():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    fxbns.transform(m, "fs")
    assert type(m[1]) is nn.BatchNorm2d  # the original is untouched
    gm = fxbns.transform(m, "fs", inplace=True)
    assert isinstance(m[1], SampledBatchNorm) and gm.get_submodule("1") is m[1]


def test_virtual_samples_data_distribution_and_fixed_shape():
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    pol = Policy(VirtualDataset(num_samples=64, distribution="data", seed=3))
    x = torch.randn(8, 3, 6, 6) * torch.tensor([1.0, 5.0, 0.5]).view(1, 3, 1, 1) + torch.tensor([2.0, -3.0, 0.0]).view(
        1, 3, 1, 1)
    gm = fxbns.transform(m, pol, example_inputs=x)
    v = gm.get_buffer("_fxbns_virtual.samples")
    assert v.shape == (64, 3, 6, 6)
    torch.testing.assert_close(v.mean((0, 2, 3)), x.mean((0, 2, 3)), atol=0.3, rtol=0.1)
    torch.testing.assert_close(v.std((0, 2, 3)), x.std((0, 2, 3)), atol=0.1, rtol=0.1)
    gm.train()
    with pytest.raises(ValueError, match="fixed input size"):
        gm(torch.randn(8, 3, 7, 7))
    # the same seed gives the same virtual samples
    g2 = fxbns.transform(m, pol, example_inputs=x)
    assert torch.equal(g2.get_buffer("_fxbns_virtual.samples"), v)
