"""The report says what runs: per site sampled or exact at the given or captured shape, and why; the summary
counts from that; it reads the live modules; the table fits 100 columns."""

import json

import torch
import torchvision
from conftest import every_layer
from torch import nn

import fxbns
from fxbns import BatchSampling, MicroBatch, Policy, SampledBatchNorm


def _runs(rep):
    return {r["name"]: r["runs"] for r in rep.rows}


def test_small_shape_runs_exact_and_the_summary_says_so():
    m = torchvision.models.resnet18(num_classes=10)
    t = fxbns.transform(m, "fs", example_inputs=torch.randn(8, 3, 32, 32))
    rep = fxbns.report(t)
    assert set(_runs(rep).values()) == {"exact"}  # every layer under the preset's 2**19 elements
    assert all("min_elements" in r["why"] for r in rep.rows)
    assert "20 BatchNorm sites: 0 sampled, 20 exact" in str(rep)
    assert rep.to_dict()["summary"] == {"sites": 20, "sampled": 0, "exact": 20, "unknown": 0}
    # at a shape given to report(): the stem and the first two stages sample at batch 64, 64x64
    big = fxbns.report(t, torch.randn(64, 3, 64, 64))
    assert sum(v == "sampled" for v in _runs(big).values()) == 10
    assert _runs(big)["bn1"] == "sampled" and _runs(big)["layer4.1.bn2"] == "exact"
    assert "10 sampled, 10 exact" in str(big)
    # the given shape did not change the model: the captured shapes are still reported without one
    assert fxbns.report(t).rows[0]["shape"] == [8, 64, 16, 16]


def test_no_shape_means_runs_none():
    t = fxbns.transform(torchvision.models.resnet18(num_classes=10), "fs")
    rep = fxbns.report(t)
    assert all(r["runs"] is None for r in rep.rows)
    assert rep.counts()["unknown"] == 20 and "20 without a shape" in str(rep)


def test_runs_matches_what_the_modules_do():
    """The report's sampled/exact agrees with the modules' behaviour: a sampled site's running mean moves to
    its sample's mean (fxbns.demo.sampled_sites), an exact one to the batch's."""
    from fxbns.demo import sampled_sites

    m = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(16, 3, 96, 96)
    t = fxbns.transform(m, "fs", example_inputs=x)
    rep = fxbns.report(t)
    reported = sorted(n for n, v in _runs(rep).items() if v == "sampled")
    assert reported and len(reported) < 20
    assert sorted(sampled_sites(t, x)) == reported


def test_micro_rows_show_the_virtual_batch():
    m = torchvision.models.resnet18(num_classes=10)
    t = fxbns.transform(m, "micro", example_inputs=torch.randn(2, 3, 32, 32))
    rep = fxbns.report(t)
    assert set(_runs(rep).values()) == {"sampled"}  # batch 2 <= 4: the virtual batch applies everywhere
    r = rep.rows[0]
    assert r["active"].startswith("vdn(n=4") and "micro-batch (batch 2 <= 4)" in r["why"]
    assert r["virtual_batch"] == "training batch <= 4"
    assert "virtual batch" in str(rep) and "batch <= 4" in str(rep)
    # at batch 16 the regime is off: the fs preset's rule decides
    r16 = fxbns.report(t, torch.randn(16, 3, 32, 32))
    assert set(_runs(r16).values()) == {"exact"} and r16.rows[0]["active"].startswith("fs(")


def test_vdn_rows_and_policy_exact_rows():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    pol = Policy.from_preset("vdn").set_module_name("3", None)
    t = fxbns.transform(m, pol, example_inputs=torch.randn(4, 3, 10, 10))
    rows = {r["name"]: r for r in fxbns.report(t).rows}
    assert rows["1"]["runs"] == "sampled" and rows["1"]["virtual_batch"] == "every training batch"
    assert rows["3"]["runs"] == "exact" and rows["3"]["why"] == "policy: exact"
    assert "statistics from the real rows only" in rows["3"]["reason"]
    assert {r["via"] for r in rows.values()} == {"graph"}
    # and so it is: the policy-exact site normalises the real rows with their own statistics
    seen = {}
    t[3].register_forward_hook(lambda mod, args, out: seen.update(x=args[0], y=out))
    t.train()
    t(torch.randn(4, 3, 10, 10))
    assert seen["x"].shape[0] == 4 + 4  # the virtual rows pass through the site
    ref = torch.nn.functional.batch_norm(seen["x"][:4], None, None, t[3].weight, t[3].bias, True, 0.0, t[3].eps)
    torch.testing.assert_close(seen["y"][:4], ref)


