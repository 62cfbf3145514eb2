"""Estimator specs: validation names the field and the allowed range; dict round trips."""

import pytest

from fxbns import BatchSampling, Exact, FeatureSampling, MicroBatch, VirtualDataset
from fxbns.estimators import spec_from_dict, spec_to_dict


@pytest.mark.parametrize("make, field", [
    (lambda: BatchSampling(ratio=0), "ratio"),
    (lambda: BatchSampling(ratio=1.5), "ratio"),
    (lambda: BatchSampling(min_samples=0), "min_samples"),
    (lambda: BatchSampling(draw="strided"), "draw"),
    (lambda: BatchSampling(sample_backward=1), "sample_backward"),
    (lambda: FeatureSampling(patch=(0, 3)), "patch"),
    (lambda: FeatureSampling(patch=(2, 2), area_ratio=0.1), "area_ratio"),
    (lambda: FeatureSampling(area_ratio=2.0), "area_ratio"),
    (lambda: FeatureSampling(layout="random"), "layout"),
    (lambda: VirtualDataset(num_samples=0), "num_samples"),
    (lambda: VirtualDataset(mix=0), "mix"),
    (lambda: VirtualDataset(distribution="uniform"), "distribution"),
    (lambda: MicroBatch(threshold=0), "threshold"),
    (lambda: MicroBatch(estimator=BatchSampling()), "estimator"),
])
def test_bad_values_name_the_field(make, field):
    with pytest.raises(ValueError, match=field):
        make()


def test_bs_sample_count():
    bs = BatchSampling(ratio=0.125, min_samples=2)
    assert bs.sample_count(64) == 8
    assert bs.sample_count(8) == 2  # clamped up to min_samples
    assert bs.sample_count(2) == 2  # N <= min_samples: whole batch
    assert bs.sample_count(1) == 1


def test_fs_points_and_clamp():
    assert FeatureSampling(area_ratio=1 / 16).points((32, 32)) == (8, 8)
    assert FeatureSampling(patch=(40, 3)).points((32, 32)) == (32, 3)  # clamped to the map
    assert FeatureSampling(patch=(4,)).points((8, 8, 8)) == (4, 4, 4)
    with pytest.raises(ValueError, match="spatial dims"):
        FeatureSampling(patch=(4, 4)).points((8, 8, 8))


@pytest.mark.parametrize("spec", [Exact(), BatchSampling(ratio=0.25, sample_backward=True),
                                  FeatureSampling(patch=(3, 3), layout="grid", per_sample=True),
                                  VirtualDataset(num_samples=2, mix=0.5, real=FeatureSampling()),
                                  MicroBatch(threshold=2)])
def test_dict_round_trip(spec):
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_unknown_kind_is_clear():
    with pytest.raises(ValueError, match="unknown estimator kind 'xx'"):
        spec_from_dict({"kind": "xx"})
    with pytest.raises(ValueError, match="bad fields"):
        spec_from_dict({"kind": "bs", "rate": 0.1})
