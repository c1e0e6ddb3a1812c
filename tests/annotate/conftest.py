"""Fixtures of the annotation tests."""

from __future__ import annotations

import pytest
from annotate_fixtures import make_split

from circot.data.records import CIRSplit


@pytest.fixture
def tiny_split(tmp_path) -> CIRSplit:
    return make_split(tmp_path / "images")
