"""Policy rules and estimator arithmetic, checked value by value.  Fast (no model runs): the mutation run's tests
for fxbns/policy.py and fxbns/estimators.py (docs/testing.md)."""

import json
import os

import pytest
import yaml
from torch import nn

from fxbns import PRESETS, BatchSampling, Exact, FeatureSampling, MicroBatch, Policy, VirtualDataset
from fxbns.estimators import layer_size, spec_from_dict, spec_to_dict
from fxbns.ops.dispatch import speed_rule
from fxbns.policy import resolve_policy

BS, FS, VDN = BatchSampling(ratio=0.5), FeatureSampling(patch=(2, 2)), VirtualDataset(num_samples=2)


class MyBN(nn.BatchNorm2d):
    pass


# -- priority: default < conv pairs < module type < name regex (first match) < exact name < callable ---------------
def test_each_rule_outranks_the_ones_below():
    p = Policy(BS)
    bn = nn.BatchNorm2d(4)
    assert p.spec_for("a", bn, "conv") == BS and p.spec_for("a", None) == BS
    p.set_conv_bn(FS)
    assert p.spec_for("a", bn, "conv") == FS and p.spec_for("a", bn, "linear") == BS and p.spec_for("a", bn) == BS
    p.set_object_type(nn.BatchNorm2d, VDN)
    assert p.spec_for("a", bn, "conv") == VDN and p.spec_for("a", nn.BatchNorm1d(4), "conv") == FS
    assert p.spec_for("a", None, "conv") == FS  # no module: no type rule
    p.set_module_name_regex(r"layer\d", BatchSampling(ratio=0.25))
    assert p.spec_for("layer1", bn).ratio == 0.25
    assert p.spec_for("layer1.bn", bn) == VDN  # a full match, not a prefix
    assert p.spec_for("xlayer1", bn) == VDN  # nor a search
    p.set_module_name("layer1", Exact())
    assert p.spec_for("layer1", bn) is None  # Exact() means leave it as BatchNorm: None
    p.set_callable(lambda name, mod, site: FS if name == "layer1" else ...)
    assert p.spec_for("layer1", bn) == FS and p.spec_for("layer2", bn).ratio == 0.25  # Ellipsis defers
    p.set_callable(None)
    assert p.spec_for("layer1", bn) is None


def test_callable_receives_name_module_and_site():
    seen = []
    p = Policy(BS).set_callable(lambda *a: seen.append(a) or ...)
    bn = nn.BatchNorm2d(2)
    p.spec_for("x.bn", bn, "conv", "SITE")
    assert seen == [("x.bn", bn, "SITE")]


def test_exact_type_rule_beats_a_subclass_rule_and_isinstance_is_the_fallback():
    p = Policy(BS).set_object_type(nn.BatchNorm2d, FS).set_object_type(MyBN, VDN)
    assert p.spec_for("a", MyBN(2)) == VDN and p.spec_for("a", nn.BatchNorm2d(2)) == FS
    q = Policy(BS).set_object_type(nn.BatchNorm2d, FS)
    assert q.spec_for("a", MyBN(2)) == FS  # no rule for the subclass itself: the base class's
    assert q.spec_for("a", nn.BatchNorm1d(2)) == BS
    r = Policy(BS).set_object_type(nn.modules.batchnorm._BatchNorm, FS).set_object_type(nn.BatchNorm2d, VDN)
    assert r.spec_for("a", nn.BatchNorm2d(2)) == VDN and r.spec_for("a", nn.BatchNorm1d(2)) == FS
    # setting a type again replaces its rule, it does not add a second one
    q.set_object_type(nn.BatchNorm2d, VDN)
    assert q.object_types == [(nn.BatchNorm2d, VDN)]
    with pytest.raises(TypeError, match="set_object_type takes a class such as nn.BatchNorm2d"):
        q.set_object_type(nn.BatchNorm2d(2), FS)


def test_first_matching_regex_wins_and_bad_regex_is_refused():
    p = Policy(BS).set_module_name_regex(r"a\..*", FS).set_module_name_regex(r"a\.b", VDN)
    assert p.spec_for("a.b", None) == FS and p.name_regexes == [(r"a\..*", FS), (r"a\.b", VDN)]
    with pytest.raises(Exception, match="unterminated|missing"):
        Policy().set_module_name_regex("a(", FS)


