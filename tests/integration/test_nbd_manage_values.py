"""bmig-nbd's control socket takes no number that is not finite: an ``ha-state`` that
says NaN or Infinity is refused (a protocol error) and the last good one stays, so
``status`` and ``bmigrate events`` never carry a non-JSON number."""

from __future__ import annotations

import json

import pytest

from bmig.errors import ProtocolError
from bmig.nbd.manage_client import ManageClient
from tests.integration.nbd_helpers import nbd_server  # noqa: F401


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_an_ha_state_with_a_number_that_is_not_finite_is_refused(nbd_server, bad):
    with ManageClient(nbd_server.manage_dir, "d1", timeout=30) as ha:
        ha.call("ha-state", state="replicating", lag_bytes=5, lag_seconds=0.5)
        with ManageClient(nbd_server.manage_dir, "d1", timeout=30) as hostile:
            with pytest.raises(ProtocolError, match="finite"):
                hostile.call("ha-state", state="replicating", lag_seconds=bad)
        with ManageClient(nbd_server.manage_dir, "d1", timeout=30) as reader:
            status = reader.call("status")
    assert status["ha"] == {"state": "replicating", "lag_bytes": 5, "lag_seconds": 0.5}
    json.loads(json.dumps(status, allow_nan=False))
