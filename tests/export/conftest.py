"""Fixtures of the export tests (the checkpoint and the int8 export come from tests/conftest.py)."""

from __future__ import annotations

import pytest

from models import load_model


@pytest.fixture(scope="module")
def small_model(small_checkpoint):
    model, _ = load_model(small_checkpoint)
    return model


@pytest.fixture(scope="module")
def exported(small_export_int8):
    """One int8 export of the small preset, reused by every reading test."""
    return small_export_int8