def test_setters_chain_and_validate():
    p = Policy()
    assert p.set_global(BS) is p and p.set_conv_bn(FS) is p and p.set_seed(3) is p and p.set_input("img") is p
    assert p.set_micro_batch(MicroBatch()) is p and p.set_callable(None) is p
    assert p.default == BS and p.seed == 3 and p.input_name == "img" and p.micro == MicroBatch()
    with pytest.raises(TypeError, match="set_micro_batch takes a MicroBatch or None"):
        p.set_micro_batch(VDN)
    assert p.set_micro_batch(None).micro is None
    with pytest.raises(TypeError, match="on must be True or False, got 1"):
        p.set_sample_backward(1)
    with pytest.raises(ValueError, match="min_elements must be None .* or an integer >= 0"):
        p.set_min_elements(-1)
    with pytest.raises(ValueError, match="min_elements"):
        p.set_min_elements(True)
    assert Policy().default == FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True,
                                               min_elements=None)
    assert Policy(seed="4").seed == 4 and Policy().micro is None and Policy().input_name is None


def test_set_min_elements_and_sample_backward_reach_every_bs_and_fs_spec():
    p = (Policy(BS).set_conv_bn(FS).set_object_type(nn.BatchNorm1d, FS).set_module_name_regex("r", BS)
         .set_module_name("n", FS).set_module_name("v", VDN).set_module_name("e", None))
    p.set_min_elements(77).set_sample_backward(True)
    sampling = [s for s in p.specs() if isinstance(s, (BatchSampling, FeatureSampling))]
    assert len(sampling) == 5 and all(s.min_elements == 77 and s.sample_backward for s in sampling)
    assert p.names["v"] == VDN and p.names["e"] is None  # other specs untouched
    assert p.specs() == [p.default, p.conv_bn, p.object_types[0][1], p.name_regexes[0][1], p.names["n"], VDN, None]
    p.set_sample_backward(False)
    assert not any(s.sample_backward for s in p.specs() if isinstance(s, (BatchSampling, FeatureSampling)))
    assert Policy(BS).set_min_elements(5).specs() == [BatchSampling(ratio=0.5, min_elements=5)]  # no conv rule set


def test_uses_virtual():
    assert not Policy(BS).uses_virtual()
    assert Policy(VDN).uses_virtual() and Policy(BS).set_module_name("x", VDN).uses_virtual()
    assert Policy(BS, micro=MicroBatch()).uses_virtual()
    assert Policy.from_preset("micro").uses_virtual() and not Policy.from_preset("fs").uses_virtual()


def test_validate_names():
    p = Policy().set_module_name("layer1.0.bnl", None)
    with pytest.raises(ValueError, match=r"'layer1.0.bnl', which is not in the model; closest BatchNorm names: "
                                         r"layer1.0.bn1"):
        p.validate_names(["layer1.0.bn1", "layer2.0.bn1"], ["layer1.0.bn1", "layer2.0.bn1"])
    with pytest.raises(ValueError, match=r"'conv', which is not a BatchNorm in this model; its BatchNorms are e.g. "
                                         r"bn_a, bn_b$"):
        Policy().set_module_name("conv", None).validate_names(["bn_a", "bn_b"], ["conv", "bn_a", "bn_b"])
    Policy().set_module_name("bn_a", None).validate_names(["bn_a"], ["bn_a"])  # a known name passes


# -- persistence ---------------------------------------------------------------------------------------------------
def test_to_dict_from_dict_every_key():
    p = (Policy(BS, seed=5, input_name="img").set_conv_bn(None).set_object_type(nn.BatchNorm1d, FS)
         .set_module_name_regex("r.*", VDN).set_module_name("n", Exact()).set_micro_batch(MicroBatch(threshold=3)))
    d = p.to_dict()
    assert d == {"default": spec_to_dict(BS), "conv_bn": None, "object_type": [["BatchNorm1d", spec_to_dict(FS)]],
                 "module_name_regex": [["r.*", spec_to_dict(VDN)]], "module_name": {"n": {"kind": "exact"}},
                 "micro_batch": spec_to_dict(MicroBatch(threshold=3)), "seed": 5, "input": "img"}
    q = Policy.from_dict(json.loads(json.dumps(d)))
    assert q.to_dict() == d and q.conv_bn is None and q.object_types == [(nn.BatchNorm1d, FS)]
    assert q.micro == MicroBatch(threshold=3) and q.seed == 5 and q.input_name == "img"
    assert Policy.from_dict({}).to_dict() == Policy().to_dict() == {"default": spec_to_dict(Policy().default),
                                                                  "seed": 0}
    assert Policy.from_dict({"micro_batch": None}).micro is None


