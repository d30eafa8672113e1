"""bmig-nbd's control socket takes no number that is not finite: an ``ha-state`` that
says NaN or Infinity is refused (a protocol error) and the last good one stays, so
``status`` and ``bmigrate events`` never carry a non-JSON number."""

from __future__ import annotations

import json
import socket

import pytest

from bmig.errors import ProtocolError
from bmig.framing import pack_frame
from bmig.nbd.manage_client import MANAGE_VERSION, ManageClient, socket_path
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


def test_a_client_gone_before_its_reply_is_let_go_without_an_error(nbd_server, tmp_path):
    # bmig-nbd runs on uvloop, whose transport, once closed, raises on a write where
    # asyncio's dropped it: the reply to a client that reset its connection during a
    # slow request (a replicate to a target that does not answer) must not escape as
    # an unhandled error of the connection's task.
    secret = tmp_path / "secret"
    secret.write_text("s" * 32)
    secret.chmod(0o600)
    silent = socket.create_server(("127.0.0.1", 0))       # takes, never answers
    silent.settimeout(30)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.settimeout(30)
    try:
        client.connect(socket_path(nbd_server.manage_dir, "d1"))
        client.sendall(pack_frame(json.dumps({"op": "hello", "version": MANAGE_VERSION})
                                  .encode()))
        client.sendall(pack_frame(json.dumps({
            "op": "replicate", "url": f"tcp://127.0.0.1:{silent.getsockname()[1]}/d1",
            "ack_timeout": 0.1, "options": {"secret_file": str(secret)}}).encode()))
        target_side, _ = silent.accept()                  # the replicate has begun
        wait_for_bytes(client, 1)                         # hello's reply is here, unread:
        client.close()                                    # closing resets the connection
        target_side.settimeout(30)
        while target_side.recv(65536):                    # until the replicate gives up
            pass
        target_side.close()
        with ManageClient(nbd_server.manage_dir, "d1", timeout=30) as after:
            assert after.call("status")["replicating"] is False
    finally:
        client.close()
        silent.close()
    log = nbd_server.daemon.log()
    assert "Traceback" not in log and "Unhandled exception" not in log, log


def wait_for_bytes(sock: socket.socket, n: int) -> None:
    """Until ``n`` bytes wait in the socket's receive queue (peeked, not read)."""
    while len(sock.recv(n, socket.MSG_PEEK)) < n:
        pass
