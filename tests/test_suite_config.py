"""The suite's own machinery: Hypothesis profiles and the hang timeout."""

from conftest import hypothesis_profile
from hypothesis import settings

pytest_plugins = ["pytester"]


def test_hypothesis_profile_choice():
    assert hypothesis_profile({}) == "dev"
    assert hypothesis_profile({"CI": "true"}) == "ci"
    assert hypothesis_profile({"CI": "false"}) == "dev"
    assert hypothesis_profile({"CI": "true", "HYPOTHESIS_PROFILE": "thorough"}) == "thorough"
    ci = settings.get_profile("ci")
    assert ci.max_examples >= 60 and ci.derandomize and ci.deadline is None
    assert settings.get_profile("dev").max_examples < ci.max_examples < settings.get_profile("thorough").max_examples


def test_a_hang_fails_under_the_timeout(pytester, request):
    assert request.config.getini("timeout") == "600"  # the suite-wide limit (pyproject.toml)
    pytester.makepyfile("""
        import time, pytest

        @pytest.mark.timeout(1)
        def test_hangs():
            time.sleep(60)
    """)
    r = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    r.assert_outcomes(failed=1)
    assert any("Timeout" in ln for ln in r.outlines)