def test_from_dict_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="a policy must be a mapping; got list"):
        Policy.from_dict([])
    with pytest.raises(ValueError, match=r"unknown policy keys \['defaults'\]; allowed: \['conv_bn'"):
        Policy.from_dict({"defaults": None})
    with pytest.raises(ValueError, match=r"unknown object_type 'BatchNorm4d'; use one of \['BatchNorm1d', "
                                         r"'BatchNorm2d', 'BatchNorm3d', 'SyncBatchNorm'\]"):
        Policy.from_dict({"object_type": [["BatchNorm4d", None]]})
    for name, cls in (("BatchNorm1d", nn.BatchNorm1d), ("BatchNorm2d", nn.BatchNorm2d),
                      ("BatchNorm3d", nn.BatchNorm3d)):
        assert Policy.from_dict({"object_type": [[name, None]]}).object_types == [(cls, None)]


def test_a_callable_cannot_be_saved_but_prints():
    p = Policy(BS).set_callable(lambda *a: ...)
    with pytest.raises(ValueError, match="set_callable.*cannot be saved.*set_module_name"):
        p.to_dict()
    assert repr(p).startswith("Policy(default=BatchSampling(ratio=0.5") and "callable=<function" in repr(p)
    assert repr(Policy(BS)) == f"Policy({Policy(BS).to_dict()})"


@pytest.mark.parametrize("ext", ["json", "yaml", "yml"])
def test_save_load_files(tmp_path, ext):
    p = Policy.from_preset("vdn").set_module_name("a", None).set_seed(2)
    path = tmp_path / f"p.{ext}"
    p.save(path)
    text = path.read_text()
    assert (json.loads(text) if ext == "json" else yaml.safe_load(text)) == p.to_dict()
    assert text.startswith("{") == (ext == "json") and text.endswith("\n")
    assert Policy.load(path).to_dict() == p.to_dict() == resolve_policy(str(path)).to_dict()
    path.write_text("default: [unclosed" if ext != "json" else "{")
    with pytest.raises(ValueError, match=f"is not valid {'JSON' if ext == 'json' else 'YAML'}"):
        Policy.load(path)
    with pytest.raises(ValueError, match="cannot read policy file .*missing.json.*No such file"):
        Policy.load(tmp_path / "missing.json")


def test_presets():
    assert list(PRESETS) == ["exact", "bs", "fs", "vdn", "micro"]
    assert Policy.from_preset("exact").default == Exact()
    assert Policy.from_preset("bs").default == BatchSampling(ratio=0.125, min_samples=2, min_elements=None)
    assert speed_rule("cpu").min_elements("bs") == 2 ** 18 and speed_rule("cpu").min_elements("fs") == 2 ** 19
    fs = Policy.from_preset("fs").default
    assert fs == FeatureSampling(area_ratio=1 / 16, layout="band", per_sample=True, min_elements=None)
    vdn = Policy.from_preset("vdn").default
    assert vdn == VirtualDataset(num_samples=4, mix=0.5, real=FeatureSampling(area_ratio=1 / 16, layout="band",
                                                                              per_sample=True))
    micro = Policy.from_preset("micro")
    assert micro.default == fs and micro.micro == MicroBatch(threshold=4)
    for name in PRESETS:
        p = Policy.from_preset(name)
        assert p.preset == name and p.to_dict()["preset"] == name and Policy.from_dict(p.to_dict()).preset == name
        assert p.conv_bn is not None and not p.names and p.seed == 0
    with pytest.raises(ValueError, match=r"unknown preset 'bss' \(did you mean bs"):
        Policy.from_preset("bss")
    with pytest.raises(ValueError, match=r"unknown preset 'zzzzzz'; presets: exact, bs, fs, vdn, micro$"):
        Policy.from_preset("zzzzzz")
    assert Policy.from_preset("bs") is not Policy.from_preset("bs")  # a fresh policy each time


