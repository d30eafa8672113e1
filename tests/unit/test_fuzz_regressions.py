"""Inputs bench/fuzz.py found to crash a parser, each fed again to the driver that found
it (tests/fuzzing/) and to the product function it reached: now it is a clean refusal."""

from __future__ import annotations

import json

import pytest

from bmig.errors import ConfigError, StateError
from bmig.lineage import load_source, load_target, parse_id, source_path
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


GOOD_TARGET = {"export": "a", "source_device_id": "00000000000000a1",
               "generation": "00000000000000b1", "state": "consistent", "role": "secondary",
               "size": 4096, "last_pass": 1.5e9, "passes": 3, "previous": ["00000000000000b0"],
               "successor": "0000000000000000", "promoted": None, "identity": None}


@pytest.mark.parametrize("change", [
    {"size": float("inf")},                    # 1e999 in the file: int() overflowed
    {"size": -4096}, {"passes": -1}, {"size": "4096"}, {"passes": True},
    {"role": "second ry"}, {"role": ["primary"]},
    {"previous": ["00000000001e9990000b0"]}, {"previous": 5}, {"previous": "00000000000000b0"},
])
def test_a_damaged_target_record_is_refused_not_trusted(records, tmp_path, change):
    data = json.dumps({**GOOD_TARGET, **change}).encode()
    assert outcome(records, b"\x01" + data) == "error"
    (tmp_path / "a.target").write_bytes(data)
    with pytest.raises(StateError, match="damaged"):
        load_target(str(tmp_path), "a")


GOOD_SOURCE = {"device_id": "00000000000000a1", "generation": "00000000000000b2",
               "role": "handed-over", "previous": ["00000000000000b0"],
               "successor": "00000000000000b3"}


@pytest.mark.parametrize("change", [
    {"role": "banana"}, {"role": None},
    {"previous": ["00000000000000b018446744073709551616"]}, {"previous": 5},
])
def test_a_damaged_lineage_record_starts_a_new_generation(records, tmp_path, change):
    data = json.dumps({**GOOD_SOURCE, **change}).encode()
    assert outcome(records, b"\x00" + data) == "accepted"
    path = source_path(str(tmp_path), "vm1")
    with open(path, "wb") as f:
        f.write(data)
    record, why = load_source(str(tmp_path), "vm1", 0xA1)
    assert why is not None and "damaged" in why
    assert record.generation != 0xB2 and record.role == "primary" and record.previous == []


@pytest.mark.parametrize("identity", [
    {"kind": "file", "size": 4096, "dev": 218446744073709551616049, "ino": 12,
     "inode_generation": 77},                   # os.major() of it overflowed
    {"kind": "file", "size": 4096, "dev": 2049, "ino": 1 << 64, "inode_generation": 77},
    {"kind": "file", "size": 1 << 64, "dev": 2049, "ino": 12, "inode_generation": 77},
    {"kind": "file", "size": 4096, "dev": 2049, "ino": 12, "inode_generation": 1 << 63},
])
def test_an_identity_the_kernel_cannot_have_given_is_damage(records, tmp_path, identity):
    data = json.dumps({**GOOD_TARGET, "identity": identity}).encode()
    assert outcome(records, b"\x01" + data) == "error"
    (tmp_path / "a.target").write_bytes(data)
    with pytest.raises(StateError, match="identity"):
        load_target(str(tmp_path), "a")


@pytest.mark.parametrize("generation", [" 0000000000000b0", "0x000000000000b0",
                                        "0000_00000000b00", "+000000000000b00"])
def test_a_generation_is_exactly_sixteen_hex_digits(records, tmp_path, generation):
    data = json.dumps({**GOOD_SOURCE, "previous": [generation]}).encode()
    assert outcome(records, b"\x00" + data) == "accepted"      # replaced, not trusted
    with open(source_path(str(tmp_path), "vm1"), "wb") as f:
        f.write(data)
    _, why = load_source(str(tmp_path), "vm1", 0xA1)
    assert why is not None and "16 hex digits" in why
    with pytest.raises(ConfigError, match="16 hex digits"):
        parse_id(generation, "generation")
    assert parse_id("00000000000000B0", "generation") == 0xB0
