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


# A skip hides a test that did not run: the run fails on any skip outside this list (test-id prefix → why it may skip).
ALLOWED_SKIPS = {
    "tests/test_app.py": "the demo's tests need gradio, which .ci/run installs in a venv of its own (Pillow 12), "
    "where COMA_REQUIRE_DEMO_TESTS=1 turns their skips into failures",
    "tests/test_mteb.py": "the [mteb] extra needs Python >= 3.11; below that the module skips (from 3.11 on the dev "
    "extra installs mteb and the module imports it unconditionally)",
    "tests/test_recipes.py": "`needs_no_gpu` tests check the machine without a bf16 GPU, and skip on one",
}
_unexpected_skips: list[str] = []


def _note_skip(report) -> None:
    if report.skipped and not any(report.nodeid.startswith(prefix) for prefix in ALLOWED_SKIPS):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        _unexpected_skips.append(f"{report.nodeid}: {reason}")


def pytest_collectreport(report) -> None:  # a module skipped as a whole
    _note_skip(report)


def pytest_runtest_logreport(report) -> None:
    _note_skip(report)


def pytest_sessionfinish(session, exitstatus) -> None:
    if _unexpected_skips and exitstatus == 0:
        session.exitstatus = 1


def pytest_terminal_summary(terminalreporter) -> None:
    if _unexpected_skips:
        terminalreporter.section("skips outside tests/conftest.py's ALLOWED_SKIPS (each one fails the run)")
        for line in _unexpected_skips:
            terminalreporter.line(line)
