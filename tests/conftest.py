"""Fixtures shared by several test files."""

import pytest

import datasets.common as common


@pytest.fixture
def crop_box_calls(monkeypatch):
    """The `original` argument of every `datasets.common.crop_box` call made during the test, in order."""
    calls = []
    real = common.crop_box

    def spy(width, height, original):
        calls.append(original)
        return real(width, height, original)

    monkeypatch.setattr(common, "crop_box", spy)
    return calls
