import os

import pytest
import torch
from hypothesis import settings

settings.register_profile("fxbns", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fxbns"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def every_layer(preset: str):
    """A preset's policy with ``min_elements=0``: the tests' small inputs are sampled, not left exact."""
    from fxbns import Policy

    return Policy.from_preset(preset).set_min_elements(0)


@pytest.fixture
def tiny_samples(monkeypatch):
    """The statistical rule lowered to 2 values per channel (``fxbns.ops.dispatch.MIN_VALUES_PER_CHANNEL``), for
    tests of the sampled arithmetic on inputs small enough to check exhaustively; the rule itself is tested in
    tests/test_ops.py."""
    from fxbns.ops import dispatch

    monkeypatch.setattr(dispatch, "MIN_VALUES_PER_CHANNEL", 2)
