"""Fixtures shared by several test files."""

import gc
import weakref

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


@pytest.fixture
def freed_at_once():
    """`freed(box)`: drop the one item of the list `box`, the object's last reference, with the garbage
    collector off; True when the object went at once (no reference cycle keeps it, and what it owns,
    such as a trainer's loader worker processes, alive)."""

    def freed(box: list) -> bool:
        ref = weakref.ref(box[0])
        gc.disable()
        try:
            box.clear()
            return ref() is None
        finally:
            gc.enable()

    return freed
