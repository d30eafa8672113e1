"""Inputs bench/fuzz.py found to crash a parser, each fed again to the driver that found
it (tests/fuzzing/) and to the product function it reached: now it is a clean refusal."""

from __future__ import annotations

import json

import pytest

from bmig.errors import StateError
from bmig.lineage import load_source, load_target, source_path, target_path
from tests.fuzzing.engine import check
from tests.fuzzing.state import Records


@pytest.fixture
def records(tmp_path):
    driver = Records(str(tmp_path))
    yield driver
    driver.close()


def outcome(driver, data: bytes) -> str:
    result = check(driver, data)
    assert result.kind in ("accepted", "error"), result.detail
    return result.kind


def test_a_target_record_nested_too_deeply_is_damaged_not_a_recursion_error(records, tmp_path):
    data = b"[" * 5000 + b"]" * 5000
    assert outcome(records, b"\x01" + data) == "error"
    (tmp_path / "a.target").write_bytes(data)
    with pytest.raises(StateError, match="nested too deeply"):
        load_target(str(tmp_path), "a")
