"""Fuzz drivers for every parser of the product, and the engine that feeds them.

bench/fuzz.py runs each driver for a million inputs or more; tests/unit/test_fuzz_parsers.py
runs each for a few seconds under hypothesis. ``DRIVERS`` lists them by name, in the order
the bench runs them."""

from __future__ import annotations

import importlib

from tests.fuzzing.engine import Driver

_MODULES = ("nbd", "control", "wire", "state", "toml")


def drivers() -> dict[str, type[Driver]]:
    found: dict[str, type[Driver]] = {}
    for module in _MODULES:
        for cls in importlib.import_module(f"tests.fuzzing.{module}").DRIVERS:
            found[cls.name] = cls
    return found
