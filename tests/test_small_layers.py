"""Layers too small to gain from sampling (``min_elements``) and the in-place residual add after tracing."""

import copy
import math
import operator

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import fxbns
from fxbns import BatchSampling, FeatureSampling, MicroBatch, Policy, SampledBatchNorm, VirtualDataset
from fxbns.estimators import layer_size, spec_from_dict, spec_to_dict
from fxbns.ops.dispatch import speed_rule
from fxbns.passes.rewrite import add_into

BIG = 10 ** 9  # a min_elements no test layer reaches


def test_layer_size_counts_tiny_maps_as_16():
    assert layer_size((32, 64, 8, 8)) == 32 * 64 * 64
    assert layer_size((32, 960, 2, 2)) == 32 * 960 * 16  # a 2x2 map counts as 4x4
    assert layer_size((32, 960, 3, 3)) == 32 * 960 * 16
    assert layer_size((32, 960, 4, 4)) == 32 * 960 * 16
    assert layer_size((64, 512, 1, 1)) == 64 * 512  # 1x1: native is fast there, no floor
    assert layer_size((16, 10)) == 16 * 10  # (N, C): no map
    assert layer_size((16, 10, 1)) == 16 * 10
    assert layer_size((4, 3, 5, 6, 7)) == 4 * 3 * 210


@pytest.mark.parametrize("cls", [BatchSampling, FeatureSampling])
@pytest.mark.parametrize("bad", [-1, 2.5, True, "big"])
def test_min_elements_validated(cls, bad):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.min_elements must be None .* or an integer >= 0"):
        cls(min_elements=bad)


def test_min_elements_round_trips_and_shows_in_describe():
    spec = FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True, min_elements=2 ** 18)
    assert spec_from_dict(spec_to_dict(spec)) == spec
    assert "exact below 262144" in spec.describe()
    assert spec.exact_below_batch((1, 64, 4, 4)) == math.ceil(2 ** 18 / (64 * 16))
    assert FeatureSampling().exact_below_batch((1, 64, 4, 4)) == 0


def test_presets_and_set_min_elements():
    # the presets leave the threshold to the device's speed rule: CPU values as measured, CUDA a stated default
    for name, kind in (("fs", "fs"), ("micro", "fs"), ("bs", "bs")):
        spec = Policy.from_preset(name).default
        assert spec.min_elements is None
        assert spec.exact_at((1, 8, 8, 8), "cpu") and not spec.exact_at((64, 256, 56, 56), "cpu")
        assert speed_rule("cpu").min_elements(kind) == (2 ** 18 if kind == "bs" else 2 ** 19)
        assert speed_rule("cuda").min_elements(kind) != speed_rule("cpu").min_elements(kind)
    # map floor: CPU counts 2x2 maps as 16 elements, CUDA as 4
    assert speed_rule("cpu").layer_size((8, 8, 2, 2)) == 8 * 8 * 16 and speed_rule("cuda").layer_size((8, 8, 2, 2)) == 256
    assert Policy.from_preset("vdn").default.real.min_elements == 0  # not applied inside VDN
    pol = (Policy.from_preset("fs").set_module_name("a", BatchSampling())
           .set_module_name_regex("b.*", VirtualDataset()).set_min_elements(0))
    assert pol.default.min_elements == 0 and pol.names["a"].min_elements == 0
    assert isinstance(pol.name_regexes[0][1], VirtualDataset)
    assert Policy.from_dict(Policy.from_preset("fs").to_dict()).default == Policy.from_preset("fs").default
    with pytest.raises(ValueError, match="min_elements must be None .* or an integer >= 0"):
        Policy().set_min_elements(-5)


def test_set_sample_backward():
    pol = (Policy.from_preset("bs").set_module_name("a", FeatureSampling()).set_module_name("c", None)
           .set_module_name_regex("b.*", VirtualDataset()).set_sample_backward())
    assert pol.default.sample_backward and pol.names["a"].sample_backward
    assert pol.default.min_elements is None and pol.default.ratio == 0.125  # the rest of the spec kept
    assert pol.names["c"] is None and isinstance(pol.name_regexes[0][1], VirtualDataset)
    assert not pol.set_sample_backward(False).default.sample_backward
    assert Policy.from_dict(Policy.from_preset("fs").set_sample_backward().to_dict()).default.sample_backward
    with pytest.raises(TypeError, match="True or False"):
        Policy().set_sample_backward(1)


def _bn_pair(c, spec):
    bn = nn.BatchNorm2d(c)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    return bn, SampledBatchNorm.from_batchnorm(copy.deepcopy(bn), spec)


@pytest.mark.parametrize("spec", [BatchSampling(ratio=0.25, min_elements=BIG),
                                  FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True,
                                                  sample_backward=True, min_elements=BIG)])
