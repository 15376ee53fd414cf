"""The examples in course_utils' docstrings run and print what they say (a stale one fails)."""

import doctest
import importlib
import pkgutil

import pytest

import course_utils

MODULES = sorted(m.name for m in pkgutil.walk_packages(course_utils.__path__, "course_utils."))


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str):
    result = doctest.testmod(importlib.import_module(name), optionflags=doctest.ELLIPSIS)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"
