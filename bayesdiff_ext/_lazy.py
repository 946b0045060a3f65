"""Packages whose names load their modules on first use (PEP 562)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable, Mapping


def lazy_names(
    package: str, attributes: Mapping[str, str], submodules: Iterable[str]
) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``.

    Args:
        package: the package's ``__name__``.
        attributes: public name → the module that defines it, imported on the name's first use.
        submodules: the package's submodules, imported on first use of their name.

    Returns:
        ``(__getattr__, __dir__)`` to assign at the package's module level. A loaded name is stored
        on the package, so later lookups do not reach ``__getattr__``.
    """
    submodules = tuple(submodules)

    def __getattr__(name: str):
        if name in attributes:
            value = getattr(importlib.import_module(attributes[name]), name)
        elif name in submodules:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(attributes) | set(submodules))

    return __getattr__, __dir__