def test_resolve_policy_forms(tmp_path, monkeypatch):
    p = Policy(BS)
    assert resolve_policy(p) is p
    assert resolve_policy(None).default == Exact()
    for spec in (Exact(), BS, FS, VDN):
        assert resolve_policy(spec).default == spec
    assert resolve_policy({"default": spec_to_dict(FS)}).default == FS
    assert resolve_policy("bs").preset == "bs"
    Policy(FS).save(tmp_path / "p.json")
    assert resolve_policy(tmp_path / "p.json").default == FS  # a PathLike
    monkeypatch.chdir(tmp_path)
    os.rename("p.json", "policyfile")
    assert resolve_policy("policyfile").default == FS  # an existing file without an extension
    with pytest.raises(ValueError, match="policy file 'gone.yaml' does not exist"):
        resolve_policy("gone.yaml")
    with pytest.raises(ValueError, match=f"policy file 'no{os.sep}file' does not exist"):
        resolve_policy(f"no{os.sep}file")
    with pytest.raises(ValueError, match="unknown preset 'fastest'"):
        resolve_policy("fastest")
    with pytest.raises(TypeError, match=r"policy must be a Policy, a preset name \(exact, bs, fs, vdn, micro\).*got int"):
        resolve_policy(3)
    with pytest.raises(TypeError, match="got MicroBatch"):
        resolve_policy(MicroBatch())


# -- estimator arithmetic ------------------------------------------------------------------------------------------
def test_layer_size():
    assert speed_rule("cpu").map_floor == 16
    assert layer_size((4, 3)) == 12 and layer_size((4,)) == 4  # no map: one element per plane
    assert layer_size((4, 3, 1, 1)) == 12  # a 1x1 map counts as 1
    assert layer_size((4, 3, 1, 2)) == 4 * 3 * 16 and layer_size((4, 3, 3, 5)) == 4 * 3 * 16  # 2..15 count as 16
    assert layer_size((4, 3, 4, 4)) == 4 * 3 * 16 and layer_size((4, 3, 17)) == 4 * 3 * 17
    assert layer_size((2, 3, 4, 5, 6)) == 2 * 3 * 120


def test_min_elements_boundaries():
    bs = BatchSampling(min_elements=100)
    assert bs.exact_at((1, 99)) and not bs.exact_at((1, 100)) and not bs.exact_at((2, 100))
    assert not BatchSampling(min_elements=0).exact_at((1, 1))
    assert bs.exact_below_batch((7, 10)) == 10 and bs.exact_below_batch((7, 11)) == 10  # ceil(100 / 11)
    assert bs.exact_below_batch((7, 3, 4, 4)) == 3  # per row 3 * 16 = 48: ceil(100 / 48)
    assert BatchSampling().exact_below_batch((7, 3)) == 0
    fs = FeatureSampling(min_elements=48)
    assert fs.exact_at((1, 3, 2, 2)) is False and fs.exact_at((1, 2, 2, 2)) is True
    assert fs.exact_below_batch((5, 1, 8, 8)) == 1


def test_bs_sample_count_rounding():
    assert BatchSampling(ratio=0.25, min_samples=1).sample_count(8) == 2  # exactly 2: not rounded up to 3
    assert BatchSampling(ratio=0.25, min_samples=1).sample_count(9) == 3  # ceil(2.25)
    assert BatchSampling(ratio=0.1, min_samples=1).sample_count(30) == 3  # 0.1 * 30 = 3.0000000000000004
    assert BatchSampling(ratio=1.0, min_samples=1).sample_count(5) == 5
    assert BatchSampling(ratio=0.01, min_samples=3).sample_count(10) == 3
    assert BatchSampling(ratio=0.5, min_samples=3).sample_count(3) == 3 and BatchSampling(min_samples=3).sample_count(4) == 3


