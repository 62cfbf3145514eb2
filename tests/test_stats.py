"""fxbns.recalibrate and fxbns.calibrate: population statistics, state left alone, the calibrated policy."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import every_layer
from torch import nn

import fxbns
from fxbns import BatchSampling, FeatureSampling, Policy
from fxbns.datasets import photo_crops


def _net():
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU())


class _Functional(nn.Module):
    """A BatchNorm written as an F.batch_norm call on the module's own buffers."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.register_buffer("rm", torch.zeros(4))
        self.register_buffer("rv", torch.ones(4))
        self.w = nn.Parameter(torch.ones(4))
        self.b = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return F.batch_norm(self.conv(x), self.rm, self.rv, self.w, self.b, self.training, 0.1, 1e-5)


def _pooled(t: torch.Tensor):
    """Mean and unbiased variance per channel of (N, C, ...) activations, as one batch."""
    v = t.transpose(0, 1).reshape(t.shape[1], -1).double()
    return v.mean(1), v.var(1)


def _vdn_pooled(real: torch.Tensor, virtual: torch.Tensor, mix: float):
    """A VDN site's population statistics: the virtual rows' moments pooled with the real rows' (weights mix,
    1 - mix) as the site pools them in training, unbiased with the pooled count (worked out independently)."""
    r = real.transpose(0, 1).reshape(real.shape[1], -1).double()
    v = virtual.transpose(0, 1).reshape(virtual.shape[1], -1).double()
    mean = mix * v.mean(1) + (1 - mix) * r.mean(1)
    var = mix * ((v - mean[:, None]) ** 2).mean(1) + (1 - mix) * ((r - mean[:, None]) ** 2).mean(1)
    n = r.shape[1] + v.shape[1]
    return mean, var * n / (n - 1)


def _inputs_of(model: nn.Module, batches, kind=nn.BatchNorm2d):
    """Each BatchNorm's inputs over a training forward of a copy, concatenated (the reference statistics)."""
    m = copy.deepcopy(model).train()
    seen: dict[str, list] = {}
    for name, mod in m.named_modules():
        if isinstance(mod, kind):
            mod.register_forward_pre_hook(lambda mod, a, n=name: seen.setdefault(n, []).append(a[0].detach()))
    with torch.no_grad():
        for b in batches:
            m(b)
    return {k: torch.cat(v) for k, v in seen.items()}


DATA = torch.randn(96, 3, 10, 10) * 2 + 0.5
SPLITS = {"3x32": [DATA[:32], DATA[32:64], DATA[64:]], "16+48+32": [DATA[:16], DATA[16:64], DATA[64:]],
          "95+1": [DATA[:95], DATA[95:]]}


