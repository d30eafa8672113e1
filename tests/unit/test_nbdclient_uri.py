"""NBD URIs: what parse_uri accepts, what it makes of it, and one-line refusals."""

from __future__ import annotations

import pytest

from bmig.errors import ConfigError
from bmig.nbdclient import DEFAULT_PORT, NbdAddress, parse_uri


@pytest.mark.parametrize("uri, expected", [
    ("nbd://example.com", NbdAddress(host="example.com")),
    ("nbd://example.com/", NbdAddress(host="example.com")),
    ("nbd://example.com:10810/disk0", NbdAddress(host="example.com", port=10810, export="disk0")),
    ("nbd://127.0.0.1/vm1", NbdAddress(host="127.0.0.1", export="vm1")),
    ("nbd://[::1]:7000/x", NbdAddress(host="::1", port=7000, export="x")),
    ("nbd://host:/x", NbdAddress(host="host", export="x")),
    ("nbd:///x", NbdAddress(host="localhost", export="x")),
    ("NBD://Host/x", NbdAddress(host="host", export="x")),
    ("nbds://host/secure", NbdAddress(host="host", export="secure", tls=True)),
    ("nbd+unix:///?socket=/run/a.sock", NbdAddress(unix="/run/a.sock")),
    ("nbd+unix:///vm1?socket=/run/a.sock", NbdAddress(unix="/run/a.sock", export="vm1")),
    ("nbds+unix:///vm1?socket=/run/a.sock",
     NbdAddress(unix="/run/a.sock", export="vm1", tls=True)),
    ("nbd+unix:///vm1?socket=relative.sock", NbdAddress(unix="relative.sock", export="vm1")),
])
def test_good_uris(uri, expected):
    assert parse_uri(uri) == expected


def test_default_port_is_the_iana_port():
    assert DEFAULT_PORT == 10809
    assert parse_uri("nbd://h/").port == 10809


def test_export_name_is_the_path_without_its_slash_percent_decoded():
    assert parse_uri("nbd://h/a%20b%2Fc").export == "a b/c"
    assert parse_uri("nbd://h/a/b").export == "a/b"
    assert parse_uri("nbd://h//lead").export == "/lead"
    assert parse_uri("nbd://h/caf%C3%A9").export == "café"
    assert parse_uri("nbd://h/%23hash%3Fq").export == "#hash?q"
    assert parse_uri("nbd+unix:///a%2Bb?socket=/s").export == "a+b"


def test_socket_path_is_percent_decoded_and_plus_stays_plus():
    assert parse_uri("nbd+unix:///?socket=/tmp/a%20b.sock").unix == "/tmp/a b.sock"
    assert parse_uri("nbd+unix:///?socket=/tmp/a+b.sock").unix == "/tmp/a+b.sock"


@pytest.mark.parametrize("address", [
    NbdAddress(host="example.com", port=7, export="a b/c#?%"),
    NbdAddress(host="::1", export="v"),
    NbdAddress(unix="/tmp/x y+z.sock", export="d1", tls=True),
    NbdAddress(unix="/s", export=""),
    NbdAddress(host="h", tls=True),
])
def test_uri_of_an_address_parses_back_to_it(address):
    assert parse_uri(address.uri) == address
    assert str(address) == address.uri


@pytest.mark.parametrize("uri, words", [
    ("", "not an NBD URI"),
    ("example.com:10809", "not an NBD URI"),
    ("http://example.com/x", "not an NBD URI"),
    ("nbd+vsock:///x", "not an NBD URI"),
    ("nbd:example.com/x", "must start with nbd://"),
    ("nbd+unix:/x?socket=/s", "must start with nbd+unix://"),
    ("nbd://h:port/x", "invalid NBD URI"),
    ("nbd://h:70000/x", "invalid NBD URI"),
    ("nbd://h:0/x", "port 0"),
    ("nbd://[::1/x", "invalid NBD URI"),
    ("nbd://h/x?socket=/s", "takes no query"),
    ("nbd://user@h/x", "user names"),
    ("nbd://h/x#frag", "fragment"),
    ("nbd+unix:///x", "socket=PATH"),
    ("nbd+unix:///x?socket=", "socket=PATH"),
    ("nbd+unix:///x?socket=/a&socket=/b", "socket=PATH"),
    ("nbd+unix:///x?sock=/a", "unsupported query parameter 'sock'"),
    ("nbd+unix:///x?socket=/a&tls-verify-peer=false", "unsupported query parameter"),
    ("nbd+unix:///x?socket", "invalid NBD URI"),
    ("nbd+unix://host/x?socket=/s", "names a host"),
    ("nbd://h/a%00b", "NUL"),
    ("nbd://h/%ff", "invalid NBD URI"),
    ("nbd://h/x\ny", "control characters"),
    ("nbd://h/" + "e" * 4097, "longer than 4096"),
])
def test_bad_uris_are_refused_in_one_line(uri, words):
    with pytest.raises(ConfigError) as info:
        parse_uri(uri)
    message = info.value.message
    assert words in message
    assert "\n" not in message
    assert len(message) < 4500


def test_a_uri_must_be_a_string():
    with pytest.raises(ConfigError, match="must be a string"):
        parse_uri(b"nbd://h/x")  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, words", [
    ({}, "either a Unix socket path or a host"),
    ({"unix": "/s", "host": "h"}, "either a Unix socket path or a host"),
    ({"unix": ""}, "non-empty"),
    ({"host": "h", "port": 0}, "out of range"),
    ({"host": "h", "port": 65536}, "out of range"),
    ({"host": "h", "export": "x" * 4097}, "longer than 4096"),
    ({"host": "h", "export": "a\0b"}, "NUL"),
])
def test_bad_addresses_are_refused(kwargs, words):
    with pytest.raises(ConfigError, match=words):
        NbdAddress(**kwargs)


def test_export_name_of_exactly_4096_bytes_is_fine():
    assert len(parse_uri("nbd://h/" + "é" * 2048).export.encode()) == 4096
