import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE; unset: "ci" where the CI variable is set (.ci/run sets it,
# as do GitHub Actions and most CI services), else "dev".  All are deadline-free (CPU timings under load vary).
#   dev       25 derandomized examples per property: the quick local run
#   ci        60 derandomized examples, the same on every run so a failure reproduces; the strategies' upper
#             bounds (C >= 64, 32x32 maps) are also pinned by @example cases, so the suite stays within CI's time
#   thorough  1000 random examples (a new draw each run, the database kept): for hunting, not for CI
settings.register_profile("dev", deadline=None, max_examples=25, derandomize=True, print_blob=True)
settings.register_profile("ci", deadline=None, max_examples=60, derandomize=True, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=1000, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def hypothesis_profile(environ=os.environ) -> str:
    """The profile to load: ``HYPOTHESIS_PROFILE`` if set, else ``ci`` under CI, else ``dev``."""
    name = environ.get("HYPOTHESIS_PROFILE")
    if name:
        return name
    return "ci" if environ.get("CI", "").lower() not in ("", "0", "false", "no") else "dev"


settings.load_profile(hypothesis_profile())

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
    """The statistical rules lowered to 2 values per channel (``MIN_VALUES_PER_CHANNEL`` and
    ``MIN_SAMPLE_BACKWARD_VALUES`` of ``fxbns.ops.dispatch``; ``MIN_SAMPLE_BACKWARD_FRACTION`` to 0), for
    tests of the sampled arithmetic on inputs small enough to check exhaustively; the rule itself is tested in
    tests/test_ops.py."""
    from fxbns.ops import dispatch

    monkeypatch.setattr(dispatch, "MIN_VALUES_PER_CHANNEL", 2)
    monkeypatch.setattr(dispatch, "MIN_SAMPLE_BACKWARD_VALUES", 2)  # and sample_backward's floors with it
    monkeypatch.setattr(dispatch, "MIN_SAMPLE_BACKWARD_FRACTION", 0.0)