def test_live_modules_a_site_changed_after_transform():
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8))
    t = fxbns.transform(m, every_layer("bs"), example_inputs=torch.randn(16, 3, 10, 10))
    assert set(_runs(fxbns.report(t)).values()) == {"sampled"}
    t[3] = nn.BatchNorm2d(8)  # the user put a plain BatchNorm back
    t[1].estimator = BatchSampling(ratio=0.5)  # and changed a site's estimator
    rows = {r["name"]: r for r in fxbns.report(t).rows}
    assert rows["3"]["runs"] == "exact" and rows["3"]["module_type"] == "BatchNorm2d"
    assert "replaced after transform" in rows["3"]["why"]
    assert rows["1"]["estimator"] == "bs(ratio=0.5)" and rows["1"]["sample"] == 8 * 8 * 8


def test_table_fits_100_columns_and_prints_a_shared_spec_once():
    m = torchvision.models.mobilenet_v2(num_classes=10)
    pol = Policy.from_preset("fs").set_module_name("features.0.1", BatchSampling()).set_micro_batch(MicroBatch())
    for p in ("fs", pol):
        text = str(fxbns.report(fxbns.transform(m, p, example_inputs=torch.randn(2, 3, 224, 224))))
        assert max(map(len, text.splitlines())) <= 100, text
    one = str(fxbns.explain(m, "fs", torch.randn(2, 3, 224, 224)))
    spec = Policy.from_preset("fs").default.describe()
    assert one.count(spec) == 1  # the legend, not every row
    two = str(fxbns.explain(m, pol, torch.randn(2, 3, 224, 224)))
    assert "est A: " in two and "est B: " in two and two.count(spec) == 1


def test_to_dict_rows_and_cli_report_json(tmp_path):
    t = fxbns.transform(torchvision.models.resnet18(num_classes=10), "fs",
                        example_inputs=torch.randn(64, 3, 64, 64))
    d = fxbns.report(t).to_dict()
    keys = {"name", "runs", "why", "via", "estimator", "active", "shape", "reason", "exact_below_batch", "sample"}
    assert all(keys <= set(r) for r in d["sites"])
    assert {r["runs"] for r in d["sites"]} == {"sampled", "exact"}
    assert d["summary"]["sampled"] == sum(r["runs"] == "sampled" for r in d["sites"]) == 10
    assert all(isinstance(t.get_submodule(r["name"]), SampledBatchNorm) for r in d["sites"])
    from fxbns.cli import main

    assert main(["--input-shape", "64,3,64,64", "--explain", "--report", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())
    assert rep["summary"]["sampled"] == 10 and rep["sites"][0]["runs"] == "sampled"


def test_explain_matches_transform():
    m = torchvision.models.resnet18(num_classes=10)
    x = torch.randn(32, 3, 64, 64)
    a = fxbns.explain(m, "bs", x)
    b = fxbns.report(fxbns.transform(m, "bs", example_inputs=x))
    assert [(r["name"], r["runs"], r["why"]) for r in a.rows] == [(r["name"], r["runs"], r["why"]) for r in b.rows]
    assert a.mode == b.mode == "swap"


def test_report_says_where_sample_backward_is_off():
    """The report names why a site with sample_backward runs the exact-gradient backward: BS samples never
    qualify; an FS sample under 1/4 of the layer does not; a 1/4 band of 1024+ values does (no note)."""
    from fxbns import FeatureSampling

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))
    x = torch.randn(16, 3, 32, 32)
    notes = {}
    for name, spec in [("bs", BatchSampling(ratio=0.5, sample_backward=True)),
                       ("fs16", FeatureSampling(area_ratio=1 / 16, layout="band", sample_backward=True)),
                       ("fs4", FeatureSampling(area_ratio=1 / 4, layout="band", sample_backward=True))]:
        row = fxbns.explain(m, Policy(spec), example_inputs=x).rows[0]
        notes[name] = row["reason"]
    assert "sample_backward off here: BS's whole samples" in notes["bs"]
    assert "sample_backward off here" in notes["fs16"] and "under 0.25 of the layer" in notes["fs16"]
    assert "sample_backward off" not in notes["fs4"]


def test_printed_model_names_each_sites_estimator():
    """``print(model)`` shows what each rewritten layer estimates with, the micro-batch fallback included, for module
    sites (SampledBatchNorm) and functional ones (FunctionalBatchNorm)."""
    m = fxbns.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), Policy.from_preset("micro"))
    text = repr(m)
    spec = m[1].estimator.describe()
    assert "SampledBatchNorm(4, eps=1e-05, momentum=0.1, affine=True" in text
    assert f"estimator={spec}, micro(<= 4: {m[1].micro.estimator.describe()})" in text
    assert spec.startswith("fs(band") and "vdn(n=4" in text

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("rm", torch.zeros(4))
            self.register_buffer("rv", torch.ones(4))

        def forward(self, x):
            return torch.nn.functional.batch_norm(x, self.rm, self.rv, training=self.training)

    f = fxbns.transform(Functional(), Policy(BatchSampling(ratio=0.5)))
    assert "FunctionalBatchNorm(estimator=bs(" in repr(f)