def test_below_min_elements_is_exactly_batchnorm(spec):
    bn, sbn = _bn_pair(6, spec)
    x = torch.randn(8, 6, 8, 8) * 2 + 1
    gy = torch.randn(8, 6, 8, 8)
    for _ in range(3):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = bn(xa), sbn(xb)
        ya.backward(gy)
        yb.backward(gy)
        assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)  # the same kernels: bit for bit
    assert torch.equal(bn.weight.grad, sbn.weight.grad) and torch.equal(bn.bias.grad, sbn.bias.grad)
    assert torch.equal(bn.running_mean, sbn.running_mean) and torch.equal(bn.running_var, sbn.running_var)
    assert int(sbn.num_batches_tracked) == 3 and sbn._host_step == 3  # the host counter stays in step


@pytest.mark.parametrize("affine,track,momentum", [(False, True, 0.1), (True, False, 0.1), (True, True, None)])
def test_exact_fast_path_matches_batchnorm_variants(affine, track, momentum):
    """The per-shape cached exact path (eager) for BatchNorms without affine parameters, without running
    statistics, or with a cumulative average (``momentum=None``, which keeps the general path)."""
    bn = nn.BatchNorm2d(6, affine=affine, track_running_stats=track, momentum=momentum)
    sbn = SampledBatchNorm.from_batchnorm(copy.deepcopy(bn), BatchSampling(ratio=0.25, min_elements=BIG))
    x = torch.randn(8, 6, 8, 8) * 2 + 1
    for _ in range(3):
        assert torch.equal(bn(x), sbn(x))
    assert sbn._host_step == 3 and int(sbn._fxbns_step if not track else sbn.num_batches_tracked) == 3
    if track:
        assert torch.equal(bn.running_mean, sbn.running_mean) and torch.equal(bn.running_var, sbn.running_var)


def test_exact_fast_path_honours_functional_call():
    """``torch.func.functional_call`` swaps the parameters the exact fast path reads."""
    bn, sbn = _bn_pair(6, BatchSampling(ratio=0.25, min_elements=BIG))
    x = torch.randn(8, 6, 5, 5)
    params = {"weight": torch.full((6,), 2.0), "bias": torch.full((6,), -1.0)}
    ya = torch.func.functional_call(bn, params, (x,))
    yb = torch.func.functional_call(sbn, params, (x,))
    assert torch.equal(ya, yb) and not torch.allclose(yb, sbn(x))


def test_exact_layer_with_a_parametrized_weight():
    """A weight under ``torch.nn.utils.parametrize`` is not in ``_parameters``: the general exact path runs it."""
    class Double(nn.Module):
        def forward(self, w):
            return 2 * w

    bn, sbn = _bn_pair(6, BatchSampling(ratio=0.25, min_elements=BIG))
    for m in (bn, sbn):
        torch.nn.utils.parametrize.register_parametrization(m, "weight", Double())
    x = torch.randn(8, 6, 5, 5)
    assert torch.equal(bn(x), sbn(x))


def test_exact_fast_path_follows_changed_momentum():
    """Switching to a cumulative average (``momentum=None``) after the shape was seen follows nn.BatchNorm."""
    bn, sbn = _bn_pair(6, BatchSampling(ratio=0.25, min_elements=BIG))
    x = torch.randn(8, 6, 5, 5)
    assert torch.equal(bn(x), sbn(x))
    bn.momentum = sbn.momentum = None
    for _ in range(2):
        assert torch.equal(bn(x * 2 + 1), sbn(x * 2 + 1))
    assert torch.equal(bn.running_mean, sbn.running_mean) and torch.equal(bn.running_var, sbn.running_var)


def test_exact_decision_follows_a_changed_estimator():
    """The exact-at-this-shape decision is cached per shape, but not across a new estimator."""
    bn, sbn = _bn_pair(6, BatchSampling(ratio=0.25, min_elements=BIG))
    x = torch.randn(8, 6, 8, 8)
    assert torch.equal(bn(x), sbn(x))
    sbn.estimator = BatchSampling(ratio=0.25)  # always sample
    assert not torch.allclose(bn(x), sbn(x))
    sbn.estimator = BatchSampling(ratio=0.25, min_elements=BIG)
    assert torch.equal(bn(x), sbn(x))


def test_threshold_is_decided_per_call_from_the_runtime_shape():
    spec = BatchSampling(ratio=0.25, min_elements=layer_size((16, 6, 8, 8)))
    bn, sbn = _bn_pair(6, spec)
    small, big = torch.randn(8, 6, 8, 8), torch.randn(16, 6, 8, 8)
    assert torch.equal(bn(small), sbn(small))  # 8 rows: below, exact
    assert not torch.allclose(bn(big), sbn(big))  # 16 rows: at the threshold, sampled
    # the host counter followed both kinds of step, so a state-dict round trip draws the same sample
    assert sbn._host_step == int(sbn.num_batches_tracked) == 2
    twin = copy.deepcopy(sbn)
    twin.load_state_dict(sbn.state_dict())
    torch.testing.assert_close(twin(big), sbn(big), rtol=0, atol=0)


