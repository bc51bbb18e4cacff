"""Integration tests share the session's real servers (tests/conftest.py).

Tests keep apart by using their own collection and measurement names.
"""

from __future__ import annotations

import uuid

import pytest


@pytest.fixture
def unique() -> str:
    """A name unique to this test, fit for a collection, a measurement or a tag value."""
    return f"t{uuid.uuid4().hex[:12]}"