def test_fs_points_and_band_length():
    assert FeatureSampling(area_ratio=0.25).points((8, 8)) == (4, 4)
    assert FeatureSampling(area_ratio=0.25).points((7, 9)) == (4, 5)  # ceil(3.5), ceil(4.5)
    assert FeatureSampling(area_ratio=0.125).points((8, 8, 8)) == (4, 4, 4)  # the cube root per dim
    assert FeatureSampling(area_ratio=0.01).points((3, 3)) == (1, 1)  # at least one point
    assert FeatureSampling(area_ratio=1.0).points((5, 6)) == (5, 6)
    assert FeatureSampling(area_ratio=0.25).points((16,)) == (4,)
    assert FeatureSampling(patch=(3,)).points((8, 8)) == (3, 3) and FeatureSampling(patch=(3,)).points((8,)) == (3,)
    assert FeatureSampling(patch=(2, 9)).points((4, 4)) == (2, 4)
    assert FeatureSampling(patch=5).patch == (5,)
    assert FeatureSampling(area_ratio=0.25).band_length((8, 8)) == 16
    assert FeatureSampling(area_ratio=0.1).band_length((5, 5)) == 3  # ceil(2.5)
    assert FeatureSampling(area_ratio=0.1).band_length((2, 5)) == 1  # exactly 1.0: not 2
    assert FeatureSampling(area_ratio=0.001).band_length((4, 4)) == 1
    assert FeatureSampling(patch=(2, 3)).band_length((8, 8)) == 6 and FeatureSampling(patch=(9, 9)).band_length((4, 4)) == 16


def test_describe():
    assert Exact().describe() == "exact"
    assert BatchSampling().describe() == "bs(ratio=0.125)"
    assert BatchSampling(ratio=0.5, sample_backward=True, min_elements=9).describe() == \
        "bs(ratio=0.5, sample_backward, exact below 9)"
    assert FeatureSampling().describe() == "fs(patch, area=0.0625)"
    assert FeatureSampling(patch=(2, 3), layout="grid", per_sample=True, sample_backward=True,
                           min_elements=4).describe() == "fs(grid, patch=(2, 3), per_sample, sample_backward, exact below 4)"
    assert VirtualDataset().describe() == "vdn(n=4)"
    assert VirtualDataset(num_samples=2, mix=0.5).describe() == "vdn(n=2, mix=0.5 with all real)"
    assert VirtualDataset(mix=0.25, real=BatchSampling()).describe() == "vdn(n=4, mix=0.25 with bs(ratio=0.125))"


def test_defaults():
    assert BatchSampling() == BatchSampling(ratio=0.125, min_samples=2, sample_backward=False, draw="block",
                                            min_elements=0)
    assert FeatureSampling() == FeatureSampling(area_ratio=1 / 16, layout="patch", per_sample=False)
    assert FeatureSampling().patch is None and FeatureSampling(patch=(2, 2)).area_ratio is None
    assert VirtualDataset() == VirtualDataset(num_samples=4, mix=1.0, distribution="normal", seed=0, real=None)
    assert MicroBatch() == MicroBatch(threshold=4, estimator=VirtualDataset(num_samples=4, mix=0.5))
    assert [s.kind for s in (Exact(), BS, FS, VDN)] == ["exact", "bs", "fs", "vdn"]


@pytest.mark.parametrize("make, message", [
    (lambda: BatchSampling(ratio=-0.1), "BatchSampling.ratio must be a number in (0, 1]; got -0.1"),
    (lambda: BatchSampling(min_samples=True), "BatchSampling.min_samples must be an integer >= 1; got True"),
    (lambda: BatchSampling(min_samples=1.5), "min_samples"),
    (lambda: BatchSampling(min_elements=2.0), "BatchSampling.min_elements must be None (the device's speed rule) or "
                                              "an integer >= 0 (0: sample every layer); got 2.0"),
    (lambda: FeatureSampling(patch=()), "FeatureSampling.patch must be a tuple of positive integers"),
    (lambda: FeatureSampling(patch=(2, True)), "patch"),
    (lambda: FeatureSampling(patch=(2.0, 2)), "patch"),
    (lambda: FeatureSampling(area_ratio=0), "FeatureSampling.area_ratio must be a number in (0, 1]; got 0"),
    (lambda: FeatureSampling(area_ratio="0.5"), "area_ratio"),
    (lambda: FeatureSampling(per_sample=1), "FeatureSampling.per_sample must be True or False; got 1"),
    (lambda: FeatureSampling(sample_backward=None), "sample_backward"),
    (lambda: FeatureSampling(min_elements=-1), "FeatureSampling.min_elements"),
    (lambda: VirtualDataset(num_samples=4097), "VirtualDataset.num_samples must be an integer in [1, 4096]; got 4097"),
    (lambda: VirtualDataset(num_samples=True), "num_samples"),
    (lambda: VirtualDataset(mix=1.01), "VirtualDataset.mix must be a number in (0, 1]; got 1.01"),
    (lambda: VirtualDataset(mix="1"), "mix"),
    (lambda: VirtualDataset(seed=False), "VirtualDataset.seed must be an integer; got False"),
    (lambda: VirtualDataset(seed=1.0), "seed"),
    (lambda: VirtualDataset(real=Exact()), "VirtualDataset.real must be None, BatchSampling or FeatureSampling"),
    (lambda: MicroBatch(threshold=True), "MicroBatch.threshold must be an integer >= 1; got True"),
    (lambda: MicroBatch(estimator=None), "MicroBatch.estimator must be a VirtualDataset; got None"),
])
def test_validation_messages(make, message):
    with pytest.raises(ValueError) as e:
        make()
    assert message in str(e.value)