def test_one_value_per_channel_raises_as_batchnorm():
    """One value per channel in training: nothing to estimate from; raises as nn.BatchNorm does."""
    spec = BatchSampling(min_elements=BIG)
    _, sbn = _bn_pair(6, spec)
    x = torch.randn(1, 6, 1, 1)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(6)(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        sbn(x)
    z = torch.randn(2, 6, 1, 1)
    bn2 = copy.deepcopy(sbn).to_batchnorm()
    assert torch.equal(copy.deepcopy(sbn)(z), bn2(z))  # two values per channel: exact again


def test_functional_site_below_min_elements():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.w, self.b = nn.Parameter(torch.rand(4) + 0.5), nn.Parameter(torch.randn(4))
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x):
            return F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, self.training, 0.1, 1e-5)

    m = Net()
    gm = fxbns.transform(copy.deepcopy(m), BatchSampling(ratio=0.25, min_elements=BIG))
    x = torch.randn(8, 3, 6, 6)
    ya, yb = m(x), gm(x)
    assert torch.equal(ya, yb)
    assert torch.equal(m.rm, gm.rm) and torch.equal(m.rv, gm.rv)


def test_below_min_elements_with_virtual_rows_uses_the_real_rows():
    """With a virtual batch in the model (VDN elsewhere), a small site's exact statistics exclude it."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                      nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
    pol = Policy(BatchSampling(ratio=0.25, min_elements=BIG)).set_module_name("1", VirtualDataset(num_samples=3))
    x = torch.randn(6, 3, 5, 5)
    gm = fxbns.transform(m, pol, example_inputs=x)
    seen = {}
    site = gm.get_submodule("4")
    site.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    gm(x)
    assert seen["x"].shape[0] == 6 + 3  # real rows, then the virtual ones
    ref = F.batch_norm(seen["x"][:6], None, None, site.weight, site.bias, True, 0.0, site.eps)
    torch.testing.assert_close(seen["y"][:6], ref)


def test_report_says_which_batches_stay_exact():
    m = torchvision.models.mobilenet_v2(num_classes=10)
    gm = fxbns.transform(m, "fs", example_inputs=torch.randn(2, 3, 64, 64))
    rows = {r["name"]: r for r in fxbns.report(gm)}
    # features.14.conv.3 sees N x 160 x 2x2: exact below batch ceil(2**19 / (160 * 16)) = 205
    assert rows["features.14.conv.3"]["exact_below_batch"] == 205
    assert "exact below batch 205" in rows["features.14.conv.3"]["reason"]
    assert "keep exact statistics at small batches" in str(fxbns.report(gm))
    rows0 = fxbns.report(fxbns.transform(m, Policy.from_preset("fs").set_min_elements(0),
                                         example_inputs=torch.randn(2, 3, 64, 64)))
    assert all(not r["exact_below_batch"] for r in rows0)


class _Res(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        h = self.stem(x)
        out = self.bn(self.conv(h))
        out += h  # traced as out + h: restored in place (add_into)
        return out.relu()


def test_small_layers_and_in_place_adds_compile_fullgraph():
    torch._dynamo.reset()
    blk = _Res()
    ref = copy.deepcopy(blk.stem)
    x = torch.randn(4, 3, 16, 16)
    # the stem's BN is small (4*8*256 elements), the other sampled
    pol = Policy(BatchSampling(ratio=0.5, min_elements=4 * 8 * 256 + 1)).set_module_name(
        "bn", BatchSampling(ratio=0.5))
    gm = fxbns.transform(blk, _graph_mode(pol), example_inputs=x)
    assert any(n.target is add_into for n in gm._fxbns.graphs[True].nodes)
    out = torch.compile(gm, fullgraph=True)(x)
    out.sum().backward()
    ref(x)  # the small layer ran as nn.BatchNorm2d: the same running statistics
    torch.testing.assert_close(gm.get_submodule("stem.1").running_mean, ref[1].running_mean)
    torch.testing.assert_close(gm.get_submodule("stem.1").running_var, ref[1].running_var)
    assert gm.get_submodule("stem.0").weight.grad is not None and torch.isfinite(out).all()


# ----------------------------------------------------------------------------------------- in-place adds
def _adds(gm):
    return [n for n in gm._fxbns.graphs[True].nodes
            if n.op == "call_function" and n.target in (operator.add, add_into)]


def _graph_mode(policy):
    """A policy whose rewrite runs the traced graph (a micro-batch regime, never reached at the tests' batches):
    without a virtual batch or a functional site the model's own code runs, with its own in-place adds."""
    return (Policy.from_preset(policy) if isinstance(policy, str) else policy).set_micro_batch(MicroBatch(threshold=1))


def test_resnet_residual_adds_are_in_place_again_and_change_nothing():
    torch.manual_seed(0)
    m = torchvision.models.resnet18(num_classes=10)
    gm = fxbns.transform(copy.deepcopy(m), _graph_mode("exact"))
    adds = _adds(gm)
    assert len(adds) == 8 and all(n.target is add_into for n in adds)
    x = torch.randn(4, 3, 32, 32)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = m(xa), gm(xb)
    ya.square().mean().backward()
    yb.square().mean().backward()
    assert torch.equal(ya, yb) and torch.equal(xa.grad, xb.grad)
    for (name, pa), pb in zip(m.named_parameters(), gm.parameters()):
        assert torch.equal(pa.grad, pb.grad), name
    gm.eval()
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x), gm(x))


