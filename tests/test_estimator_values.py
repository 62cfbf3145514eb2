"""Estimator values against their formulas, computed by hand from the real and virtual rows: VDN mixing, the
micro preset's pooled statistics, and which rows a sample takes (seeds, layers and steps draw differently)."""

import pytest
import torch
from torch import nn

import fxbns
from fxbns import BatchSampling, FeatureSampling, Policy, VirtualDataset

DIMS = (0, 2, 3)

pytestmark = pytest.mark.usefixtures("tiny_samples")  # formulas on small samples (the rule: test_ops.py)


def _bn_first(c=3, dtype=torch.float64):
    """A model whose first layer is a BatchNorm, so its input is the model input (plus any virtual rows).
    ``momentum=1``: after a step the running statistics are that step's mean and unbiased variance."""
    return nn.Sequential(nn.BatchNorm2d(c, momentum=1.0), nn.Conv2d(c, 2, 1)).to(dtype)


def _pooled(parts, n_elements):
    """Pooled statistics of ``parts`` [(weight, tensor)]: mean = sum w E[x]; var = sum w E[(x - mean)^2];
    the running variance is that var, unbiased with the elements counted."""
    mean = sum(w * t.mean(DIMS) for w, t in parts)
    var = sum(w * (t - mean.view(1, -1, 1, 1)).square().mean(DIMS) for w, t in parts)
    return mean, var, var * n_elements / (n_elements - 1)


def _seen(bn):
    seen = []
    bn.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    return seen


@pytest.mark.parametrize("mix", [1.0, 0.5, 0.3])
def test_vdn_mixing_formula(mix):
    torch.manual_seed(0)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64) * 2 + 3  # real rows far from the virtual ones' N(0, 1)
    model = _bn_first()
    with torch.no_grad():
        model[0].weight.uniform_(0.5, 1.5)
        model[0].bias.normal_()
    gm = fxbns.transform(model, VirtualDataset(num_samples=4, mix=mix), example_inputs=x)
    v = gm._fxbns_virtual.samples
    assert v.shape == (4, 3, 4, 4) and v.dtype == torch.float64
    seen = _seen(gm.get_submodule("0"))
    out_rows = _seen(gm.get_submodule("1"))
    gm.train()
    y = gm(x)
    assert y.shape[0] == 5 and torch.equal(seen[0], torch.cat([x, v]))  # the virtual rows ride along
    if mix == 1:
        mean, var, unbiased = _pooled([(1.0, v)], 4 * 16)
    else:
        mean, var, unbiased = _pooled([(1 - mix, x), (mix, v)], (5 + 4) * 16)
    bn = gm.get_submodule("0")
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, unbiased, rtol=1e-12, atol=1e-12)
    # the real rows are normalised with those statistics (the next layer's input, virtual rows included)
    expect = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + bn.eps).view(1, -1, 1, 1)
    expect = expect * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(out_rows[0][:5], expect, rtol=1e-10, atol=1e-10)
    # and not the statistics of the real rows alone
    assert (bn.running_mean - x.mean(DIMS)).abs().max() > 0.1


def test_vdn_mixing_with_a_batch_sample_of_the_real_rows():
    """``real=BatchSampling``: the real part is a block of rows; the pooled mean fits exactly one block."""
    x = torch.arange(6, dtype=torch.float64).view(6, 1, 1, 1).expand(6, 2, 3, 3).contiguous() * 10
    model = _bn_first(c=2)
    spec = VirtualDataset(num_samples=2, mix=0.25, real=BatchSampling(ratio=0.5, min_samples=1))
    gm = fxbns.transform(model, spec, example_inputs=x)
    v = gm._fxbns_virtual.samples
    gm.train()
    gm(x)
    bn = gm.get_submodule("0")
    fits = []
    for start in range(0, 6 - 3 + 1):  # BS takes ceil(0.5 * 6) = 3 consecutive rows
        block = x[start:start + 3]
        mean, var, unbiased = _pooled([(0.75, block), (0.25, v)], (3 + 2) * 9)
        if torch.allclose(bn.running_mean, mean, rtol=1e-12, atol=1e-12):
            torch.testing.assert_close(bn.running_var, unbiased, rtol=1e-12, atol=1e-12)
            fits.append(start)
    assert len(fits) == 1


