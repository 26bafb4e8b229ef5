"""Shared fixtures; the helpers they use live in `tests/utils.py`, which tests import."""

from __future__ import annotations

import pytest

from utils import tiny_coma


@pytest.fixture
def model_and_processor():
    return tiny_coma()