@pytest.mark.parametrize("split", list(SPLITS))
def test_recalibrate_equals_pooled_statistics(split):
    batches = SPLITS[split]
    model = _net()
    ref = _inputs_of(model, batches)
    res = fxbns.recalibrate(model, batches, num_batches=len(batches))
    assert res.batches == len(batches) and res.samples == 96 and not res.ran_out
    for name in ("1", "4"):
        mean, var = _pooled(ref[name])
        bn = model.get_submodule(name)
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    # the first site's input does not depend on the split: every split gives the same statistics
    mean, var = _pooled(torch.cat([model[0](b) for b in batches]).detach())
    torch.testing.assert_close(model[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(model[1].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert [s.name for s in res.sites] == ["1", "4"] and res.sites[0].count == 96 * 100


@pytest.mark.parametrize("policy", ["bs", "fs", "vdn"])
def test_recalibrate_transformed_models(policy):
    model = _net()
    gm = fxbns.transform(model, every_layer(policy) if policy != "vdn" else "vdn", example_inputs=DATA[:2])
    res = fxbns.recalibrate(gm, SPLITS["16+48+32"], num_batches=3)
    assert len(res) == 2
    # the first site's population statistics of the conv's output: the real rows' alone for bs and fs; for vdn,
    # the virtual rows' (the same 4 in every batch) pooled 1:1 with all real rows', the pooling it trains with
    if policy == "vdn":
        virtual = model[0](gm._fxbns_virtual.samples).detach()
        mean, var = _vdn_pooled(model[0](DATA).detach(), torch.cat([virtual] * 3), 0.5)
    else:
        mean, var = _pooled(model[0](DATA).detach())
    sites = [m for m in gm.modules() if isinstance(m, fxbns.SampledBatchNorm)]
    torch.testing.assert_close(sites[0].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sites[0].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert res.sites[0].count == 96 * 100


class _TrainEvalDiffer(nn.Module):
    """Code that reads self.training: a transformed model has a training graph and an eval graph."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return F.dropout(self.bn(self.conv(x)), 0.0, self.training)


def test_recalibrate_from_eval_mode_runs_the_training_graph():
    model = _TrainEvalDiffer()
    gm = fxbns.transform(model, "vdn", example_inputs=DATA[:2])
    graphs = gm._fxbns.graphs
    assert graphs[True] is not graphs[False]
    gm.eval()
    res = fxbns.recalibrate(gm, SPLITS["3x32"], num_batches=3)
    assert not gm.training
    virtual = model.conv(gm._fxbns_virtual.samples).detach()
    mean, var = _vdn_pooled(model.conv(DATA).detach(), torch.cat([virtual] * 3), 0.5)
    torch.testing.assert_close(gm.bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gm.bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert res.sites[0].count == 96 * 64


def test_recalibrate_functional_sites():
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    plain = _Functional()
    res = fxbns.recalibrate(plain, batches, num_batches=3)
    mean, var = _pooled(torch.cat([plain.conv(b) for b in batches]).detach())
    torch.testing.assert_close(plain.rm.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(plain.rv.double(), var, rtol=1e-5, atol=1e-6)
    assert [s.name for s in res.sites] == ["batch_norm"] and res.sites[0].kind == "functional"
    # the same through the transformed model's stand-in (sampled) and with the site left exact
    for pol in (every_layer("fs"), "exact"):
        m = _Functional()
        gm = fxbns.transform(m, pol)
        fxbns.recalibrate(gm, batches, num_batches=3)
        mean, var = _pooled(torch.cat([m.conv(b) for b in batches]).detach())
        torch.testing.assert_close(gm.rm.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gm.rv.double(), var, rtol=1e-5, atol=1e-6)


class _TwoFunctional(nn.Module):
    """Two functional batch norms in one owner (its buffers), then one on tensors the model does not register."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Module()
        self.block.conv = nn.Conv2d(3, 4, 3)
        for i in range(2):
            self.block.register_buffer(f"rm{i}", torch.zeros(4))
            self.block.register_buffer(f"rv{i}", torch.ones(4))
        self.loose = (torch.zeros(4), torch.ones(4))  # not buffers: the site has no owner

    def forward(self, x):
        b = self.block
        y = F.batch_norm(b.conv(x), b.rm0, b.rv0, training=True)
        z = F.batch_norm(y * 2 + 1, b.rm1, b.rv1, training=True)
        return F.batch_norm(z - 3, *self.loose, training=True)


def test_recalibrate_functional_sites_in_one_owner_and_unowned():
    """Each functional site gets its own statistics and the site finder's name: owner + ".batch_norm", "#k" for
    the k-th call of the same owner; statistics that are not the model's buffers have no owner."""
    batches = [torch.randn(8, 3, 6, 6) for _ in range(2)]
    m = _TwoFunctional()
    res = fxbns.recalibrate(m, batches, num_batches=2)
    assert [s.name for s in res.sites] == ["block.batch_norm", "block.batch_norm#1", "batch_norm"]
    x = torch.cat([m.block.conv(b) for b in batches]).detach()
    mean, var = _pooled(x)
    torch.testing.assert_close(m.block.rm0.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.block.rv0.double(), var, rtol=1e-5, atol=1e-6)
    # the second site's input is the first's output: per batch, batch-normalised with that batch's statistics
    y = torch.cat([F.batch_norm(m.block.conv(b), None, None, training=True) * 2 + 1 for b in batches]).detach()
    mean1, var1 = _pooled(y)
    torch.testing.assert_close(m.block.rm1.double(), mean1, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.block.rv1.double(), var1, rtol=1e-5, atol=1e-5)


def _state(gm):
    out = {k: v.clone() for k, v in gm.state_dict().items() if "running_" not in k}
    for name, m in gm.named_modules():
        if "_fxbns_step" in m._buffers:
            out[name + "._fxbns_step"] = m._fxbns_step.clone()
        if "_host_step" in m.__dict__:
            out[name + "._host_step"] = torch.tensor(m._host_step)
    return out


@pytest.mark.parametrize("policy", ["fs", "vdn"])
def test_recalibrate_leaves_the_rest_alone(policy):
    model = _net()
    model[4].momentum = None  # cumulative average: restored as None
    gm = fxbns.transform(model, every_layer(policy) if policy == "fs" else "vdn", example_inputs=DATA[:2])
    gm.train()
    opt = torch.optim.SGD(gm.parameters(), lr=0.1)
    for i in range(3):  # a few steps: non-zero counters
        gm(DATA[i * 16:(i + 1) * 16]).mean().backward()
        opt.step()
        opt.zero_grad()
    gm.eval()
    gm.get_submodule("1").train()  # mixed modes
    modes = {n: m.training for n, m in gm.named_modules()}
    momenta = {n: m.momentum for n, m in gm.named_modules() if hasattr(m, "momentum")}
    before = _state(gm)
    rng = torch.get_rng_state()
    twin = copy.deepcopy(gm)
    fxbns.recalibrate(gm, SPLITS["3x32"], num_batches=3)
    assert {n: m.training for n, m in gm.named_modules()} == modes
    assert {n: m.momentum for n, m in gm.named_modules() if hasattr(m, "momentum")} == momenta
    after = _state(gm)
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert torch.equal(rng, torch.get_rng_state())
    # the next training step draws the same samples as it would have without recalibration
    gm.train()
    twin.train()
    x = DATA[:16]
    with torch.no_grad():
        torch.testing.assert_close(gm(x), twin(x))


def test_recalibrate_data_runs_out_and_zero_batches():
    model = _net()
    with pytest.warns(UserWarning, match="ran out after 2 of the 200"):
        res = fxbns.recalibrate(model, iter([DATA[:8], (DATA[8:16], torch.zeros(8))]))
    assert res.batches == 2 and res.requested == 200 and res.ran_out
    assert "2 of the 200 batches asked for" in str(res)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded no batches"):
        fxbns.recalibrate(model, [])
    with pytest.raises(ValueError, match="batch 0 is a str"):
        fxbns.recalibrate(model, ["x"])
    with pytest.raises(ValueError, match="num_batches must be an integer >= 1"):
        fxbns.recalibrate(model, [DATA], num_batches=0)
    with pytest.raises(ValueError, match=r"does not run on batch 1 \(shape \(4, 2, 10, 10\)\)"):
        fxbns.recalibrate(model, [DATA[:4], torch.randn(4, 2, 10, 10)], num_batches=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing half-written


def test_recalibrate_table_and_progress(capsys):
    model = _net()
    res = fxbns.recalibrate(model, SPLITS["3x32"], num_batches=3, progress=True)
    err = capsys.readouterr().err
    assert "recalibrate [" in err and "3/3 batches" in err
    text = str(res)
    assert "mean shift" in text and "\n1 " in text and "2 BatchNorm sites recalibrated over 3 batches" in text
    d = res.to_dict()
    assert d["sites"][0]["name"] == "1" and len(d["sites"][0]["new_mean"]) == 6


def test_recalibration_result_text_and_dict_exactly():
    """The table, summary and dict of a RecalibrationResult, character for character (built by hand)."""
    from fxbns.stats import RecalibrationResult, SiteRecalibration

    t = torch.tensor
    site = SiteRecalibration("layer1.bn", "module", 2, 640, t([0.0, 1.0]), t([1.0, 2.0]), t([0.5, 1.0]),
                             t([1.0, 4.0]), 0.123456, 0.5)
    full = RecalibrationResult([site], batches=3, requested=3, samples=96)
    assert not full.ran_out and len(full) == 1
    assert str(full) == repr(full) == (
        "name       channels  values/channel  mean shift (std)  var change\n"
        "---------  --------  --------------  ----------------  ----------\n"
        "layer1.bn  2         640             0.1235            50.00%\n"
        "1 BatchNorm sites recalibrated over 3 batches (96 samples)")
    short = RecalibrationResult([site], batches=2, requested=5, samples=64, skipped={"head.bn": "not reached"})
    assert short.ran_out
    assert str(short).splitlines()[-2:] == [
        "1 BatchNorm sites recalibrated over 2 of the 5 batches asked for (64 samples): the data ran out",
        "not recalibrated: head.bn: not reached"]
    assert short.to_dict() == {
        "batches": 2, "requested": 5, "samples": 64, "ran_out": True, "skipped": {"head.bn": "not reached"},
        "sites": [{"name": "layer1.bn", "kind": "module", "channels": 2, "count": 640, "mean_shift": 0.123456,
                   "var_change": 0.5, "old_mean": [0.0, 1.0], "old_var": [1.0, 2.0], "new_mean": [0.5, 1.0],
                   "new_var": [1.0, 4.0]}]}


def test_calibration_result_text_and_dict_exactly():
    """The table, summary and dict of a CalibrationResult, character for character (built by hand)."""
    from fxbns.stats import CalibrationResult

    fs = FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True)
    rows = [{"name": "1", "shape": [32, 6, 16, 16], "between": 0.25, "positional": 0.125, "rho1": 0.5, "spec": fs,
             "sample": 512, "fraction": 0.0625, "mean_error": 0.0812, "var_error": 0.0934, "n_eff": 150.0,
             "reason": None, "candidates": [{"spec": fs, "mean_error": 0.0812}]},
            {"name": "4", "shape": [32, 5, 16, 16], "between": None, "positional": None, "rho1": None, "spec": None,
             "sample": None, "fraction": None, "mean_error": None, "var_error": None, "n_eff": None,
             "reason": "no candidate meets the target", "candidates": []}]
    policy = fxbns.Policy(None).set_module_name("1", fs)
    res = CalibrationResult(policy, rows, target_error=0.1, batches=2, batch_shape=(32, 3, 16, 16))
    assert res.mean_fraction == 0.0625
    assert str(res) == repr(res) == (
        "name  shape       between  positional  rho(1)  chosen                             sample      "
        "error mean/var\n"
        "----  ----------  -------  ----------  ------  ---------------------------------  ----------  "
        "--------------\n"
        "1     32x6x16x16  0.25     0.12        0.50    fs(band, area=0.0625, per_sample)  512 (6.2%)  0.081/0.093\n"
        "4     32x5x16x16  -        -           -       exact                              -           -\n"
        "2 BatchNorm sites: 1 sampled, 1 exact; mean sample fraction 0.062; target error 0.1 (RMS relative error of "
        "the batch mean, in std, and variance); 2 batches of 32x3x16x16\n"
        "exact: 4: no candidate meets the target")
    d = res.to_dict()
    assert d["target_error"] == 0.1 and d["batches"] == 2 and d["batch_shape"] == [32, 3, 16, 16]
    assert d["policy"] == policy.to_dict()
    spec_dict = fxbns.policy.spec_to_dict(fs)
    assert d["sites"][0]["spec"] == spec_dict and d["sites"][0]["candidates"] == [{"spec": spec_dict,
                                                                                   "mean_error": 0.0812}]
    assert d["sites"][1]["spec"] is None and d["sites"][0]["shape"] == [32, 6, 16, 16]
    assert CalibrationResult(policy, [rows[1]], 0.1, 1, (8, 3)).mean_fraction == 1.0


# -- calibrate ---------------------------------------------------------------------------------------------------

def _photo_batches(n, batch=32, seed=0):
    x = photo_crops(size=32, count=n * batch, seed=seed)
    x = (x - x.mean((0, 2, 3), keepdim=True)) / x.std((0, 2, 3), keepdim=True)
    return list(x.split(batch))


def _size(row):
    return row["sample"] if row["spec"] is not None else math.prod(row["shape"][:1] + row["shape"][2:])


def test_calibrate_lower_target_never_picks_smaller_samples():
    torch.manual_seed(0)
    model = _net()
    batches = _photo_batches(3)
    sizes = []
    for target in (0.02, 0.05, 0.1, 0.3):
        res = fxbns.calibrate(model, batches, target_error=target, num_batches=3)
        sizes.append({r["name"]: _size(r) for r in res.table})
        for r in res.table:
            if r["spec"] is not None:
                assert r["mean_error"] <= target and r["var_error"] <= target
    for tighter, looser in zip(sizes, sizes[1:]):
        assert all(tighter[k] >= looser[k] for k in tighter), (tighter, looser)
    assert sizes[0] != sizes[-1]  # the target does change the choice


class _Identity(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.bn(x)


def _smooth_maps(n, c=4, size=32, seed=0):
    """Strongly correlated maps: low-resolution noise upsampled, each sample with its own offset, plus a
    position-dependent pattern common to every sample (a bright centre)."""
    g = torch.Generator().manual_seed(seed)
    low = torch.randn(n, c, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    x = x + 1.5 * torch.exp(-4 * (yy ** 2 + xx ** 2)) + torch.randn(n, c, 1, 1, generator=g)
    return x


def test_calibrate_strongly_correlated_maps_get_fs_with_per_sample_offsets():
    model = _Identity(4)
    batches = list(_smooth_maps(4 * 32).split(32))
    res = fxbns.calibrate(model, batches, target_error=0.1)
    row = res.table[0]
    assert row["rho1"] > 0.9 and row["between"] > 0.2
    spec = row["spec"]
    assert isinstance(spec, FeatureSampling) and spec.per_sample, spec
    # BS at a larger sample is predicted worse than the chosen FS sample; so is FS with one offset for the batch
    cands = row["candidates"]
    bs = [c for c in cands if isinstance(c["spec"], BatchSampling) and c["sample"] >= row["sample"]]
    assert bs and all(c["var_error"] > row["var_error"] and c["mean_error"] > row["mean_error"] for c in bs)
    shared = [c for c in cands if isinstance(c["spec"], FeatureSampling) and not c["spec"].per_sample
              and c["sample"] == row["sample"]]
    assert shared and all(max(c["mean_error"], c["var_error"]) > 0.1 for c in shared)


def test_calibrate_predicts_independent_values():
    """White noise: every sample's error is that of n independent values (finite-population corrected)."""
    model = _Identity(8)
    batches = [torch.randn(32, 8, 16, 16) for _ in range(4)]
    res = fxbns.calibrate(model, batches, target_error=0.05)
    total = 32 * 256
    for c in res.table[0]["candidates"]:
        n = c["sample"]
        expect = math.sqrt(1 / n - 1 / total)
        assert c["mean_error"] == pytest.approx(expect, rel=0.15), c
        assert c["var_error"] == pytest.approx(math.sqrt(2) * expect, rel=0.2), c


def test_calibrate_leaves_state_and_roundtrips_policy(tmp_path):
    model = _net()
    model.eval()
    before = copy.deepcopy(model.state_dict())
    rng = torch.get_rng_state()
    res = fxbns.calibrate(model, _photo_batches(2, batch=16), target_error=0.1, num_batches=2)
    assert not model.training and all(not m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert torch.equal(rng, torch.get_rng_state())
    assert [r["name"] for r in res.table] == ["1", "4"]
    assert set(res.policy.names) == {"1", "4"}
    gm = fxbns.transform(model, res.policy)
    rows = {r["name"]: r for r in fxbns.report(gm).rows}
    for r in res.table:
        assert rows[r["name"]]["estimator"] == (r["spec"].describe() if r["spec"] is not None else "exact")
    fxbns.save(gm, tmp_path / "ck.pt")
    back = fxbns.load(tmp_path / "ck.pt", _net())
    assert back._fxbns.policy.to_dict() == res.policy.to_dict()
    res.policy.save(tmp_path / "p.json")
    assert fxbns.Policy.load(tmp_path / "p.json").to_dict() == res.policy.to_dict()
    d = res.to_dict()
    assert d["sites"][0]["name"] == "1" and "candidates" in d["sites"][0] and d["target_error"] == 0.1
    text = str(res)
    assert "rho(1)" in text and "2 BatchNorm sites" in text


def test_calibrate_transformed_model_and_functional_site():
    m = _Functional()
    batches = [torch.randn(16, 3, 18, 18) for _ in range(2)]
    res = fxbns.calibrate(fxbns.transform(m, every_layer("fs")), batches, target_error=0.2, num_batches=2)
    assert [r["name"] for r in res.table] == ["batch_norm"]
    gm = fxbns.transform(m, res.policy)  # the original model takes the policy
    assert fxbns.report(gm).rows[0]["name"] == "batch_norm"


def test_calibrate_errors():
    model = _net()
    with pytest.raises(ValueError, match="yielded no batches"):
        fxbns.calibrate(model, [])
    with pytest.raises(ValueError, match=r"one shape .* batch 0 is \(8, 3, 10, 10\), batch 1 is \(4, 3, 10, 10\)"):
        fxbns.calibrate(model, [DATA[:8], DATA[:4]])
    with pytest.raises(ValueError, match="at least 2 samples"):
        fxbns.calibrate(model, [DATA[:1]])
    with pytest.raises(ValueError, match=r"does not run on batch 0 \(shape \(8, 2, 10, 10\)\)"):
        fxbns.calibrate(model, [torch.randn(8, 2, 10, 10)])
    with pytest.raises(ValueError, match=r"target_error must be a number in \(0, 1\]"):
        fxbns.calibrate(model, [DATA[:8]], target_error=0)
    with pytest.raises(ValueError, match="batch 0 is a list"):
        fxbns.calibrate(model, [[[1, 2]]])


# -- calibrate's figures against their formulas, computed here from the data --------------------------------------
def _structured(n, c=3, h=6, w=8, seed=0):
    """Per-sample offsets, a map pattern common to every sample, and channels of different scales and means."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, h, dtype=torch.float64),
                            torch.linspace(-1, 1, w, dtype=torch.float64), indexing="ij")
    pattern = torch.stack([torch.exp(-3 * (yy ** 2 + xx ** 2)), yy, xx * yy])[:c]  # (c, h, w)
    scale = torch.tensor([1.0, 5.0, 0.2], dtype=torch.float64)[:c].reshape(1, c, 1, 1)
    shift = torch.tensor([0.0, -3.0, 10.0], dtype=torch.float64)[:c].reshape(1, c, 1, 1)
    x = (torch.randn(n, c, 1, 1, generator=g, dtype=torch.float64) + 2 * pattern
         + torch.randn(n, c, h, w, generator=g, dtype=torch.float64))
    return x * scale + shift


def _figures(batches):
    """between, positional, rho1 and each BS sample's errors, worked out directly from the model's formulas."""
    n = batches[0].shape[0]
    fields = {"mean": [], "var": []}
    var = []
    for x in batches:
        var.append(x.var((0, 2, 3), unbiased=False))
        fields["mean"].append(x)
        fields["var"].append((x - x.mean((0, 2, 3), keepdim=True)) ** 2)
    var = torch.stack(var).mean(0)
    out = {}
    for key, fl in fields.items():
        rows = torch.cat(fl)  # every row of every call
        d = rows - rows.mean((2, 3), keepdim=True)
        g = d.mean(0)  # the common map
        sb2 = torch.stack([f.mean((2, 3)).var(0, unbiased=True) for f in fl]).mean(0)
        out[key] = (sb2, g, d - g, rows.shape[0])
    sb2, g, e, r = out["mean"]
    e2 = e.pow(2).mean((2, 3)).sum(0)
    gp = g.pow(2).mean((1, 2)) - e2 / r / r
    lag = ((e[..., 1:] * e[..., :-1]).mean((2, 3)).sum(0) + (e[:, :, 1:] * e[:, :, :-1]).mean((2, 3)).sum(0)) / 2
    figures = {"between": float((sb2 / var).mean()), "positional": float((gp.clamp_min(0) / var).mean()),
               "rho1": float((lag / e2).mean())}

    def bs(m):
        f = 1 / m - 1 / n
        return (float((out["mean"][0] * f / var).mean().sqrt()), float((out["var"][0] * f / var ** 2).mean().sqrt()))

    def spaced(count, limit=8):  # offsets: at most limit (a patch: 8 per dim, 64 in all), evenly from 0
        step = math.ceil(count / limit)
        return list(range(0, count, step))

    def fs(pts, per_sample, layout):
        """An FS sample's errors: a grid of pts points per dim, s // p apart, at every offset below s // p; a pts
        patch, or a band of pts values, at evenly spaced offsets.  The error model of calibrate's docstring
        (W / N plus the common map's share, its noise W / rows subtracted)."""
        def means(f):  # (rows, C, offsets): the sample mean of every row at every offset
            if layout == "band":  # a run of pts values of the row-major map, at up to 64 spread starts
                flat = f.flatten(2)
                return torch.stack([flat[..., i:i + pts].mean(-1) for i in spaced(flat.shape[-1] - pts + 1, 64)], -1)
            (h, w), (p, q) = f.shape[2:], pts
            if layout == "patch":
                return torch.stack([f[:, :, i:i + p, j:j + q].mean((2, 3))
                                    for i in spaced(h - p + 1) for j in spaced(w - q + 1)], -1)
            a, b = h // p, w // q
            return torch.stack([f[:, :, i:i + a * p:a, j:j + b * q:b].mean((2, 3))
                                for i in range(a) for j in range(b)], -1)
        errs = []
        for key, norm in (("mean", var), ("var", var ** 2)):
            _, g, e, r = out[key]
            we, wg = means(e), means(g[None])
            w, u = we.pow(2).mean(-1).sum(0) / r, we.mean(-1).pow(2).sum(0) / r
            gw, gu = wg.pow(2).mean(-1)[0], wg.mean(-1).pow(2)[0]
            common = (gw / n + (1 - 1 / n) * gu - (w / n + (1 - 1 / n) * u) / r) if per_sample else gw - w / r
            errs.append(float(((common.clamp_min(0) + w / n) / norm).mean().sqrt()))
        return tuple(errs)
    return figures, bs, fs


def test_calibrate_figures_equal_their_formulas_on_structured_maps():
    batches = list(_structured(3 * 16).split(16))
    res = fxbns.calibrate(_Identity(3).double(), batches, target_error=0.3)
    row = res.table[0]
    figures, bs, fs = _figures(batches)
    for k, v in figures.items():
        assert row[k] == pytest.approx(v, rel=1e-9), k
    assert 0.2 < row["positional"] < 0.9 and 0.05 < row["between"] < 0.9  # the structure is seen, not noise
    size = 6 * 8
    bs_rows = [c for c in row["candidates"] if isinstance(c["spec"], BatchSampling)]
    assert [c["sample"] // size for c in bs_rows] == [8, 4, 2]  # 16 rows: 1/2, 1/4, 1/8 (1/16, 1/32 give 2 again)
    for c in bs_rows:
        em, ev = bs(c["sample"] // size)
        assert (c["mean_error"], c["var_error"]) == (pytest.approx(em, rel=1e-9), pytest.approx(ev, rel=1e-9))
        assert c["fraction"] == c["sample"] / (16 * size)
    windows = [c for c in row["candidates"] if isinstance(c["spec"], FeatureSampling) and c["spec"].layout != "band"]
    assert {(c["spec"].layout, c["spec"].per_sample) for c in windows} == {(a, b) for a in ("grid", "patch")
                                                                             for b in (True, False)}
    for c in windows:
        pts = c["spec"].points((6, 8))
        em, ev = fs(pts, c["spec"].per_sample, c["spec"].layout)
        assert c["sample"] == 16 * math.prod(pts)
        assert (c["mean_error"], c["var_error"]) == (pytest.approx(em, rel=1e-9), pytest.approx(ev, rel=1e-9)), c
    bands = [c for c in row["candidates"] if isinstance(c["spec"], FeatureSampling) and c["spec"].layout == "band"
             and not c["spec"].per_sample]  # one offset for the batch
    assert len(bands) >= 3
    for c in bands:
        length = c["spec"].band_length((6, 8))
        em, ev = fs(length, False, "band")
        assert c["sample"] == 16 * length
        assert (c["mean_error"], c["var_error"]) == (pytest.approx(em, rel=1e-9), pytest.approx(ev, rel=1e-9)), c


def test_calibrate_on_per_sample_constants_and_on_a_common_map():
    """Maps that are one value per sample: every deviation is between samples.  Maps that are one pattern for
    every sample: every deviation is positional."""
    g = torch.Generator().manual_seed(1)
    const = torch.randn(32, 2, 1, 1, generator=g, dtype=torch.float64).expand(32, 2, 8, 8).contiguous()
    row = fxbns.calibrate(_Identity(2).double(), list(const.split(16)), target_error=0.3).table[0]
    # (S_b^2 is the rows' unbiased variance, as the finite-population formula takes it; var the batch's biased one)
    assert row["between"] == pytest.approx(16 / 15, rel=1e-9) and row["positional"] == pytest.approx(0.0, abs=1e-9)
    pattern = torch.randn(1, 2, 8, 8, generator=g, dtype=torch.float64).expand(32, 2, 8, 8).contiguous()
    noisy = pattern + 1e-3 * torch.randn(32, 2, 8, 8, generator=g, dtype=torch.float64)
    row = fxbns.calibrate(_Identity(2).double(), list(noisy.split(16)), target_error=0.3).table[0]
    assert row["positional"] == pytest.approx(1.0, abs=1e-3) and row["between"] == pytest.approx(0.0, abs=1e-3)


def test_calibrate_bs_prediction_on_flat_features():
    """(N, C) features: every row is one value; the BS error is the finite-population formula with the rows'
    unbiased variance over the batch's biased one, channel scales divided out."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 5, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10, 0.1, 3, 7],
                                                                              dtype=torch.float64) + 4
    batches = list(x.split(32))
    model = nn.Sequential(nn.BatchNorm1d(5)).double()
    row = fxbns.calibrate(model, batches, target_error=0.5).table[0]
    var = torch.stack([b.var(0, unbiased=False) for b in batches]).mean(0)
    s2 = torch.stack([b.var(0, unbiased=True) for b in batches]).mean(0)
    dev = [(b - b.mean(0)) ** 2 for b in batches]
    s2v = torch.stack([d.var(0, unbiased=True) for d in dev]).mean(0)
    assert row["between"] == pytest.approx(float((s2 / var).mean()), rel=1e-12)
    assert row["positional"] == 0.0 and row["rho1"] is None
    for c in row["candidates"]:
        f = 1 / c["sample"] - 1 / 32
        assert c["mean_error"] == pytest.approx(float((s2 * f / var).mean().sqrt()), rel=1e-9)
        assert c["var_error"] == pytest.approx(float((s2v * f / var ** 2).mean().sqrt()), rel=1e-9)
    assert [c["sample"] for c in row["candidates"]] == [16, 8, 4, 2]  # one candidate per distinct sample


def test_calibrate_rows_say_what_they_chose_and_why():
    keys = {"name", "shape", "between", "positional", "rho1", "spec", "sample", "fraction", "mean_error",
            "var_error", "n_eff", "reason", "candidates"}
    model = _net()
    res = fxbns.calibrate(model, _photo_batches(2, batch=16), target_error=0.3, num_batches=2)
    for r in res.table:
        assert set(r) == keys
        if r["spec"] is not None:  # a chosen sample: no reason given, n_eff from its predicted errors
            assert r["reason"] is None
            total = r["shape"][0] * math.prod(r["shape"][2:])
            assert r["n_eff"] == pytest.approx(1 / (r["mean_error"] ** 2 + 1 / total), rel=1e-12)
    assert any(r["spec"] is not None for r in res.table)
    const = fxbns.calibrate(_Identity(2), [torch.ones(4, 2, 4, 4)] * 2, target_error=0.1).table[0]
    assert set(const) == keys and const["spec"] is None and const["sample"] is None and const["n_eff"] is None
    assert const["reason"] == "constant input (no variance to estimate): left exact"


def test_calibrate_candidates_are_distinct_samples():
    for shape in [(4, 8, 6, 6), (16, 8, 32, 32), (3, 2, 5, 7), (8, 4, 1, 9)]:
        cands = fxbns.stats._candidates(shape, 0)
        bs = [c.rows for c in cands if c.probe is None]
        assert len(bs) == len(set(bs)) and all(m < shape[0] for m in bs)
        probes = [(c.probe, c.spec.per_sample) for c in cands if c.probe is not None]
        assert len(probes) == len(set(probes))
        assert all(c.count < math.prod(shape[:1] + shape[2:]) for c in cands)


def test_recalibrate_stops_at_num_batches():
    model = _net()
    first_two = SPLITS["3x32"][:2]
    ref = _inputs_of(model, first_two)
    res = fxbns.recalibrate(model, iter(SPLITS["3x32"]), num_batches=2)
    assert res.batches == 2 and res.samples == 64 and not res.ran_out and res.sites[0].count == 64 * 100
    for name in ("1", "4"):
        mean, var = _pooled(ref[name])
        torch.testing.assert_close(model.get_submodule(name).running_var.double(), var, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(model.get_submodule(name).running_mean.double(), mean, rtol=1e-5, atol=1e-6)


def test_recalibrate_skips_a_site_without_running_statistics_and_goes_on():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    ref = _inputs_of(model, SPLITS["3x32"])
    res = fxbns.recalibrate(model, SPLITS["3x32"], num_batches=3)
    assert res.skipped == {"1": "no running statistics (track_running_stats=False)"}
    assert [s.name for s in res.sites] == ["4"]
    mean, var = _pooled(ref["4"])
    torch.testing.assert_close(model[4].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert "not recalibrated: 1: no running statistics (track_running_stats=False)" in str(res)


def test_the_rng_of_every_cuda_device_the_model_is_on_is_kept():
    from torch._subclasses.fake_tensor import FakeTensorMode

    from fxbns.stats import _rng_devices
    assert _rng_devices(_net()) == []
    with FakeTensorMode():
        m = nn.Module()
        m.w = nn.Parameter(torch.empty(3, device="cuda:1"))
        m.register_buffer("b", torch.empty(3, device="cuda:0"))
        assert _rng_devices(m) == [0, 1]
        only_buffers = nn.Module()
        only_buffers.register_buffer("b", torch.empty(3, device="cuda:2"))
        assert _rng_devices(only_buffers) == [2]


def test_a_model_that_fails_names_the_error():
    class Fails(nn.Module):
        def forward(self, x):
            raise RuntimeError("no such layer\nsecond line")
    with pytest.raises(ValueError, match=r"^recalibrate: the model does not run on batch 0 \(shape \(2, 3\)\): "
                                         r"RuntimeError: no such layer$"):
        fxbns.recalibrate(Fails(), [torch.zeros(2, 3)])


def test_recalibrate_figures_use_the_layers_eps():
    eps = 0.5
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, eps=eps))
    old_m, old_v = model[1].running_mean.clone().double(), model[1].running_var.clone().double()
    res = fxbns.recalibrate(model, SPLITS["3x32"], num_batches=3)
    e = eps
    nm, nv = model[1].running_mean.double(), model[1].running_var.double()
    s = res.sites[0]
    assert s.mean_shift == pytest.approx(float(((nm - old_m) ** 2 / (nv + e)).mean().sqrt()), rel=1e-5)
    assert s.var_change == pytest.approx(float((((nv - old_v) / (old_v + e)) ** 2).mean().sqrt()), rel=1e-5)


def test_recalibrate_with_exactly_the_batches_asked_for_does_not_warn():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = fxbns.recalibrate(_net(), SPLITS["3x32"], num_batches=3)
    assert not res.ran_out and "ran out" not in str(res)


def test_recalibrate_a_torch_batch_norm_call():
    class Direct(_Functional):
        def forward(self, x):
            return torch.batch_norm(self.conv(x), self.w, self.b, self.rm, self.rv, self.training, 0.1, 1e-5, False)
    m = Direct()
    batches = SPLITS["3x32"]
    res = fxbns.recalibrate(m, batches, num_batches=3)
    mean, var = _pooled(torch.cat([m.conv(b) for b in batches]).detach())
    assert [s.name for s in res.sites] == ["batch_norm"]
    torch.testing.assert_close(m.rm.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.rv.double(), var, rtol=1e-5, atol=1e-6)


def test_calibrate_min_elements_leaves_small_sites_exact_and_marks_the_rest():
    batches = _photo_batches(2, batch=16)
    res = fxbns.calibrate(_net(), batches, target_error=0.3, num_batches=2, min_elements=10 ** 9)
    assert all(r["spec"] is None and r["reason"] == "below min_elements 1000000000 (runs exact): left exact"
               for r in res.table)
    res = fxbns.calibrate(_net(), batches, target_error=0.3, num_batches=2, min_elements=16)
    chosen = [r["spec"] for r in res.table if r["spec"] is not None]
    assert chosen and all(s.min_elements == 16 for s in chosen)


def test_calibrate_a_site_called_with_two_shapes_stays_exact():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(x).mean() + self.bn(F.avg_pool2d(x, 2)).mean()
    row = fxbns.calibrate(Twice(), [torch.randn(8, 3, 8, 8)] * 2, target_error=0.3).table[0]
    assert row["spec"] is None and row["reason"] == ("called with inputs of several shapes ((8, 3, 8, 8) and "
                                                     "(8, 3, 4, 4)) or one sample: left exact")


def test_recalibrate_names_batchnorms_the_forward_never_called():
    class Spare(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _net()
            self.unused = nn.BatchNorm2d(2)
            self.unused_untracked = nn.BatchNorm2d(2, track_running_stats=False)

        def forward(self, x):
            return self.net(x)
    res = fxbns.recalibrate(Spare(), SPLITS["3x32"], num_batches=3)
    assert [s.name for s in res.sites] == ["net.1", "net.4"]
    assert res.skipped == {"unused": "not called in the training forward",
                           "unused_untracked": "no running statistics (track_running_stats=False)"}


def test_no_progress_bar_unless_asked(capsys):
    fxbns.recalibrate(_net(), SPLITS["3x32"], num_batches=3)
    fxbns.calibrate(_net(), _photo_batches(2, batch=16), num_batches=2)
    assert capsys.readouterr().err == ""


def test_recalibrate_keeps_the_step_counter_of_a_site_without_running_statistics():
    """A sampled site with track_running_stats=False counts its steps in _fxbns_step, which draws its samples."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU(),
                          nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    gm = fxbns.transform(model, every_layer("fs"), example_inputs=DATA[:2])
    gm.train()
    with torch.no_grad():
        for i in range(2):
            gm(DATA[i * 16:(i + 1) * 16])
    site = gm.get_submodule("1")
    before = site._fxbns_step.clone()
    assert int(before) == 2
    res = fxbns.recalibrate(gm, SPLITS["3x32"], num_batches=3)
    assert torch.equal(site._fxbns_step, before) and "1" in res.skipped


class _SplitBN(nn.BatchNorm2d):
    """A BatchNorm that normalises the first half of the batch itself and passes the second half to a child
    BatchNorm (the AdvProp auxiliary-BN pattern, as timm's SplitBatchNorm2d)."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.aux = nn.BatchNorm2d(c)

    def forward(self, x):
        h = x.shape[0] // 2
        return torch.cat([super().forward(x[:h]), self.aux(x[h:])])


class _OwnArithmetic(nn.BatchNorm2d):
    """A BatchNorm subclass that normalises with its own arithmetic and never calls F.batch_norm."""

    def forward(self, input):
        m, v = input.mean((0, 2, 3), keepdim=True), input.var((0, 2, 3), unbiased=False, keepdim=True)
        return (input - m) / (v + self.eps).sqrt()


def _shifted_batches():
    g = torch.Generator().manual_seed(3)
    return [torch.randn(8, 3, 9, 9, generator=g) + torch.arange(8.0).view(8, 1, 1, 1) for _ in range(3)]


def test_recalibrate_gives_each_nested_batchnorm_its_own_rows():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _SplitBN(4))
    batches = _shifted_batches()
    r = fxbns.recalibrate(m, batches, num_batches=3)
    with torch.no_grad():
        feats = [m[0](b) for b in batches]
    for bn, rows in ((m[1], slice(0, 4)), (m[1].aux, slice(4, 8))):
        mean, var = _pooled(torch.cat([f[rows] for f in feats]))
        torch.testing.assert_close(bn.running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(bn.running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert {s.name: s.count for s in r.sites} == {"1": 3 * 4 * 49, "1.aux": 3 * 4 * 49} and not r.skipped


def test_calibrate_measures_nested_batchnorms_on_their_own_rows():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _SplitBN(4))
    table = {r["name"]: r for r in fxbns.calibrate(m, _shifted_batches()).table}
    assert set(table) == {"1", "1.aux"}
    assert all(r["shape"] == [4, 4, 7, 7] for r in table.values())  # half of each batch of 8


def test_timm_split_batchnorm_recalibrated_per_split():
    timm_layers = pytest.importorskip("timm.layers")
    m = nn.Sequential(nn.Conv2d(3, 4, 3), timm_layers.SplitBatchNorm2d(4, num_splits=2))
    batches = _shifted_batches()
    fxbns.recalibrate(m, batches, num_batches=3)
    with torch.no_grad():
        feats = [m[0](b) for b in batches]
    for bn, rows in ((m[1], slice(0, 4)), (m[1].aux_bn[0], slice(4, 8))):
        torch.testing.assert_close(bn.running_mean.double(), _pooled(torch.cat([f[rows] for f in feats]))[0],
                                   rtol=1e-5, atol=1e-6)


def test_batchnorm_with_its_own_arithmetic_counts_its_whole_input():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _OwnArithmetic(4))
    batches = _shifted_batches()
    r = fxbns.recalibrate(m, batches, num_batches=3)
    with torch.no_grad():
        mean, var = _pooled(torch.cat([m[0](b) for b in batches]))
    torch.testing.assert_close(m[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m[1].running_var.double(), var, rtol=1e-5, atol=1e-6)
    assert [s.count for s in r.sites] == [3 * 8 * 49]


class _SplitBNNoStats(nn.BatchNorm2d):
    """_SplitBN without running statistics: its batch_norm calls pass None, so only the call's place says whose
    it is."""

    def __init__(self, c: int) -> None:
        super().__init__(c, track_running_stats=False)
        self.aux = nn.BatchNorm2d(c, track_running_stats=False)

    def forward(self, x):
        h = x.shape[0] // 2
        return torch.cat([super().forward(x[:h]), self.aux(x[h:])])


def test_calibrate_places_calls_without_running_statistics_by_module():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _SplitBNNoStats(4))
    table = {r["name"]: r for r in fxbns.calibrate(m, _shifted_batches()).table}
    assert set(table) == {"1", "1.aux"} and all(r["shape"] == [4, 4, 7, 7] for r in table.values())
    r = fxbns.recalibrate(m, _shifted_batches(), num_batches=3)
    assert not r.sites and set(r.skipped) == {"1", "1.aux"}
    assert all("no running statistics" in why for why in r.skipped.values())


class _KeywordCall(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = _OwnArithmetic(4)

    def forward(self, x):
        return self.bn(input=self.conv(x))


def test_batchnorm_called_with_a_keyword_input_is_counted():
    m = _KeywordCall()
    r = fxbns.recalibrate(m, _shifted_batches(), num_batches=3)
    assert [(s.name, s.count) for s in r.sites] == [("bn", 3 * 8 * 49)]


class _FrozenBN(nn.Module):
    """A backbone whose train() keeps its BatchNorms in eval mode (frozen statistics, as detection backbones do)."""

    def __init__(self, bn: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = bn(4)
        self.head = nn.BatchNorm2d(4)

    def train(self, mode: bool = True):
        super().train(mode)
        self.bn.eval()
        return self

    def forward(self, x):
        return self.head(self.bn(self.conv(x)))


@pytest.mark.parametrize("bn", [nn.BatchNorm2d, _OwnArithmetic], ids=["batch_norm-call", "own-arithmetic"])
def test_batchnorm_kept_in_eval_by_the_model_is_left_alone(bn):
    m = _FrozenBN(bn)
    before = m.bn.running_mean.clone(), m.bn.running_var.clone()
    r = fxbns.recalibrate(m, _shifted_batches(), num_batches=3)
    assert [s.name for s in r.sites] == ["head"] and "bn" in r.skipped
    assert torch.equal(m.bn.running_mean, before[0]) and torch.equal(m.bn.running_var, before[1])
    assert [row["name"] for row in fxbns.calibrate(m, _shifted_batches()).table] == ["head"]


class _GhostBN(nn.BatchNorm2d):
    """Ghost batch norm: the module normalises each half of its batch on its own, one batch_norm call per half."""

    def forward(self, x):
        h = x.shape[0] // 2
        return torch.cat([super().forward(x[:h]), super().forward(x[h:])])


@pytest.mark.parametrize("stats", [True, False], ids=["running-stats", "no-running-stats"])
def test_ghost_batchnorm_counts_every_slice(stats):
    m = nn.Sequential(nn.Conv2d(3, 4, 3), _GhostBN(4, track_running_stats=stats))
    batches = _shifted_batches()
    (row,) = fxbns.calibrate(m, batches).table
    assert row["name"] == "1" and row["shape"] == [4, 4, 7, 7]  # the slices, as the module normalises them
    r = fxbns.recalibrate(m, batches, num_batches=3)
    if stats:
        mean, var = _pooled(torch.cat([m[0](b) for b in batches]).detach())
        assert [s.count for s in r.sites] == [3 * 8 * 49]
        torch.testing.assert_close(m[1].running_mean.double(), mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(m[1].running_var.double(), var, rtol=1e-5, atol=1e-6)
    else:
        assert not r.sites and "no running statistics" in r.skipped["1"]


class _NoStatsFunctional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        return F.batch_norm(self.conv(x), None, None, training=True)


def test_functional_call_without_running_statistics_is_a_site():
    (row,) = fxbns.calibrate(_NoStatsFunctional(), _shifted_batches()).table
    assert row["name"] == "batch_norm" and row["shape"] == [8, 4, 7, 7]


def test_site_kinds_name_module_and_functional_sites():
    """The result says which sites are modules (plain or sampled) and which are functional calls."""
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    gm = fxbns.transform(m, Policy.from_preset("bs").set_min_elements(0).set_module_name("3", None))
    assert isinstance(gm[1], fxbns.SampledBatchNorm) and type(gm[3]) is nn.BatchNorm2d
    r = fxbns.recalibrate(gm, _shifted_batches(), num_batches=3)
    assert [(s.name, s.kind) for s in r.sites] == [("1", "module"), ("3", "module")]
    r = fxbns.recalibrate(_Functional(), _shifted_batches(), num_batches=3)
    assert [(s.name, s.kind) for s in r.sites] == [("batch_norm", "functional")]