def test_add_stays_out_of_place_when_the_bn_output_has_another_reader():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

        def forward(self, x):
            y = self.bn(self.conv(x))
            return (y + x) * y  # y is read again after the add

    gm = fxbns.transform(Two(), _graph_mode("bs"))
    assert [n.target for n in _adds(gm)] == [operator.add]
    m = Two()
    gm = fxbns.transform(copy.deepcopy(m), _graph_mode("exact"))
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(m(x), gm(x))


def test_add_into_falls_back_when_the_sum_does_not_fit():
    a = torch.randn(1, 3, 1, 1)
    b = torch.randn(2, 3, 4, 4)
    before = a.clone()
    out = add_into(a, b)  # broadcasting would grow a
    assert out.shape == (2, 3, 4, 4) and torch.equal(a, before)
    h = torch.randn(2, 3, dtype=torch.float16)
    out = add_into(h, torch.randn(2, 3))  # promotes to float32
    assert out.dtype == torch.float32 and out is not h
    assert add_into(h, 1.0) is not h  # a number: a new tensor (a + b), as traced
    leaf = torch.randn(2, 3, requires_grad=True)
    assert add_into(leaf, 1.0) is not leaf
    c = torch.randn(2, 3)  # no grad required: summed in place
    assert add_into(c, torch.ones(3)) is c


@pytest.mark.parametrize("shape", [(16, 512, 2, 2), (16, 1024, 2, 1), (4, 2048, 4), (16, 512, 1, 2, 2)])
def test_exact_tiny_maps_as_rows_match_batchnorm(shape):
    """Exact statistics on maps of 2-4 elements run on an (N*H*W, C) copy: the same values as nn.BatchNorm
    (within float rounding: another summation order), the same running statistics and gradients, NCHW out."""
    from fxbns.modules import _tiny_map_rows

    cls = {3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)]
    torch.manual_seed(0)
    bn = cls(shape[1]).train()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    sbn = SampledBatchNorm.from_batchnorm(copy.deepcopy(bn), BatchSampling(min_elements=BIG))
    x = (torch.randn(shape) * 3 + 1).requires_grad_()
    assert _tiny_map_rows(x)
    dy = torch.randn(shape)
    x2 = x.detach().clone().requires_grad_()
    y, y2 = bn(x), sbn(x2)
    assert y2.shape == y.shape and y2.is_contiguous()
    torch.testing.assert_close(y2, y, rtol=1e-5, atol=1e-5)
    y.backward(dy)
    y2.backward(dy)
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sbn.weight.grad, bn.weight.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sbn.bias.grad, bn.bias.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sbn.running_mean, bn.running_mean)
    torch.testing.assert_close(sbn.running_var, bn.running_var)
    assert int(sbn.num_batches_tracked) == int(bn.num_batches_tracked) == 1


def test_tiny_map_rows_only_where_measured_faster():
    from fxbns.modules import _tiny_map_rows

    assert _tiny_map_rows(torch.empty(16, 512, 2, 2))
    assert not _tiny_map_rows(torch.empty(16, 128, 2, 2))  # below 2**15 elements: the native kernel is faster
    assert not _tiny_map_rows(torch.empty(16, 1024, 3, 3))  # 9 elements per map
    assert not _tiny_map_rows(torch.empty(16, 8192, 1, 1))  # 1x1: an (N, C) reduction already
    assert not _tiny_map_rows(torch.empty(16, 512, 2, 2).to(memory_format=torch.channels_last))
    assert not _tiny_map_rows(torch.empty(16, 512, 2, 2, device="meta"))  # other devices: not measured