def test_boundaries_that_are_allowed():
    assert BatchSampling(ratio=1).ratio == 1 and BatchSampling(min_samples=1).min_samples == 1
    assert FeatureSampling(area_ratio=1).area_ratio == 1 and FeatureSampling(patch=(1, 1)).patch == (1, 1)
    assert VirtualDataset(num_samples=1).num_samples == 1 and VirtualDataset(num_samples=4096).num_samples == 4096
    assert VirtualDataset(mix=1).mix == 1 and VirtualDataset(seed=-3).seed == -3
    assert VirtualDataset(distribution="data").distribution == "data"
    assert MicroBatch(threshold=1).threshold == 1
    assert FeatureSampling(layout="band").layout == "band" and BatchSampling(draw="random").draw == "random"


def test_spec_dicts():
    assert spec_to_dict(None) is None and spec_from_dict(None) is None
    assert spec_to_dict(FS) == {"kind": "fs", "patch": [2, 2], "area_ratio": None, "layout": "patch",
                                "per_sample": False, "sample_backward": False, "min_elements": 0}
    v = VirtualDataset(mix=0.5, real=FS)
    assert spec_to_dict(v)["real"] == spec_to_dict(FS)
    assert spec_to_dict(MicroBatch())["kind"] == "micro"
    assert spec_to_dict(MicroBatch())["estimator"] == spec_to_dict(VirtualDataset(num_samples=4, mix=0.5))
    assert spec_from_dict(json.loads(json.dumps(spec_to_dict(MicroBatch(estimator=v))))) == MicroBatch(estimator=v)
    with pytest.raises(ValueError, match=r"a mapping with a 'kind' key \(one of \['bs', 'exact', 'fs', 'micro', "
                                         r"'vdn'\]\); got \{'ratio': 1\}"):
        spec_from_dict({"ratio": 1})
    with pytest.raises(ValueError, match="'kind' key"):
        spec_from_dict(["bs"])
    with pytest.raises(ValueError, match=r"unknown estimator kind 'bn'; use one of \['bs'"):
        spec_from_dict({"kind": "bn"})
    with pytest.raises(ValueError, match="bad fields for estimator 'fs'"):
        spec_from_dict({"kind": "fs", "size": 3})


@pytest.mark.parametrize("make, message", [
    (lambda: BatchSampling(sample_backward=1), "BatchSampling.sample_backward must be True or False; got 1"),
    (lambda: BatchSampling(draw="x"), "BatchSampling.draw must be 'block' or 'random'; got 'x'"),
    (lambda: FeatureSampling(patch=(0,)), "FeatureSampling.patch must be a tuple of positive integers, e.g. (4, 4); "
                                          "got (0,)"),
    (lambda: FeatureSampling(patch=(2, 2), area_ratio=0.5),
     "FeatureSampling.area_ratio must be None when patch is given (give one of the two); got 0.5"),
    (lambda: FeatureSampling(layout="x"), "FeatureSampling.layout must be 'patch', 'grid' or 'band'; got 'x'"),
    (lambda: FeatureSampling(sample_backward=2), "FeatureSampling.sample_backward must be True or False; got 2"),
    (lambda: VirtualDataset(distribution="u"), "VirtualDataset.distribution must be 'normal' or 'data'; got 'u'"),
    (lambda: VirtualDataset(real=Exact()), "VirtualDataset.real must be None, BatchSampling or FeatureSampling; "
                                           "got Exact()"),
    (lambda: MicroBatch(estimator=BatchSampling()), "MicroBatch.estimator must be a VirtualDataset; got BatchSampling("),
    (lambda: Policy().set_min_elements(-2), "Policy.min_elements must be None (the device's speed rule) or an integer "
                                            ">= 0 (0: sample every layer); got -2"),
    (lambda: Policy(BS).set_callable(lambda *a: ...).to_dict(),
     "a Policy with a callable (set_callable) cannot be saved as a dict; express it with set_module_name / "
     "set_module_name_regex instead"),
])
def test_whole_messages(make, message):
    """Each refusal names the class, the field, what is allowed and the value given, word for word."""
    with pytest.raises(ValueError) as e:
        make()
    assert str(e.value).startswith(message)


