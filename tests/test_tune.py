"""fxbns.tune: the per-layer sampled-or-exact choice timed inside training steps."""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxbns
from fxbns import BatchSampling, FeatureSampling, Policy
from fxbns.tune import _Timer


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),          # 0-2: tiny (4x8x8x8)
        nn.Conv2d(8, 512, 1, stride=4), nn.BatchNorm2d(512), nn.ReLU(),     # 3-5: 4x512x2x2
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 10))


def test_tune_times_every_sampled_site_and_sets_the_slower_ones_exact(tiny_samples):
    model = _net()
    x = torch.randn(4, 3, 8, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    pol = Policy(FeatureSampling(area_ratio=0.25))  # min_elements 0: every layer sampled
    res = fxbns.tune(model, pol, x, steps=4, loss_fn=lambda out: out.square().mean())
    # the model, its state, the policy passed in and the global RNG are untouched
    assert getattr(model, "_fxbns", None) is None and isinstance(model[1], nn.BatchNorm2d)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)
    assert pol.names == {}
    rows = {r["name"]: r for r in res.rows}
    assert set(rows) == {"1", "4"} and res.steps == 4
    for r in rows.values():
        assert r["sampled_fwd_ms"] > 0 and r["sampled_bwd_ms"] > 0 and r["exact_fwd_ms"] > 0
        assert r["exact_bwd_ms"] > 0  # also for "4", whose exact backward is several nodes (the (N*H*W, C) form)
        assert r["choice"] in ("sampled", "exact")
        assert (r["choice"] == "exact") == (r["diff_ms"] >= 0)
    # a 4x8x8x8 layer: the sampled op's fixed cost (tens of microseconds of Python and small kernels) is several
    # times the native kernel's whole time at this size
    assert rows["1"]["choice"] == "exact" and rows["1"]["sampled_ms"] > rows["1"]["exact_ms"]
    assert sorted(res.exact) == sorted(n for n, r in rows.items() if r["choice"] == "exact")
    assert all(isinstance(res.policy.names[n], fxbns.Exact) for n in res.exact)
    # the tuned policy drives transform, and survives a save/load of the checkpoint
    gm = fxbns.transform(model, res.policy, example_inputs=x)
    est = {r["name"]: r["estimator"] for r in fxbns.report(gm)}
    assert est["1"] == "exact"
    assert (est["4"] == "exact") == ("4" in res.exact)
    d = res.to_dict()
    json.dumps(d)
    assert "exact" in str(res) and "1 " in str(res)
    assert Policy.from_dict(d["policy"]).names.keys() == res.policy.names.keys()


def test_tune_skips_sites_that_are_exact_at_that_size():
    model = _net()
    res = fxbns.tune(model, "bs", torch.randn(4, 3, 8, 8), steps=1, warmup=0)
    assert res.rows == [] and res.exact == []  # every layer is under the preset's min_elements
    assert res.policy.default == Policy.from_preset("bs").default


def test_tune_keeps_a_callable_policy_working():
    calls = []

    def fn(name, module, site):
        calls.append(name)
        return BatchSampling(ratio=0.5)

    pol = Policy(FeatureSampling()).set_callable(fn)
    model = _net()
    res = fxbns.tune(model, pol, torch.randn(4, 3, 8, 8), steps=2)
    assert calls and {r["name"] for r in res.rows} == {"1"}  # the site that samples at this size, timed
    for name in ("1", "4"):  # the tuned choice outranks the callable; the callable still answers the others
        want = None if name in res.exact else BatchSampling(ratio=0.5)
        assert res.policy.spec_for(name, model[int(name)], "conv") == want


def test_timer_sees_a_chain_of_backward_nodes():
    """The backward time spans every node the module created, not only its output's node."""
    class Chain(nn.Module):
        def forward(self, x):
            return (x.movedim(1, -1) * 2).movedim(-1, 1).contiguous()

    m = Chain()
    t = _Timer(m, torch.zeros(()))
    x = torch.randn(64, 256, 8, 8, requires_grad=True)
    y = m(x * 1)
    assert t.take()[1] == 0.0  # nothing yet
    t._calls = []
    y = m(x * 1)
    y.backward(torch.ones_like(y))
    fwd, bwd = t.take()
    t.remove()
    assert fwd > 0 and bwd > 0
    assert len(m._forward_hooks) == 0 and len(m._forward_pre_hooks) == 0


@pytest.mark.parametrize("kwargs,err,needle", [
    ({}, ValueError, "needs example_inputs"),
    ({"example_inputs": torch.randn(4, 3, 8, 8), "steps": 0}, ValueError, "steps must be an integer >= 1"),
])
def test_tune_errors(kwargs, err, needle):
    with pytest.raises(err, match=needle):
        fxbns.tune(_net(), "fs", **kwargs)


def test_tune_rejects_transformed_models_and_outputs_without_grad():
    gm = fxbns.transform(_net(), "fs")
    with pytest.raises(ValueError, match="already transformed"):
        fxbns.tune(gm, "fs", torch.randn(4, 3, 8, 8))
    with pytest.raises(ValueError, match="pass loss_fn"):
        fxbns.tune(nn.Sequential(_net(), _ArgMax()), Policy(FeatureSampling()), torch.randn(4, 3, 8, 8), steps=1)


class _ArgMax(nn.Module):
    def forward(self, x):
        return x.argmax()


def test_tune_with_cross_entropy_loss_trains_nothing():
    model = _net()
    y = torch.randint(0, 10, (4,))
    w = model[0].weight.detach().clone()
    fxbns.tune(model, Policy(FeatureSampling()), torch.randn(4, 3, 8, 8), steps=1,
               loss_fn=lambda out: F.cross_entropy(out, y))
    assert torch.equal(model[0].weight, w) and model[0].weight.grad is None


@pytest.mark.parametrize("preset", ["vdn", "micro", "exact"])
def test_tune_leaves_virtual_and_exact_policies_as_they_are(preset):
    res = fxbns.tune(_net(), preset, torch.randn(4, 3, 8, 8), steps=1, warmup=0)
    assert res.rows == [] and res.policy.to_dict()["default"] == Policy.from_preset(preset).to_dict()["default"]
