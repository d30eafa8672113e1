"""bmigrate cutover --check's receiver, auth and lineage checks, each error of the OPEN
sorted to the check it belongs to (the daemons themselves: test_cutover_check.py).

- An AuthError answered to the OPEN fails auth: the receiver answered, and nothing says
  "auth ok".
- A LineageError fails lineage, with receiver and auth holding.
"""

from __future__ import annotations

from types import SimpleNamespace

from bmig.errors import AuthError, LineageError
from bmig.sender.precheck import Precheck
from bmig.wire.client import WireTarget
from bmig.wire.urls import parse_target_url


class OpenFails(WireTarget):
    """A WireTarget whose OPEN answers ``error`` (no connection behind it)."""

    def __init__(self, error: Exception):
        self.description = "tcp://127.0.0.1:9/d1"
        self.error_to_raise = error

    def open(self, *args, **kwargs):
        raise self.error_to_raise


def checked(error: Exception) -> dict:
    migration = SimpleNamespace(name="d1", url=parse_target_url("tcp://127.0.0.1:9/d1"))
    precheck = Precheck(migration, "/nonexistent", {}, lambda check: None)
    precheck._stats = {"size": 1 << 20, "device_id": "00000000000000a1",
                       "generation": "00000000000000a2", "chunk_size": 65536,
                       "previous": [], "role": "primary"}
    precheck._open(OpenFails(error))
    return {c.name: c for c in precheck.results}


def test_an_auth_error_answered_to_open_fails_auth():
    checks = checked(AuthError("the receiver refuses this sender"))
    assert checks["receiver"].ok is True
    assert checks["auth"].ok is False and "refuses this sender" in checks["auth"].message
    assert checks["lineage"].ok is None


def test_a_lineage_error_fails_lineage_only():
    checks = checked(LineageError("the target holds generation 7 of another lineage"))
    assert checks["receiver"].ok is True and checks["auth"].ok is True
    assert checks["lineage"].ok is False