def test_conv_bn_spec_round_trips_and_files_are_readable(tmp_path):
    p = Policy(BS).set_conv_bn(FS)
    assert p.to_dict()["conv_bn"] == spec_to_dict(FS) and Policy.from_dict(p.to_dict()).conv_bn == FS
    p.save(tmp_path / "p.json")
    assert (tmp_path / "p.json").read_text().startswith('{\n  "default": {\n    "kind": "bs"')  # indent 2
    p.save(tmp_path / "p.yaml")
    assert (tmp_path / "p.yaml").read_text().startswith("default:\n  kind: bs\n")  # the policy's order, not sorted


def test_close_name_suggestions_list_up_to_five():
    names = [f"layer{i}.bn" for i in range(1, 8)]
    with pytest.raises(ValueError) as e:
        Policy().set_module_name("layerX.bn", None).validate_names(names, names)
    assert str(e.value).count("layer") == 1 + 5  # the name asked for, then five suggestions
    with pytest.raises(ValueError, match=r"closest BatchNorm names: abcdefgh$"):  # a loose match (cutoff 0.4)
        Policy().set_module_name("abcdxyzw", None).validate_names(["abcdefgh"], ["abcdefgh"])
    with pytest.raises(ValueError, match=r"\(did you mean fs, bs\?\)"):
        Policy.from_preset("fbs")


def test_an_unset_conv_rule_prints_as_unset():
    assert repr(Policy().conv_bn) == "<unset>" and "conv_bn" not in Policy().to_dict()


def test_set_sample_backward_turns_it_on_by_default():
    assert Policy(BS).set_sample_backward().default.sample_backward is True


# -- policy-file entries by preset name, sync, and regex hints: each value checked -----------------------------------
def test_preset_entries_by_name():
    # {preset: name}: that preset's own estimator (not the class default), also for conv_bn and micro_batch
    p = Policy.from_dict({"conv_bn": {"preset": "bs"}, "micro_batch": {"preset": "micro"}})
    assert p.conv_bn == Policy.from_preset("bs").default and p.micro == Policy.from_preset("micro").micro
    # a field to change merges into the preset's estimator: every other field stays the preset's
    q = Policy.from_dict({"default": {"preset": "bs", "ratio": 0.25}})
    base = Policy.from_preset("bs").default
    assert spec_to_dict(q.default) == {**spec_to_dict(base), "ratio": 0.25}
    # a micro-batch entry naming a preset with a regime, and one naming a preset without one
    assert Policy.from_dict({"micro_batch": {"preset": "micro", "threshold": 3}}).micro.threshold == 3
    with pytest.raises(ValueError, match=r"^policy micro_batch: preset 'fs' has no micro-batch regime; "):
        Policy.from_dict({"micro_batch": {"preset": "fs"}})
    # a default entry naming the micro preset takes its default estimator: a micro regime is not a default
    assert Policy.from_dict({"default": {"preset": "micro"}}).default == Policy.from_preset("micro").default
    with pytest.raises(ValueError, match=r"^policy conv_bn: unknown preset 'bss' \(did you mean bs"):
        Policy.from_dict({"conv_bn": {"preset": "bss"}})


def test_unknown_preset_hints_list_at_most_three_presets():
    with pytest.raises(ValueError) as e:
        Policy.from_dict({"default": {"preset": "s"}})  # close to several one- and two-letter presets
    assert "(did you mean " in str(e.value)
    hint = str(e.value).split("(did you mean ")[1].split("?)")[0]
    assert 1 <= len(hint.split(", ")) <= 3
    with pytest.raises(ValueError, match=r"unknown preset 'vdm' \(did you mean vdn\?\); presets: "):
        Policy.from_dict({"default": {"preset": "vdm"}})  # matched against the preset names only


