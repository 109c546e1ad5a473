"""The package's public names: every one in __all__ resolves, the lazy ones to their modules' objects."""
from __future__ import annotations

import importlib

import pytest

import secateurs as sc


@pytest.mark.parametrize("name", sc.__all__)
def test_every_public_name_resolves(name):
    assert getattr(sc, name) is not None


@pytest.mark.parametrize("name", sorted(sc._LAZY))
def test_lazy_names_are_the_module_objects(name):
    module = importlib.import_module(sc._LAZY[name], "secateurs")
    assert getattr(sc, name) is getattr(module, name)
    assert name in sc.__all__


def test_unknown_attribute_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no_such_name"):
        sc.no_such_name
