"""Shared fixtures; the helpers they use live in `tests/utils.py`, which tests import."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from utils import tiny_coma


@pytest.fixture
def model_and_processor():
    return tiny_coma()


# Hypothesis profiles of the property tests (tests/test_properties*.py): "ci", the default, draws the same examples
# every run (derandomized) and writes no example database into the checkout; HYPOTHESIS_PROFILE=explore draws new
# ones. Example counts are set per test.
PROPERTY_SETTINGS = dict(deadline=None, database=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", derandomize=True, **PROPERTY_SETTINGS)
settings.register_profile("explore", **PROPERTY_SETTINGS)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
