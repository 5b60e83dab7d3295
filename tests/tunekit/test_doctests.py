"""Docstring examples run as tests, imported by their installed names.

(``pytest --doctest-modules adapters`` would import the source folders as the
top-level packages ``adapters`` / ``kernels``, which tunekit never installs.)
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import tunekit.adapters
import tunekit.kernels

# adapters/ and kernels/ live outside tunekit/ on disk, so each root is walked on its own.
ROOTS = (tunekit, tunekit.adapters, tunekit.kernels)


def _module_names() -> set[str]:
    names = {root.__name__ for root in ROOTS}
    for root in ROOTS:
        names.update(info.name for info in pkgutil.walk_packages(root.__path__, root.__name__ + "."))
    return names


def _modules_with_examples() -> list[str]:
    names = []
    for name in sorted(_module_names()):
        spec = importlib.util.find_spec(name)
        origin = getattr(spec, "origin", None) if spec else None
        if origin and origin.endswith(".py") and ">>>" in open(origin, encoding="utf-8").read():
            names.append(name)
    return names


def test_some_modules_have_examples():
    assert "tunekit.adapters" in _modules_with_examples()


@pytest.mark.parametrize("name", _modules_with_examples())
def test_docstring_examples(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed in {name}"
