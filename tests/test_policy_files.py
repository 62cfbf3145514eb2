"""Policies do what they say: presets by name inside policy files, regexes that match nothing, models without
BatchNorm."""

import json
import warnings

import pytest
import torch
import torchvision
import yaml
from torch import nn

import fxbns
from fxbns import BatchSampling, Exact, FeatureSampling, MicroBatch, Policy, VirtualDataset


def test_preset_for_any_spec_in_a_yaml_file(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("default: {preset: fs}\n"
                 "module_name_regex:\n  - ['layer4\\..*', {preset: bs, min_elements: 0}]\n"
                 "module_name:\n  bn1: {preset: vdn}\n"
                 "micro_batch: {preset: micro, threshold: 2}\n")
    pol = Policy.load(p)
    assert pol.default == Policy.from_preset("fs").default  # band, per sample, 2**19: not the class defaults
    assert pol.default != FeatureSampling()
    assert pol.name_regexes == [(r"layer4\..*", BatchSampling(ratio=0.125, min_samples=2, min_elements=0))]
    assert pol.names["bn1"] == Policy.from_preset("vdn").default
    assert pol.micro == MicroBatch(threshold=2)
    rows = {r["name"]: r["estimator"] for r in fxbns.explain(torchvision.models.resnet18(num_classes=3), str(p))}
    assert rows["layer1.0.bn1"] == Policy.from_preset("fs").default.describe()
    assert rows["layer4.0.bn1"] == "bs(ratio=0.125)" and rows["bn1"].startswith("vdn(n=4, mix=0.5")


def test_kind_gives_the_class_defaults_and_the_docs_say_both():
    pol = Policy.from_dict({"default": {"kind": "fs"}})
    assert pol.default == FeatureSampling() and pol.default.min_elements == 0 and pol.default.layout == "patch"
    doc = fxbns.policy.__doc__
    assert "default: {preset: fs}" in doc and "{kind: fs}" in doc  # documented, with the defaults of both


def test_top_level_preset_is_the_starting_point():
    pol = Policy.from_dict({"preset": "micro", "module_name": {"bn1": {"kind": "exact"}}})
    assert pol.micro == Policy.from_preset("micro").micro and pol.default == Policy.from_preset("micro").default
    assert pol.names == {"bn1": Exact()}
    off = Policy.from_dict({"preset": "micro", "micro_batch": None})
    assert off.micro is None
    # a saved policy made from a preset reads back as it was, also with the preset's regime turned off
    p = Policy.from_preset("micro").set_micro_batch(None)
    assert Policy.from_dict(json.loads(json.dumps(p.to_dict()))).micro is None
    q = Policy.from_preset("vdn").set_seed(4)
    assert Policy.from_dict(yaml.safe_load(yaml.safe_dump(q.to_dict()))).to_dict() == q.to_dict()


@pytest.mark.parametrize("entry, needle", [
    ({"default": {"preset": "fss"}}, "unknown preset 'fss' .*did you mean fs"),
    ({"default": {"preset": "fs", "kind": "bs"}}, "not both"),
    ({"default": {"preset": "fs", "ratio": 0.5}}, "FeatureSampling .*has no field 'ratio'"),
    ({"default": {"preset": "bs", "ratio": 7}}, "ratio must be"),
    ({"micro_batch": {"preset": "fs"}}, "no micro-batch regime"),
    ({"module_name": {"bn1": {"preset": "exact", "ratio": 1}}}, "no fields to change"),
])
def test_bad_preset_entries_say_what_is_wrong(entry, needle):
    with pytest.raises(ValueError, match=needle):
        Policy.from_dict(entry)


def test_regex_matching_no_site_lists_the_closest_names():
    m = torchvision.models.resnet18(num_classes=3)
    with pytest.raises(ValueError, match=r"'layer5\\..\*' matches no BatchNorm site.*closest BatchNorm names: layer4"):
        fxbns.transform(m, Policy.from_preset("fs").set_module_name_regex(r"layer5\..*", BatchSampling()))
    with pytest.raises(ValueError, match="whole qualified name"):
        fxbns.explain(m, Policy.from_preset("fs").set_module_name_regex("bn", BatchSampling()))  # a partial match
    fxbns.explain(m, Policy.from_preset("fs").set_module_name_regex(r".*bn1", BatchSampling()))  # matches: fine


def test_model_without_batchnorm_warns():
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Linear(6, 2))
    with pytest.warns(UserWarning, match="Sequential has no BatchNorm.*nothing was rewritten"):
        t = fxbns.transform(m, "fs")
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(t(x), m(x)) and len(fxbns.report(t)) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fxbns.transform(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), "fs")  # a BatchNorm: silent


def test_spec_objects_and_presets_stay_consistent():
    assert Policy.from_dict({"default": {"preset": "vdn"}}).default == VirtualDataset(
        num_samples=4, mix=0.5, real=FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True))