def test_micro_preset_pools_all_real_rows_with_virtual_ones_at_small_batches():
    torch.manual_seed(0)
    x4 = torch.randn(4, 3, 5, 5, dtype=torch.float64) + 2
    gm = fxbns.transform(_bn_first(), "micro", example_inputs=x4)
    v = gm._fxbns_virtual.samples
    micro = Policy.from_preset("micro").micro
    assert micro.threshold == 4 and micro.estimator.mix == 0.5 and micro.estimator.real is None
    assert v.shape == (micro.estimator.num_samples, 3, 5, 5)
    bn = gm.get_submodule("0")
    seen = _seen(bn)
    gm.train()
    for n in (1, 4):  # batch 1 trains: its statistics come half from the virtual rows
        x = x4[:n]
        gm(x)
        assert torch.equal(seen[-1], torch.cat([x, v]))
        mean, var, unbiased = _pooled([(0.5, x), (0.5, v)], (n + 4) * 25)
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, unbiased, rtol=1e-12, atol=1e-12)
    # above the threshold: no virtual rows; the fs preset leaves this small layer exact, over the real rows
    x5 = torch.randn(5, 3, 5, 5, dtype=torch.float64) * 3
    gm(x5)
    assert seen[-1].shape[0] == 5
    torch.testing.assert_close(bn.running_mean, x5.mean(DIMS), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, x5.var(DIMS, unbiased=True), rtol=1e-12, atol=1e-12)


class TwoLayers(nn.Module):
    """Two BatchNorms reading the same input: what differs between their samples is the layer alone."""

    def __init__(self):
        super().__init__()
        self.a = nn.BatchNorm2d(1, momentum=1.0)
        self.b = nn.BatchNorm2d(1, momentum=1.0)

    def forward(self, x):
        return self.a(x) + self.b(x)


N_ROWS = 16
# row i holds 2**i everywhere: the sum of the sampled rows' values names the rows (exact in float64)
CODED = (2.0 ** torch.arange(N_ROWS, dtype=torch.float64)).view(N_ROWS, 1, 1, 1).expand(N_ROWS, 1, 2, 2).contiguous()


def _rows_taken(bn, m):
    code = int(round(float(bn.running_mean[0]) * m))
    return frozenset(i for i in range(N_ROWS) if code >> i & 1)


def _draws(seed, steps=3, draw="random"):
    """The rows layer a and layer b take at each of ``steps`` training steps with policy seed ``seed``."""
    pol = Policy(BatchSampling(ratio=0.25, draw=draw)).set_seed(seed)
    gm = fxbns.transform(TwoLayers().double(), pol, example_inputs=CODED)
    gm.train()
    out = []
    for _ in range(steps):
        gm(CODED)
        out.append((_rows_taken(gm.a, 4), _rows_taken(gm.b, 4)))
    return out


@pytest.mark.parametrize("draw", ["random", "block"])
def test_seeds_layers_and_steps_draw_different_samples(draw):
    d0, d0_again, d1 = _draws(0, draw=draw), _draws(0, draw=draw), _draws(1, draw=draw)
    for a, b in d0 + d1:
        assert len(a) == len(b) == 4  # 4 of 16 rows, each exactly once
        if draw == "block":
            assert max(a) - min(a) == 3 and max(b) - min(b) == 3  # consecutive rows
    assert d0 == d0_again  # the same seed: the same samples, step for step
    assert d0 != d1  # another seed: other samples
    assert any(a != b for a, b in d0)  # two layers on the same input do not share their sample
    assert len({a for a, _ in d0}) > 1  # the steps of one layer do not repeat one sample


def test_feature_sampling_seeds_and_layers_differ():
    """FS (a patch at a random position): the running mean of a map holding distinct values names the patch."""
    x = torch.arange(64, dtype=torch.float64).view(1, 1, 8, 8).expand(2, 1, 8, 8).contiguous()

    def means(seed):
        pol = Policy(FeatureSampling(patch=(2, 2))).set_seed(seed)
        gm = fxbns.transform(TwoLayers().double(), pol, example_inputs=x)
        gm.train()
        got = []
        for _ in range(3):
            gm(x)
            got.append((float(gm.a.running_mean[0]), float(gm.b.running_mean[0])))
        return got

    m0, m1 = means(0), means(1)
    assert m0 == means(0) and m0 != m1
    assert any(a != b for a, b in m0)
    # a 2x2 patch at row r, column c of the map has mean 8 r + c + 4.5: every value is a valid patch
    for a, b in m0 + m1:
        for v in (a, b):
            r, c = divmod(v - 4.5, 8)
            assert v - 4.5 == int(v - 4.5) and 0 <= r <= 6 and 0 <= c <= 6



def test_site_seed():
    from fxbns.modules import site_seed

    assert site_seed("a.bn", 0) == site_seed("a.bn", 0)
    assert len({site_seed("a.bn", 0), site_seed("b.bn", 0), site_seed("a.bn", 1)}) == 3
    assert all(0 <= site_seed(n, s) < 2 ** 31 - 1 for n in ("", "x", "layer4.1.bn2") for s in (0, 1, 10 ** 9))