def test_a_top_level_preset_keeps_its_seed_unless_given():
    preset_seed = Policy.from_preset("vdn").seed
    assert Policy.from_dict({"preset": "vdn"}).seed == preset_seed
    assert Policy.from_dict({"preset": "vdn", "seed": preset_seed + 3}).seed == preset_seed + 3
    assert Policy.from_dict({"preset": "vdn", "input": "img"}).input_name == "img"


def test_sync_round_trips_with_its_regex():
    p = Policy(BS).set_sync(module_name_regex=r"layer\d.*")
    d = p.to_dict()
    assert d["sync"] == {"process_group": None, "module_name_regex": r"layer\d.*"}
    q = Policy.from_dict(json.loads(json.dumps(d)))
    assert q.sync is True and q.sync_regex == r"layer\d.*" and q.sync_for("layer1.bn") and not q.sync_for("bn1")
    assert Policy(BS).set_sync().to_dict()["sync"] == {"process_group": None}
    r = Policy.from_dict({"sync": {"process_group": None}})
    assert r.sync is True and r.sync_regex is None and r.sync_for("anything")
    assert "sync" not in Policy(BS).to_dict() and not Policy.from_dict({}).sync
    for bad in ({"group": None}, {"process_group": "gloo"}, ["process_group"]):
        with pytest.raises(ValueError, match="policy key 'sync' must be a mapping"):
            Policy.from_dict({"sync": bad})


def test_set_sync_turns_on_by_default_and_checks_its_flag():
    p = Policy(BS)
    assert p.set_sync().sync is True and p.set_sync(enabled=False).sync is False
    with pytest.raises(TypeError, match=r"^set_sync: enabled must be True or False, got 1$"):
        Policy(BS).set_sync(enabled=1)


def test_regex_hints_name_the_closest_sites_and_at_most_five():
    sites = [f"layer{i}.0.bn1" for i in range(1, 9)]
    with pytest.raises(ValueError) as e:
        Policy().set_module_name_regex(r"layer9\.0\.bn1", BS).validate_names(sites, sites)
    msg = str(e.value)
    assert msg.startswith(r"policy module_name_regex 'layer9\.0\.bn1' matches no BatchNorm site")
    close = msg.split("closest BatchNorm names: ")[1].split(", ")
    assert len(close) == 5 and set(close) <= set(sites)  # the escapes stripped, then five close names
    # a regex that matches a site passes; one that matches none and resembles none lists the first five sites
    Policy().set_module_name_regex(r"layer1\.0\.bn\d", BS).validate_names(sites, sites)
    with pytest.raises(ValueError, match=r"its BatchNorms are e\.g\. layer1\.0\.bn1, layer2\.0\.bn1, layer3\.0\.bn1, "
                                         r"layer4\.0\.bn1, layer5\.0\.bn1$"):
        Policy().set_module_name_regex("zzzzzzzzzzzzzzzzzzzz", BS).validate_names(sites, sites)
    with pytest.raises(ValueError, match=r"its BatchNorms are e\.g\. layer1\.0\.bn1, layer2\.0\.bn1, layer3\.0\.bn1, "
                                         r"layer4\.0\.bn1, layer5\.0\.bn1$"):
        Policy().set_module_name("zzzzzzzzzzzzzzzzzzzz", None).validate_names(sites, sites)
    with pytest.raises(ValueError, match=r"its BatchNorms are e\.g\. \(none\)$"):
        Policy().set_module_name_regex("x", BS).validate_names([], [])


def test_policy_file_entries_name_every_bad_field_and_keep_a_top_level_preset():
    with pytest.raises(ValueError, match=r"has no field 'colour', 'size'; fields: "):
        Policy.from_dict({"default": {"preset": "bs", "size": 1, "colour": 2}})
    p = Policy.from_dict({"preset": "micro"})
    assert p.micro == Policy.from_preset("micro").micro and p.micro is not None and p.preset == "micro"


def test_set_sync_keeps_the_group_it_is_given():
    import torch.distributed as dist
    group = dist.GroupMember.NON_GROUP_MEMBER  # what new_group gives a rank it leaves out: accepted, kept
    p = Policy(BS).set_sync(group)
    assert p.sync_group is group and p.sync
    assert Policy(BS).set_sync(group, enabled=False).sync_group is None
