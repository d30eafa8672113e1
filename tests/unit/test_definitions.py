"""Device definitions, names, geometry and the config files they come from."""

import os

import pytest
from hypothesis import given, strategies as st

from bmig import log as bmig_log
from bmig.config import load_toml
from bmig.errors import ConfigError
from bmig.tracker.definitions import DeviceDefinition, check_geometry, check_name
from bmig.tracker.intervals import merge_spans


@pytest.mark.parametrize("device_id", ["0x00000000000001", " 00000000000001f", "1_f", "1f",
                                       "00000000000000001", 31])
def test_device_id_must_be_sixteen_hex_digits(device_id):
    values = {"name": "vm", "size": 4096, "device_id": device_id}
    with pytest.raises(ConfigError, match="16 hex digits"):
        DeviceDefinition.from_values(values, "vm.toml")


def test_a_device_id_of_sixteen_hex_digits_is_taken():
    values = {"name": "vm", "size": 4096, "device_id": "00000000000000Ff"}
    assert DeviceDefinition.from_values(values, "vm.toml").device_id == 0xFF


@pytest.mark.parametrize("name", ["x\n", "", ".x", "-x", "a/b", "a b", "x" * 65])
def test_bad_names_are_refused(name):
    with pytest.raises(ConfigError):
        check_name(name)


def test_a_bitmap_too_big_to_hold_is_refused_with_advice():
    with pytest.raises(ConfigError, match="larger chunk size"):
        check_geometry(1 << 50, 4096)
    check_geometry(1 << 50, 1 << 20)


def test_a_fifo_is_not_read_as_a_config_file(tmp_path):
    fifo = tmp_path / "x.toml"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match="not a regular file"):
        load_toml(str(fifo))   # would block forever if it were opened for reading


def test_a_directory_is_not_read_as_a_config_file(tmp_path):
    with pytest.raises(ConfigError, match="not a regular file"):
        load_toml(str(tmp_path))


def test_an_oversized_config_file_is_refused(tmp_path):
    big = tmp_path / "big.toml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(ConfigError, match="too large"):
        load_toml(str(big))


def test_an_unknown_log_level_is_a_config_error():
    with pytest.raises(ConfigError, match="log level"):
        bmig_log.setup("loud")


@given(st.lists(st.tuples(st.integers(0, 200), st.integers(1, 50)), max_size=40))
def test_merged_spans_cover_the_same_chunks_disjointly(pairs):
    spans = [(first, first + length) for first, length in pairs]
    merged = merge_spans(spans)
    covered = {c for first, end in spans for c in range(first, end)}
    assert {c for first, end in merged for c in range(first, end)} == covered
    assert all(a[1] < b[0] for a, b in zip(merged, merged[1:]))
